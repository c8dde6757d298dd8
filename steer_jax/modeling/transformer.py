"""The decoder-only transformer both families share: its math, as pure functions over a parameter
pytree.

The parameters are declared in `module.py` (the `flax.nnx` port: shapes, initializers, logical
axes); this file computes with the plain tree that module's state is (`Transformer.params()`), so
the decoder can thread it, with the KV cache (a registered dataclass), through `lax.while_loop`
with no Python object crossing the loop, and nothing carries hidden state between calls. Layers
are stacked on a leading axis and run under `lax.scan`, so a 28-layer model compiles as one layer.

Every call goes through the KV cache: a plain causal forward is a prefill into an empty cache of
the sequence's length. Rows hold their tokens at slots 0..length-1 of their pages; the slot index is
the absolute position, which both RoPE and the sliding-window mask read, so a window is correct at
any distance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.modeling import paged_attention, panel_matmul
from steer_jax.modeling.config import ModelConfig
from steer_jax.modeling.kv_cache import KVCache, local_layers

Params = dict[str, Any]


def rms_norm(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    if cfg.norm_plus_one:  # Gemma scales in float32, then casts
        return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * normed.astype(x.dtype)  # Qwen2 casts first, then scales


def _rope_tables(cfg: ModelConfig, rope: Any, positions: jax.Array, dtype: Any):
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope.inv_freq(cfg.head_dim))
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _precision(*operands: jax.Array) -> jax.lax.Precision:
    """A float32 model computes in float32: XLA's DEFAULT lets a GPU run float32 dots in TF32
    (~5e-4 relative error, measured against transformers on an H200) and a TPU in bfloat16 passes,
    which a float32 config does not ask for. bfloat16 operands keep DEFAULT; on a CPU both are
    the same program."""
    f32 = any(x.dtype == jnp.float32 for x in operands)
    return jax.lax.Precision.HIGHEST if f32 else jax.lax.Precision.DEFAULT


def pallas_backend(cfg: ModelConfig, dtype: Any, page_size: int, pages_per_row: int) -> str | None:
    """The backend whose Pallas paged kernel runs this model's decode attention, or None (the
    XLA path). Decided per model: inside a scan a layer's kind is not known when tracing, and
    the kernels have no sliding window, so a model with windowed layers keeps the XLA path."""
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    # A float32 model computes in float32 (`_precision`); the kernels' dots run in TF32 on a GPU
    # and bfloat16 on a TPU.
    if backend not in paged_attention.BACKENDS or any(cfg.sliding_layers) or \
            jnp.dtype(dtype) == jnp.float32:
        return None
    why_not = paged_attention.pallas_applies(backend, cfg.num_heads, cfg.num_kv_heads,
                                             cfg.head_dim, page_size, pages_per_row, dtype)
    return backend if why_not is None else None


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, pages: jax.Array, mask: jax.Array,
               positions: jax.Array, cfg: ModelConfig, cpu_kernel: bool = False) -> jax.Array:
    """q [B, T, H, hd] at `positions` [B, T] against the rows' pages of one layer's pool k, v
    [K, N, P, hd]; pages [B, M] (the rows' page tables), mask [B, T, M * P] over their slots.

    One seam, three ways: the CPU kernel (decode_attention.cc) for a decode step where the
    weights are packed for it, JAX's Pallas paged kernel for a decode step on a TPU or GPU where
    it applies, and everywhere else the portable XLA path over gathered pages."""
    B, T, H, hd = q.shape
    K = cfg.num_kv_heads
    if cpu_kernel and T == 1:  # a decode step on a CPU: one kernel call, not ~8 small ops
        out = panel_matmul.decode_attention(q.reshape(B, K, H // K, hd), k, v, pages,
                                            mask[:, 0], cfg.attn_scale)
        return out.astype(q.dtype).reshape(B, 1, H, hd)
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
                        precision=_precision(q, k))
    scores = scores.reshape(B, K, H // K, T, -1)
    scores = jnp.where(mask[:, None, None], scores * cfg.attn_scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, H // K * T, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, precision=_precision(probs, v))
    out = out.reshape(B, K, H // K, T, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _dense(x: jax.Array, w: jax.Array | panel_matmul.Panels, n_in: int = 1) -> jax.Array:
    """x's last `n_in` axes contracted with w's first ones, as ONE 2-D matmul over all tokens.

    Why not an einsum over [B, T, ...]: its weight gradient contracts over two axes (batch and
    time), which XLA's CPU backend runs several times slower than the same product on [B*T, in].
    """
    lead = x.shape[: x.ndim - n_in]
    if isinstance(w, panel_matmul.Panels):  # float32 weights on a CPU (`load_model`)
        out = panel_matmul.matmul(x.reshape(-1, math.prod(w.in_shape)), w)
        return out.reshape(*lead, *w.out_shape)
    inner = w.shape[:n_in]
    out = jnp.matmul(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1),
                     precision=_precision(x, w))
    return out.reshape(*lead, *w.shape[n_in:])


def _mlp(h: jax.Array, lp: Params, cfg: ModelConfig) -> jax.Array:
    gate = _dense(h, lp["gate"])
    gate = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return _dense(gate * _dense(h, lp["up"]), lp["down"])


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Append `tokens` [B, T] to every row of `cache`; return final-norm hidden states [B, T, D].

    The new tokens take slots length..length+T-1 of their row. The returned cache's length grows
    by T for every row; a caller that appended padding moves `length` back itself (the padded
    slots are then overwritten by later writes before any query can see them). Writes past the
    last slot are dropped, so a caller must check capacity before calling; slots in pages the
    row does not hold go to the null page.
    """
    B, T = tokens.shape
    x = panel_matmul.embed(params["embed"], tokens)
    if cfg.embed_scale:  # HF rounds sqrt(hidden) to the weight dtype before multiplying
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(x.dtype)
    kinds, rank = _pool_ranks(cfg, cache)
    layer = functools.partial(_layer, cfg, _shared(params, cfg, cache, T, x.dtype))
    if isinstance(params["layers"], (list, tuple)):
        # Unstacked layers (`unstack_layers`): a Python loop reads each weight where it lies.
        carry = (x, cache.k, cache.v, cache.k_local, cache.v_local)
        for i, lp in enumerate(params["layers"]):
            carry, _ = layer(carry, (lp, None if kinds[i] else rank[i],
                                     rank[i] if kinds[i] else None, cfg.sliding_layers[i]))
    else:
        cache = cache.stacked()  # the scan indexes layers by a traced id
        sliding = jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))
        n_g = cache.k.shape[0]
        i_g = jnp.asarray([n_g if kinds[i] else rank[i] for i in range(cfg.num_layers)],
                          jnp.int32)
        i_l = None
        if cache.split:
            n_l = cache.k_local.shape[0]
            i_l = jnp.asarray([rank[i] if kinds[i] else n_l for i in range(cfg.num_layers)],
                              jnp.int32)
        carry, _ = jax.lax.scan(layer, (x, cache.k, cache.v, cache.k_local, cache.v_local),
                                (params["layers"], i_g, i_l, sliding))
    x, k_g, v_g, k_l, v_l = carry
    hidden = rms_norm(x, params["final_norm"], cfg)
    return hidden, dataclasses.replace(cache, k=k_g, v=v_g, k_local=k_l, v_local=v_l,
                                       length=cache.length + T)


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


