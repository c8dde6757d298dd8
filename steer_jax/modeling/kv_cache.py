"""The paged KV cache every forward pass reads and writes, and which layers get a pool of their own."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from steer_jax.modeling.config import ModelConfig

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
        layer out of the stack copies it (on the CPU backend, at every decode step)."""
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
