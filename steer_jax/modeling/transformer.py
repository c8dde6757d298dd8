"""The decoder-only transformer both families share: its math, as pure functions over a parameter
pytree.

The parameters are declared in `module.py` (the `flax.nnx` port: shapes, initializers, logical
axes); this file computes with the plain tree that module's state is (`Transformer.params()`), so
the decoder can thread it, with the KV cache (a registered dataclass), through `lax.while_loop`
with no Python object crossing the loop, and nothing carries hidden state between calls. How
the matmuls, the attention and the layer loop run on this machine (`lax.scan` or unrolled, XLA
or steer-jax's CPU kernels) is `cfg.execution`'s, read only by `execution.py`.

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

from steer_jax.modeling import execution
from steer_jax.modeling.config import ModelConfig
from steer_jax.modeling.kv_cache import KVCache

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


def _mlp(h: jax.Array, lp: Params, cfg: ModelConfig) -> jax.Array:
    gate = execution.dense(cfg, h, lp["gate"])
    gate = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return execution.dense(cfg, gate * execution.dense(cfg, h, lp["up"]), lp["down"])


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
    x = execution.embed(cfg, params["embed"], tokens)
    if cfg.embed_scale:  # HF rounds sqrt(hidden) to the weight dtype before multiplying
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(x.dtype)
    layer = functools.partial(_layer, cfg, _shared(cfg, cache, T, x.dtype))
    carry = execution.run_layers(cfg, layer, x, params["layers"], cache)
    x, k_g, v_g, k_l, v_l = carry
    hidden = rms_norm(x, params["final_norm"], cfg)
    return hidden, dataclasses.replace(cache, k=k_g, v=v_g, k_local=k_l, v_local=v_l,
                                       length=cache.length + T)


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


def _shared(cfg: ModelConfig, cache: KVCache, T: int, dtype: Any) -> _Shared:
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
                 if cache.split else None))


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
    q, k, v = (execution.dense(cfg, h, lp[name]) for name in ("q", "k", "v"))
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
        return execution.attention(cfg, q, pool_k, pool_v, i, table, mask, sh.positions)

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
    out = execution.dense(cfg, attn, lp["o"], 2)
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


def logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 next-token logits [..., V] from final hidden states."""
    flat = execution.head(cfg, params, hidden.reshape(-1, hidden.shape[-1]))
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
        canonical = jax.eval_shape(functools.partial(execution.canonical, self.config),
                                   self.params)
        return int(sum(x.size for x in jax.tree.leaves(canonical)))

    @property
    def dtype(self) -> Any:
        return self.params["embed"].dtype

    def logits(self, input_ids: Any) -> jax.Array:
        """Float32 logits [B, T, V] of a plain causal forward over an unpadded batch."""
        return _full_logits(self.params, jnp.asarray(input_ids, jnp.int32), self.config)
