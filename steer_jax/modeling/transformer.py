"""The decoder-only transformer both families share, as pure functions over a parameter pytree.

Why pure functions and not NNX modules: the parameters are a plain dict whose leaves map one to one
onto checkpoint tensors and onto sharding rules, the KV cache is a registered dataclass threaded
through `lax.while_loop` by the decoder, and nothing carries hidden state between calls. Layers are
stacked on a leading axis and run under `lax.scan`, so a 28-layer model compiles as one layer.

Every call goes through the KV cache: a plain causal forward is a prefill into an empty cache of
the sequence's length. Rows hold their tokens at slots 0..length-1 of their pages; the slot index is
the absolute position, which both RoPE and the sliding-window mask read, so a window is correct at
any distance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.modeling import paged_attention, panel_matmul
from steer_jax.modeling.config import ModelConfig

Params = dict[str, Any]


NULL_PAGE = 0  # page 0 of every pool is never handed out: unused page-table entries point at it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A paged KV cache: one pool of fixed-size pages per model, a page table per row.

    Token p of row b lives in page `pages[b, p // page_size]` at offset `p % page_size`, so a
    row holds only the pages it has written and the pool is shared by every row. The pool's
    layout per layer, [kv_heads, pages, page_size, head_dim], is the one JAX's Pallas paged
    attention kernels read. A page-table entry of 0 is the null page: writes meant for slots a
    row does not own (padding, stopped rows) land there, and no query ever sees them, as every
    mask is drawn from absolute positions. Pages are handed out and taken back by
    `steer_jax.decoding.paging`; `init` without a pool size gives every row its own pages up
    front, which is all a one-call user (generate, a forward pass) needs.

    A model with both sliding-window and global layers keeps its sliding layers in a second
    pool (`k_local`, `v_local`) with its own page table and free mask: a page id names a slot
    range in every layer of its pool, so only a pool of windowed layers can give back the pages
    below a row's window (`paging.slide`) while the global layers keep them. Token p then lives
    in `pages_local[b, p // page_size]` while a query can still see it; the columns below hold
    the null page. A model with one kind of layer has no local pool (the fields None): every
    layer lives in `k`, `v`.
    """

    k: jax.Array  # [layers, kv_heads, pages, page_size, head_dim] (the global layers, or all);
    # inside a decode program over unstacked layers, a tuple of per-layer arrays
    v: jax.Array
    pages: jax.Array  # [batch, pages_per_row] int32 page ids, a row's held pages first
    length: jax.Array  # [batch] int32: tokens held by each row; the next write goes to this slot
    free: jax.Array  # [pages] bool: which pool pages no row holds (the null page never is)
    stamp: jax.Array  # [batch] int32: the last call a row took part in (for eviction order)
    k_local: jax.Array | None = None  # [sliding layers, kv_heads, pages_local, page_size, hd]
    v_local: jax.Array | None = None
    pages_local: jax.Array | None = None  # [batch, pages_per_row]: a row's held pages are a
    # run of columns ending at its newest token, those below its window given back
    free_local: jax.Array | None = None  # [pages_local] bool

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype: Any, *,
             page_size: int | None = None, pool: int | None = None,
             pool_local: int | None = None) -> KVCache:
        """Rows of up to `slots` tokens. Without `pool`, every row gets its pages now (pages of
        `page_size` tokens; by default one page a row); with `pool`, a pool of that many pages
        (besides the null page) and empty page tables, to be filled by `paging.reserve`.
        A model with both kinds of layers gets a second pool for its sliding layers, of
        `pool_local` pages (default: as many as the global pool)."""
        size = page_size or slots
        per_row = -(-slots // size)
        local = local_layers(cfg)
        n_global = cfg.num_layers - len(local) if local else cfg.num_layers

        def one_pool(layers: int, n: int | None):
            shape = (layers, cfg.num_kv_heads, (batch * per_row if n is None else n) + 1, size,
                     cfg.head_dim)
            if n is None:  # rows' pages interleaved, as rows growing side by side take them
                pages = 1 + jnp.arange(batch * per_row, dtype=jnp.int32).reshape(per_row,
                                                                                  batch).T
                free = jnp.zeros((shape[2],), bool)
            else:
                pages = jnp.zeros((batch, per_row), jnp.int32)
                free = jnp.ones((shape[2],), bool).at[NULL_PAGE].set(False)
            return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pages, free

        k, v, pages, free = one_pool(n_global, pool)
        zeros = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731 (two buffers: both donated)
        cache = cls(k, v, pages, zeros(), free, zeros())
        if not local:
            return cache
        k_l, v_l, pages_l, free_l = one_pool(len(local), pool if pool_local is None
                                             else pool_local)
        return dataclasses.replace(cache, k_local=k_l, v_local=v_l, pages_local=pages_l,
                                   free_local=free_l)

    @property
    def page_size(self) -> int:
        return (self.k[0] if isinstance(self.k, tuple) else self.k).shape[-2]

    @property
    def slots(self) -> int:
        """Tokens a row can hold: its page table's width in tokens."""
        return self.pages.shape[1] * self.page_size

    @property
    def split(self) -> bool:
        """Whether the sliding layers have a pool of their own."""
        return self.k_local is not None

    def per_layer(self) -> KVCache:
        """The layers as separate arrays, for a program that runs unstacked layers: reading a
        layer out of the stack copies it (on the CPU backend, every decode step, ~6% of one)."""
        out = dataclasses.replace(self, k=tuple(self.k), v=tuple(self.v))
        if self.split:
            out = dataclasses.replace(out, k_local=tuple(self.k_local),
                                      v_local=tuple(self.v_local))
        return out

    def stacked(self) -> KVCache:
        if not isinstance(self.k, tuple):
            return self
        out = dataclasses.replace(self, k=jnp.stack(self.k), v=jnp.stack(self.v))
        if self.split:
            out = dataclasses.replace(out, k_local=jnp.stack(self.k_local),
                                      v_local=jnp.stack(self.v_local))
        return out


def local_layers(cfg: ModelConfig) -> tuple[int, ...]:
    """The layers that keep their KV in a pool of their own (`KVCache.k_local`): the sliding
    ones, where the model has both kinds (with one kind there is nothing to split)."""
    local = tuple(i for i, s in enumerate(cfg.sliding_layers) if s)
    return local if cfg.sliding_window and 0 < len(local) < cfg.num_layers else ()


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters in the steer-jax layout (tests, benchmarks and `jax.eval_shape`)."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, hd, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    keys = iter(jax.random.split(key, 16))

    def normal(*shape: int) -> jax.Array:
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def norm(*shape: int) -> jax.Array:
        return jnp.full(shape, 0.0 if cfg.norm_plus_one else 1.0, dtype)

    layers = dict(attn_norm=norm(L, D), q=normal(L, D, H, hd), k=normal(L, D, K, hd),
                  v=normal(L, D, K, hd), o=normal(L, H, hd, D), mlp_norm=norm(L, D),
                  gate=normal(L, D, F), up=normal(L, D, F), down=normal(L, F, D))
    if cfg.qkv_bias:
        layers.update(q_bias=normal(L, H, hd), k_bias=normal(L, K, hd), v_bias=normal(L, K, hd))
    if cfg.qk_norm:
        layers.update(q_norm=norm(L, hd), k_norm=norm(L, hd))
    if cfg.sandwich_norms:
        layers.update(post_attn_norm=norm(L, D), post_mlp_norm=norm(L, D))
    params: Params = dict(embed=normal(V, D), final_norm=norm(D), layers=layers)
    if not cfg.tie_embeddings:
        params["lm_head"] = normal(V, D)
    if cfg.value_head:
        params["v_head"] = dict(w=normal(D), b=jnp.zeros((), dtype))
    return params


def param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Abstract parameters (`jax.ShapeDtypeStruct`), no memory: the model's parameter tree."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def num_params(cfg: ModelConfig) -> int:
    """Total parameter count; tied embeddings are counted once (they are one tensor)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg))))


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
    positions = cache.length[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    rope_g = _rope_tables(cfg, cfg.rope_global, positions, x.dtype)
    rope_l = _rope_tables(cfg, cfg.rope_local, positions, x.dtype)
    slots = jnp.arange(cache.slots, dtype=jnp.int32)
    distance = positions[:, :, None] - slots[None, None, :]  # [B, T, S]
    causal = distance >= 0
    windowed = causal & (distance < (cfg.sliding_window or cache.slots + 1))
    where_g = _write_at(cache.pages, cache.free, positions, cache.page_size)
    where_l = (_write_at(cache.pages_local, cache.free_local, positions, cache.page_size)
               if cache.split else None)
    heads = jnp.arange(cfg.num_kv_heads)[None, None, :]
    # The CPU kernels run where `load_model` packed the weights for them (float32, one CPU).
    cpu_kernel = panel_matmul.is_packed(params)
    # Each layer's index in its pool: with a local pool, a sliding layer's rank among the
    # sliding ones and a global layer's among the global ones; else its own index.
    kinds = [bool(s) and cache.split for s in cfg.sliding_layers]
    layers = len(cache.k) + (len(cache.k_local) if cache.split else 0)
    if layers != cfg.num_layers or cache.split != bool(local_layers(cfg)):
        raise ValueError(f"a KV cache of {layers} layers in {1 + cache.split} pools for a model "
                         f"of {cfg.num_layers}: build it with KVCache.init")
    rank = [sum(1 for j in range(i) if kinds[j] == kinds[i]) for i in range(cfg.num_layers)]

    def put(c, new, i, where):  # new [B, T, K, hd] into layer i of pool c (a tuple, or stacked)
        page, offset = where
        at = (heads, page, offset)
        new = new.astype(c[0].dtype if isinstance(c, tuple) else c.dtype)
        if isinstance(c, tuple):  # per-layer arrays (`KVCache.per_layer`), i a Python int
            return (*c[:i], c[i].at[at].set(new, mode="drop"), *c[i + 1:])
        return c.at[(i, *at)].set(new, mode="drop")  # an index past the stack: dropped

    def attend(q, pool_k, pool_v, i, table, mask):
        return _attention(q, pool_k[i], pool_v[i], table, mask, positions, cfg, cpu_kernel)

    def layer(carry, xs):
        # The whole pools ride in the carry and are updated in place: passing per-layer slices
        # as scan inputs/outputs would rewrite every layer's pool on every decode step.
        x, k_g, v_g, k_l, v_l = carry
        lp, i_g, i_l, sliding = xs
        h = rms_norm(x, lp["attn_norm"], cfg)
        q, k, v = _dense(h, lp["q"]), _dense(h, lp["k"]), _dense(h, lp["v"])
        if cfg.qkv_bias:
            q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], cfg), rms_norm(k, lp["k_norm"], cfg)
        cos = jnp.where(sliding, rope_l[0], rope_g[0])
        sin = jnp.where(sliding, rope_l[1], rope_g[1])
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        # A layer writes the pool of its kind; the other pool's index is past its stack (the
        # scan: a traced kind; the write is dropped) or None (unrolled: no write at all).
        if i_g is not None:
            k_g, v_g = put(k_g, k, i_g, where_g), put(v_g, v, i_g, where_g)
        if i_l is not None:
            k_l, v_l = put(k_l, k, i_l, where_l), put(v_l, v, i_l, where_l)
        if i_l is None:  # no local pool, or an unrolled global layer
            attn = attend(q, k_g, v_g, i_g, cache.pages, jnp.where(sliding, windowed, causal))
        elif i_g is None:  # an unrolled sliding layer
            attn = attend(q, k_l, v_l, i_l, cache.pages_local, windowed)
        else:  # scanned over both kinds: attention over the pool of this layer's kind
            attn = jax.lax.cond(
                sliding, lambda: attend(q, k_l, v_l, jnp.minimum(i_l, len(k_l) - 1),
                                        cache.pages_local, windowed),
                lambda: attend(q, k_g, v_g, jnp.minimum(i_g, len(k_g) - 1), cache.pages,
                               causal))
        out = _dense(attn, lp["o"], 2)
        if cfg.sandwich_norms:
            out = rms_norm(out, lp["post_attn_norm"], cfg)
        x = x + out
        out = _mlp(rms_norm(x, lp["mlp_norm"], cfg), lp, cfg)
        if cfg.sandwich_norms:
            out = rms_norm(out, lp["post_mlp_norm"], cfg)
        return (x + out, k_g, v_g, k_l, v_l), None

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
