"""How a model's forward runs on this machine: the one seam where that is chosen and read.

A checkpoint has one parameter tree, the one `module.Transformer` declares: layers stacked on
a leading axis, every weight in its plain layout. `ModelConfig.execution` says how this machine
runs it, chosen once when the model is built (`choose`, called by `load_model`):

- `scan_layers`: the layers stay stacked and run under `lax.scan` (one layer compiled: TPUs),
  or are held per layer and run by an unrolled loop (elsewhere: a scanned layer reads its
  weights out of the stack, a copy at every decode step on the CPU backend);
- `cpu_kernels`: the layers' dense weights and the head are held as `panel_matmul.Panels` and
  multiplied by steer-jax's CPU kernels, and a decode step's attention runs its kernel too.

`layout` puts the declared tree into the execution's layout once, at load; `parameter` and
`canonical` read the declared tree back (sharding, export, counts). The forward
(`transformer.py`) computes through `embed`, `dense`, `head`, `attention` and `run_layers`,
and the decode loop carries `loop_cache`; nothing outside this file asks which layout a model
holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.modeling import paged_attention, panel_matmul
from steer_jax.modeling.config import Execution, ModelConfig
from steer_jax.modeling.kv_cache import KVCache, local_layers

Params = dict[str, Any]


class Unavailable(ValueError):
    """An execution this machine cannot run; the message says why."""


def choose(dtype: Any, mesh_size: int = 1, *, scan_layers: bool | None = None,
           cpu_kernels: bool | None = None) -> Execution:
    """The execution of a model of `dtype` over `mesh_size` devices of this backend.

    `scan_layers` None: scanned on TPUs, unrolled elsewhere (benchmarks/RESULTS.md has the cost
    by device). `cpu_kernels` None: when the backend is a CPU, the dtype float32, the mesh one
    device and the kernels build; True: the same, or `Unavailable` saying which does not hold.
    """
    backend = jax.default_backend()
    scan = backend == "tpu" if scan_layers is None else scan_layers
    if cpu_kernels is False:
        return Execution(scan_layers=scan, cpu_kernels=False)
    why = []
    if backend != "cpu":
        why.append(f"the backend is {backend}, not cpu")
    if jnp.dtype(dtype) != jnp.float32:
        why.append(f"the kernel multiplies float32 weights, not {jnp.dtype(dtype).name}")
    if mesh_size > 1:
        why.append(f"the mesh has {mesh_size} devices; the kernel runs on one")
    if not why:
        try:
            panel_matmul.load()
        except panel_matmul.KernelUnavailable as e:
            why.append(str(e))
    if why and cpu_kernels:
        raise Unavailable("cpu_kernels=True, but " + "; ".join(why))
    return Execution(scan_layers=scan, cpu_kernels=not why)


def on_devices(how: Execution, devices: int) -> Execution:
    """`how` for a model spread over `devices`: the CPU kernels run on one device only."""
    return dataclasses.replace(how, cpu_kernels=how.cpu_kernels and devices == 1)


def _head_key(cfg: ModelConfig) -> str:
    return "embed" if cfg.tie_embeddings else "lm_head"  # an untied embedding is only looked up


@functools.partial(jax.jit, static_argnames=("head", "contracts", "stacked"))
def _pack(params: Params, head: str, contracts: tuple[tuple[str, int], ...],
          stacked: bool) -> Params:
    # One jitted program per shape, so a second load of the same shapes does not recompile.
    dense = dict(contracts)

    def layer(lp: Params) -> Params:
        return {k: panel_matmul.pack(v, dense[k], int(stacked)) if k in dense else v
                for k, v in lp.items()}

    layers = layer(params["layers"]) if stacked else [layer(lp) for lp in params["layers"]]
    # The head is multiplied as [D, V]: packed from the [V, D] table's transpose.
    return {**params, head: panel_matmul.pack(params[head].T, 1), "layers": layers}


def layout(cfg: ModelConfig, params: Params, contracts: Mapping[str, int]) -> Params:
    """The declared tree `params` in `cfg.execution`'s layout; `contracts`: layer weight name ->
    the axes its matmul contracts, as the module declares (`module.layout` passes them)."""
    how = cfg.execution
    if not how.scan_layers:
        layers = params["layers"]
        params = {**params, "layers": [jax.tree.map(lambda a: a[i], layers)
                                       for i in range(cfg.num_layers)]}
    if how.cpu_kernels:
        # Each weight packed where it will be read (per layer when unrolled), in one program.
        params = _pack(params, _head_key(cfg), tuple(sorted(contracts.items())),
                       how.scan_layers)
    return params


def _plain(x: Any) -> Any:
    return x.unpack() if isinstance(x, panel_matmul.Panels) else x


def parameter(cfg: ModelConfig, params: Params, path: tuple[str, ...]) -> jax.Array:
    """One declared parameter (by module path) of `params`, in the declared layout: a copy only
    where the execution's layout differs, so an export holds one extra parameter at a time."""
    if path[0] == "layers":
        layers = params["layers"]
        if cfg.execution.scan_layers:
            return _plain(layers[path[1]])
        return jnp.stack([_plain(lp[path[1]]) for lp in layers])
    value = params
    for key in path:
        value = value[key]
    if cfg.execution.cpu_kernels and path[0] == _head_key(cfg):
        return value.unpack().T
    return value


