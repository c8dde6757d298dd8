"""Page bookkeeping for the paged KV cache, on device: reserve, release, evict.

A row's held pages are a prefix of its page table (pages are added at the end and taken back from
the end), so `held = count of non-null entries` and a row of n tokens needs ceil(n / page_size)
pages. Pages are handed out lowest free id first, to rows in row order: the same requests get the
same pages whatever the host, so a run's bookkeeping is as deterministic as its tokens.

Eviction takes back every page of the rows chosen, which then hold nothing (length 0): the engine
reads their tokens again when they are next scheduled (the catch-up read it already has for a
model that is behind). The rows chosen are those that took part in a call most recently: a round
walks its sub-batches in order, so the rows that just ran are the ones needed last, which for a
cyclic walk over more traces than the pool holds keeps the most of them resident (an LRU choice
would evict each sub-batch just before it is needed again).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from steer_jax.modeling.transformer import NULL_PAGE, KVCache

_ALL = jnp.iinfo(jnp.int32).max  # "keep every page"


def pages_for(tokens: jax.Array, page_size: int) -> jax.Array:
    return -(-jnp.maximum(tokens, 0) // page_size)


def held(cache: KVCache) -> jax.Array:
    """[B] pages each row holds."""
    return jnp.sum(cache.pages != NULL_PAGE, axis=1).astype(jnp.int32)


def reserve(cache: KVCache, upto: jax.Array, rows: jax.Array) -> KVCache:
    """The `rows` [B] get pages for their slots below `upto` [B] (within their page tables).

    The caller has made sure the pool has them (`plan`'s count and `evict`); were it short, the
    rows past the last free page would get the null page, so this is never called short.
    """
    width = cache.pages.shape[1]
    have = held(cache)
    need = jnp.where(rows, jnp.clip(pages_for(upto, cache.page_size), 0, width) - have, 0)
    need = jnp.maximum(need, 0)
    first = jnp.cumsum(need) - need  # each row's first rank among the free pages
    free_ids = jnp.nonzero(cache.free, size=cache.free.shape[0], fill_value=NULL_PAGE)[0]
    col = jnp.arange(width)[None, :]
    new = (col >= have[:, None]) & (col < (have + need)[:, None])
    rank = jnp.clip(first[:, None] + col - have[:, None], 0, free_ids.shape[0] - 1)
    pages = jnp.where(new, free_ids[rank], cache.pages)
    taken = jnp.where(new, pages, cache.free.shape[0])  # out of bounds: dropped
    free = cache.free.at[taken].set(False, mode="drop")
    return dataclasses.replace(cache, pages=pages, free=free)


def release(cache: KVCache, keep: jax.Array) -> KVCache:
    """Each row keeps the pages for its first `keep` [B] tokens; the rest go back to the pool."""
    col = jnp.arange(cache.pages.shape[1])[None, :]
    drop = (col >= pages_for(keep, cache.page_size)[:, None]) & (cache.pages != NULL_PAGE)
    freed = jnp.where(drop, cache.pages, cache.free.shape[0])
    return dataclasses.replace(cache, pages=jnp.where(drop, NULL_PAGE, cache.pages),
                               free=cache.free.at[freed].set(True, mode="drop"))


def trim(cache: KVCache) -> KVCache:
    """Pages past each row's length go back (a call reserved room for a step it did not use)."""
    return release(cache, cache.length)


def rollback(cache: KVCache, length: jax.Array) -> KVCache:
    """Cut rows back to `length` tokens and return the pages past it."""
    return trim(dataclasses.replace(cache, length=jnp.minimum(cache.length, length)))


def drop_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """`rows` hold nothing any more: their pages go back and their length is 0."""
    cache = release(cache, jnp.where(rows, 0, _ALL))
    return dataclasses.replace(cache, length=jnp.where(rows, 0, cache.length))


def evict(cache: KVCache, keep: jax.Array, short: jax.Array) -> tuple[KVCache, jax.Array]:
    """Take back at least `short` pages from rows outside `keep`, most recently used first.

    Returns the cache and which rows were evicted. The caller knows the others hold enough.
    """
    have = held(cache)
    candidate = ~keep & (have > 0)
    order = jnp.argsort(jnp.where(candidate, -cache.stamp, jnp.iinfo(jnp.int32).max),
                        stable=True)
    before = jnp.cumsum(have[order]) - have[order]
    chosen = jnp.zeros_like(keep).at[order].set(candidate[order] & (before < short))
    return drop_rows(cache, chosen), chosen


def touch(cache: KVCache, rows: jax.Array) -> KVCache:
    """Mark `rows` as used by the call now ending (the eviction order's clock)."""
    return dataclasses.replace(cache, stamp=jnp.where(rows, jnp.max(cache.stamp) + 1,
                                                      cache.stamp))