class _Shared(NamedTuple):
    """What every layer of one forward pass reads: positions, RoPE tables, masks, write sites."""

    cache: KVCache
    positions: jax.Array  # [B, T] absolute positions of the new tokens
    rope_g: tuple[jax.Array, jax.Array]
    rope_l: tuple[jax.Array, jax.Array]
    causal: jax.Array  # [B, T, S]
    windowed: jax.Array  # [B, T, S]
    where_g: tuple[jax.Array, jax.Array]  # (page, offset) of each new token, global pool
    where_l: tuple[jax.Array, jax.Array] | None
    cpu_kernel: bool


def _shared(params: Params, cfg: ModelConfig, cache: KVCache, T: int, dtype: Any) -> _Shared:
    positions = cache.length[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    slots = jnp.arange(cache.slots, dtype=jnp.int32)
    distance = positions[:, :, None] - slots[None, None, :]  # [B, T, S]
    causal = distance >= 0
    return _Shared(
        cache=cache, positions=positions,
        rope_g=_rope_tables(cfg, cfg.rope_global, positions, dtype),
        rope_l=_rope_tables(cfg, cfg.rope_local, positions, dtype),
        causal=causal, windowed=causal & (distance < (cfg.sliding_window or cache.slots + 1)),
        where_g=_write_at(cache.pages, cache.free, positions, cache.page_size),
        where_l=(_write_at(cache.pages_local, cache.free_local, positions, cache.page_size)
                 if cache.split else None),
        # The CPU kernels run where `load_model` packed the weights for them (float32, one CPU).
        cpu_kernel=panel_matmul.is_packed(params))


def _put(c: Any, new: jax.Array, i: Any, where: tuple[jax.Array, jax.Array]) -> Any:
    """new [B, T, K, hd] into layer i of pool c (a tuple of per-layer arrays, or stacked)."""
    page, offset = where
    at = (jnp.arange(new.shape[2])[None, None, :], page, offset)
    new = new.astype(c[0].dtype if isinstance(c, tuple) else c.dtype)
    if isinstance(c, tuple):  # per-layer arrays (`KVCache.per_layer`), i a Python int
        return (*c[:i], c[i].at[at].set(new, mode="drop"), *c[i + 1:])
    return c.at[(i, *at)].set(new, mode="drop")  # an index past the stack: dropped


def _layer(cfg: ModelConfig, sh: _Shared, carry: tuple, xs: tuple) -> tuple[tuple, None]:
    """One decoder layer; a `lax.scan` body over stacked layers, or called once per layer.

    The whole pools ride in the carry and are updated in place: passing per-layer slices as
    scan inputs/outputs would rewrite every layer's pool on every decode step.
    """
    x, k_g, v_g, k_l, v_l = carry
    lp, i_g, i_l, sliding = xs
    h = rms_norm(x, lp["attn_norm"], cfg)
    q, k, v = _dense(h, lp["q"]), _dense(h, lp["k"]), _dense(h, lp["v"])
    if cfg.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg), rms_norm(k, lp["k_norm"], cfg)
    cos = jnp.where(sliding, sh.rope_l[0], sh.rope_g[0])
    sin = jnp.where(sliding, sh.rope_l[1], sh.rope_g[1])
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    # A layer writes the pool of its kind; the other pool's index is past its stack (the scan:
    # a traced kind; the write is dropped) or None (unrolled: no write at all).
    if i_g is not None:
        k_g, v_g = _put(k_g, k, i_g, sh.where_g), _put(v_g, v, i_g, sh.where_g)
    if i_l is not None:
        k_l, v_l = _put(k_l, k, i_l, sh.where_l), _put(v_l, v, i_l, sh.where_l)

    def attend(pool_k, pool_v, i, table, mask):
        return _attention(q, pool_k[i], pool_v[i], table, mask, sh.positions, cfg,
                          sh.cpu_kernel)

    if i_l is None:  # no local pool, or an unrolled global layer
        attn = attend(k_g, v_g, i_g, sh.cache.pages, jnp.where(sliding, sh.windowed, sh.causal))
    elif i_g is None:  # an unrolled sliding layer
        attn = attend(k_l, v_l, i_l, sh.cache.pages_local, sh.windowed)
    else:  # scanned over both kinds: attention over the pool of this layer's kind
        attn = jax.lax.cond(
            sliding, lambda: attend(k_l, v_l, jnp.minimum(i_l, len(k_l) - 1),
                                    sh.cache.pages_local, sh.windowed),
            lambda: attend(k_g, v_g, jnp.minimum(i_g, len(k_g) - 1), sh.cache.pages,
                           sh.causal))
    out = _dense(attn, lp["o"], 2)
    if cfg.sandwich_norms:
        out = rms_norm(out, lp["post_attn_norm"], cfg)
    x = x + out
    out = _mlp(rms_norm(x, lp["mlp_norm"], cfg), lp, cfg)
    if cfg.sandwich_norms:
        out = rms_norm(out, lp["post_mlp_norm"], cfg)
    return (x + out, k_g, v_g, k_l, v_l), None