def canonical(cfg: ModelConfig, params: Params) -> Params:
    """The declared tree of `params`: layers stacked, weights plain (sharding, export, counts)."""
    layers = params["layers"]
    names = layers if cfg.execution.scan_layers else layers[0]
    out = {k: parameter(cfg, params, (k,)) if k == _head_key(cfg) else v
           for k, v in params.items() if k != "layers"}
    return {**out, "layers": {n: parameter(cfg, params, ("layers", n)) for n in names}}


def loop_cache(cfg: ModelConfig, cache: KVCache) -> KVCache:
    """The cache as a decode loop carries it: per-layer arrays for unrolled layers on XLA's
    attention, which each write their own in place (a slice of a stacked pool would be copied
    every step). The CPU kernel reads a stacked pool in place, and unstacking, then stacking
    again, would copy the whole pool twice a call."""
    how = cfg.execution
    return cache if how.scan_layers or how.cpu_kernels else cache.per_layer()


def precision(*operands: jax.Array) -> jax.lax.Precision:
    """A float32 model computes in float32: XLA's DEFAULT lets a GPU run float32 dots in TF32
    (~5e-4 relative error, measured against transformers on an H200) and a TPU in bfloat16 passes,
    which a float32 config does not ask for. bfloat16 operands keep DEFAULT; on a CPU both are
    the same program."""
    f32 = any(x.dtype == jnp.float32 for x in operands)
    return jax.lax.Precision.HIGHEST if f32 else jax.lax.Precision.DEFAULT


def embed(cfg: ModelConfig, table: Any, tokens: jax.Array) -> jax.Array:
    """Rows of the embedding table (packed as the head when the kernels run a tied model)."""
    if cfg.execution.cpu_kernels and cfg.tie_embeddings:
        return panel_matmul.embed(table, tokens)
    return table[tokens]


def dense(cfg: ModelConfig, x: jax.Array, w: Any, n_in: int = 1) -> jax.Array:
    """x's last `n_in` axes contracted with w's first ones, as ONE 2-D matmul over all tokens.

    Why not an einsum over [B, T, ...]: its weight gradient contracts over two axes (batch and
    time), which XLA's CPU backend runs several times slower than the same product on [B*T, in].
    """
    lead = x.shape[: x.ndim - n_in]
    if cfg.execution.cpu_kernels:
        out = panel_matmul.matmul(x.reshape(-1, math.prod(w.in_shape)), w)
        return out.reshape(*lead, *w.out_shape)
    inner = w.shape[:n_in]
    out = jnp.matmul(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1),
                     precision=precision(x, w))
    return out.reshape(*lead, *w.shape[n_in:])


def head(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Float32 [N, V] products of hidden states [N, D] with the head's rows."""
    w = params[_head_key(cfg)]
    if cfg.execution.cpu_kernels:
        return panel_matmul.matmul(hidden, w)
    # A [V, D] head contracted over D: XLA's CPU dot reads a [D, V] operand of a vocabulary's
    # width many times slower (benchmarks/RESULTS.md).
    return jax.lax.dot_general(hidden, w, (((1,), (1,)), ((), ())),
                               precision=precision(hidden, w),
                               preferred_element_type=jnp.float32)


def pallas_backend(cfg: ModelConfig, dtype: Any, page_size: int, pages_per_row: int) -> str | None:
    """The backend whose Pallas paged kernel runs this model's decode attention, or None (the
    XLA path). Decided per model: inside a scan a layer's kind is not known when tracing, and
    the kernels have no sliding window, so a model with windowed layers keeps the XLA path."""
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    # A float32 model computes in float32 (`precision`); the kernels' dots run in TF32 on a GPU
    # and bfloat16 on a TPU.
    if backend not in paged_attention.BACKENDS or any(cfg.sliding_layers) or \
            jnp.dtype(dtype) == jnp.float32:
        return None
    why_not = paged_attention.pallas_applies(backend, cfg.num_heads, cfg.num_kv_heads,
                                             cfg.head_dim, page_size, pages_per_row, dtype)
    return backend if why_not is None else None


def whole_table(cfg: ModelConfig) -> bool:
    """Whether attention costs only each row's valid slots (the CPU kernel), so a call may be
    given every row's whole page table: one compiled shape however far its rows reach."""
    return cfg.execution.cpu_kernels


def attention(cfg: ModelConfig, q: jax.Array, k_pool: Any, v_pool: Any, layer: Any,
              pages: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    """q [B, T, H, hd] at `positions` [B, T] against the rows' pages of layer `layer` of the
    pools k_pool, v_pool (stacked [L, K, N, P, hd], or off the kernel a tuple of per-layer
    [K, N, P, hd]: `loop_cache`);
    pages [B, M] (the rows' page tables), mask [B, T, M * P] over their slots.

    Three ways: the CPU kernel (decode_attention.cc) under `cpu_kernels`, JAX's Pallas paged
    kernel for a decode step on a TPU or GPU where it applies, and everywhere else the portable
    XLA path over gathered pages."""
    B, T, H, hd = q.shape
    K = cfg.num_kv_heads
    if cfg.execution.cpu_kernels:
        # Each query is a kernel row of its own (its row's page table repeated): one call, not
        # ~8 small ops, and it reads only the slots its mask admits, so its cost is the causal
        # slots' whatever the table's width (`whole_table`). It reads the stacked pool in place
        # (`loop_cache` never unstacks it under the kernel).
        out = panel_matmul.decode_attention(
            q.reshape(B * T, K, H // K, hd), k_pool, v_pool, jnp.repeat(pages, T, axis=0),
            mask.reshape(B * T, -1), cfg.attn_scale, layer)
        return out.astype(q.dtype).reshape(B, T, H, hd)
    k, v = k_pool[layer], v_pool[layer]
    backend = pallas_backend(cfg, k.dtype, k.shape[2], pages.shape[1]) if T == 1 else None
    if backend is not None:
        # Causal decode: a row attends to its first position + 1 slots (within its table).
        lengths = jnp.minimum(positions[:, 0] + 1, pages.shape[1] * k.shape[2])
        out = paged_attention.pallas_decode(q[:, 0], k, v, pages, lengths, cfg.attn_scale,
                                            backend=backend)
        return out.astype(q.dtype).reshape(B, 1, H, hd)
    # The portable path: each row's pages gathered in order, one dense [B, K, S, hd] view.
    k, v = (x[:, pages].transpose(1, 0, 2, 3, 4).reshape(B, K, -1, hd) for x in (k, v))
    q = q.reshape(B, T, K, H // K, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, H // K * T, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32,
                        precision=precision(q, k))
    scores = scores.reshape(B, K, H // K, T, -1)
    scores = jnp.where(mask[:, None, None], scores * cfg.attn_scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, H // K * T, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, precision=precision(probs, v))
    out = out.reshape(B, K, H // K, T, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def run_layers(cfg: ModelConfig, layer: Callable, x: jax.Array, layers: Any,
               cache: KVCache) -> tuple:
    """Every decoder layer over x: `layer(carry, (weights, i_g, i_l, sliding))` under `lax.scan`
    or once per layer. The carry is (x, k, v, k_local, v_local): the whole pools, updated in
    place. A layer's i_g / i_l index the pool of its kind; the other is past its stack (the
    scan: a traced kind, the write dropped) or None (unrolled: no write at all)."""
    kinds, rank = _pool_ranks(cfg, cache)
    if not cfg.execution.scan_layers:
        carry = (x, cache.k, cache.v, cache.k_local, cache.v_local)
        for i, lp in enumerate(layers):
            carry, _ = layer(carry, (lp, None if kinds[i] else rank[i],
                                     rank[i] if kinds[i] else None, cfg.sliding_layers[i]))
        return carry
    cache = cache.stacked()  # the scan indexes layers by a traced id
    sliding = jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))
    n_g = cache.k.shape[0]
    i_g = jnp.asarray([n_g if kinds[i] else rank[i] for i in range(cfg.num_layers)], jnp.int32)
    i_l = None
    if cache.split:
        n_l = cache.k_local.shape[0]
        i_l = jnp.asarray([rank[i] if kinds[i] else n_l for i in range(cfg.num_layers)],
                          jnp.int32)
    carry, _ = jax.lax.scan(layer, (x, cache.k, cache.v, cache.k_local, cache.v_local),
                            (layers, i_g, i_l, sliding))
    return carry


def _pool_ranks(cfg: ModelConfig, cache: KVCache) -> tuple[list[bool], list[int]]:
    """Each layer's kind (True: it lives in the local pool) and its index in its pool: with a
    local pool, a sliding layer's rank among the sliding ones and a global layer's among the
    global ones; else its own index."""
    kinds = [bool(s) and cache.split for s in cfg.sliding_layers]
    layers = len(cache.k) + (len(cache.k_local) if cache.split else 0)
    if layers != cfg.num_layers or cache.split != bool(local_layers(cfg)):
        raise ValueError(f"a KV cache of {layers} layers in {1 + cache.split} pools for a model "
                         f"of {cfg.num_layers}: build it with KVCache.init")
    return kinds, [sum(1 for j in range(i) if kinds[j] == kinds[i])
                   for i in range(cfg.num_layers)]