def _write_at(pages: jax.Array, free: jax.Array, positions: jax.Array,
              size: int) -> tuple[jax.Array, jax.Array]:
    """(page [B, T, 1], offset [B, T, 1]) where each new token goes in a pool with page table
    `pages`: its row's page for that position, past the table nowhere (an index past the pool
    is dropped by the scatter)."""
    width = pages.shape[1]
    column = positions // size
    page = jnp.take_along_axis(pages, jnp.minimum(column, width - 1), axis=1)
    page = jnp.where(column < width, page, free.shape[0])[:, :, None]
    return page, (positions % size)[:, :, None]


def unstack_layers(params: Params) -> Params:
    """Per-layer parameter dicts instead of stacked arrays, for an unrolled forward.

    `lax.scan` over stacked layers compiles one layer and suits TPUs, but on the CPU backend each
    iteration copies its layer's weights out of the stack before the matmuls read them, which
    costs a memory-bound decode step about a sixth of its time (benchmarks/decode.py).
    """
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 next-token logits [..., V] from final hidden states."""
    # Both heads are [V, D], contracted over D: XLA's CPU dot reads a [D, V] operand of a
    # vocabulary's width many times slower (benchmarks/RESULTS.md).
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    if isinstance(head, panel_matmul.Panels):
        flat = panel_matmul.matmul(hidden.reshape(-1, hidden.shape[-1]), head)
    else:  # 2-D: see `_dense`
        flat = jax.lax.dot_general(hidden.reshape(-1, hidden.shape[-1]), head,
                                   (((1,), (1,)), ((), ())), precision=_precision(hidden, head),
                                   preferred_element_type=jnp.float32)
    out = flat.reshape(*hidden.shape[:-1], flat.shape[-1])
    if cfg.final_logit_softcap:
        out = jnp.tanh(out / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def _full_logits(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    hidden, _ = forward(params, cfg, tokens, cache)
    return logits(params, cfg, hidden)


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: its config, its parameters, and where it came from."""

    config: ModelConfig
    params: Params
    path: str | None = None

    @property
    def num_params(self) -> int:
        leaves = jax.tree.leaves(self.params, is_leaf=panel_matmul.is_panels)
        return int(sum(x.size for x in leaves))  # a Panels' size leaves out its padding

    @property
    def dtype(self) -> Any:
        return self.params["embed"].dtype

    def logits(self, input_ids: Any) -> jax.Array:
        """Float32 logits [B, T, V] of a plain causal forward over an unpadded batch."""
        return _full_logits(self.params, jnp.asarray(input_ids, jnp.int32), self.config)
