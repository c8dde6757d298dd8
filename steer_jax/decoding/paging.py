"""Page bookkeeping for the paged KV cache, on device: reserve, release, slide, evict.

A row's pages in the global layers' pool are a prefix of its page table (pages are added at the
end and taken back from the end), so a row of n tokens holds ceil(n / page_size) of them; in the
sliding-window layers' pool (Gemma) the pages below its window are given back too (`slide`), so
there it holds a stretch of columns, the window's. Pages are handed out lowest free id first, to rows in row order: the same requests get the
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

from steer_jax.modeling.kv_cache import NULL_PAGE, KVCache

_ALL = jnp.iinfo(jnp.int32).max  # "keep every page"


def pages_for(tokens: jax.Array, page_size: int) -> jax.Array:
    return -(-jnp.maximum(tokens, 0) // page_size)


def held(cache: KVCache, local: bool = False) -> jax.Array:
    """[B] pages each row holds (of the sliding layers' pool with `local`)."""
    pages = cache.pages_local if local else cache.pages
    return jnp.sum(pages != NULL_PAGE, axis=1).astype(jnp.int32)


def _pools(cache: KVCache) -> tuple[tuple[str, str], ...]:
    """(page table, free mask) field names of each pool the cache has."""
    return (("pages", "free"),) + ((("pages_local", "free_local"),) if cache.split else ())


def new_pages(pages: jax.Array, length: jax.Array, upto: jax.Array, rows: jax.Array,
              page_size: int) -> jax.Array:
    """[B, M] which columns of page table `pages` the `rows` take pages for, to write slots
    length..upto-1: those from the one the next write goes to, below pages_for(upto), that
    hold no page yet (within the table). The columns below a row's next write are written
    already, or were given back as no query sees them any more (`slide`)."""
    col = jnp.arange(pages.shape[1])[None, :]
    hi = pages_for(upto, page_size)[:, None]
    return (rows[:, None] & (col >= (length // page_size)[:, None]) & (col < hi)
            & (pages == NULL_PAGE))


def _take(pages: jax.Array, free: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Lowest free ids first, to rows in row order and columns in order: the same requests get
    # the same pages on every host.
    free_ids = jnp.nonzero(free, size=free.shape[0], fill_value=NULL_PAGE)[0]
    rank = jnp.clip(jnp.cumsum(new.reshape(-1)).reshape(new.shape) - 1, 0,
                    free_ids.shape[0] - 1)
    pages = jnp.where(new, free_ids[rank], pages)
    taken = jnp.where(new, pages, free.shape[0])  # out of bounds: dropped
    return pages, free.at[taken].set(False, mode="drop")


def reserve(cache: KVCache, upto: jax.Array, rows: jax.Array) -> KVCache:
    """The `rows` [B] get pages for their slots below `upto` [B] (within their page tables), in
    every pool.

    The caller has made sure the pools have them (`plan`'s count and `evict`); were one short,
    the rows past the last free page would get the null page, so this is never called short.
    """
    changes = {}
    for table, mask in _pools(cache):
        pages, free = getattr(cache, table), getattr(cache, mask)
        new = new_pages(pages, cache.length, upto, rows, cache.page_size)
        changes[table], changes[mask] = _take(pages, free, new)
    return dataclasses.replace(cache, **changes)


def _give_back(cache: KVCache, table: str, mask: str, drop: jax.Array) -> dict[str, jax.Array]:
    pages, free = getattr(cache, table), getattr(cache, mask)
    drop = drop & (pages != NULL_PAGE)
    freed = jnp.where(drop, pages, free.shape[0])
    return {table: jnp.where(drop, NULL_PAGE, pages),
            mask: free.at[freed].set(True, mode="drop")}


def release(cache: KVCache, keep: jax.Array) -> KVCache:
    """Each row keeps the pages for its first `keep` [B] tokens; the rest go back to the pool
    (in every pool)."""
    col = jnp.arange(cache.pages.shape[1])[None, :]
    drop = col >= pages_for(keep, cache.page_size)[:, None]
    changes = {}
    for table, mask in _pools(cache):
        changes.update(_give_back(cache, table, mask, drop))
    return dataclasses.replace(cache, **changes)


def window_start(floor: jax.Array, window: int, page_size: int) -> jax.Array:
    """[B] the first page-table column a query at position `floor` [B] or later still sees
    through a window of `window` tokens (it sees keys > position - window)."""
    return jnp.maximum(floor - window + 1, 0) // page_size


def slide(cache: KVCache, floor: jax.Array, window: int | None) -> KVCache:
    """The sliding layers' pool takes back the pages no query at position `floor` [B] or later
    sees. The caller guarantees that no row is rolled back or read below `floor` afterwards
    (steer: a row's length and its trace's newest token at a round boundary). No-op for a cache
    without a local pool."""
    if not cache.split or window is None:
        return cache
    col = jnp.arange(cache.pages.shape[1])[None, :]
    drop = col < window_start(jnp.minimum(floor, cache.length), window, cache.page_size)[:, None]
    return dataclasses.replace(cache, **_give_back(cache, "pages_local", "free_local", drop))


def readable_from(cache: KVCache) -> jax.Array:
    """[B] the first position whose KV every layer still holds: 0 but where the sliding layers
    gave pages back (`slide`); a row's length where it holds none."""
    if not cache.split:
        return jnp.zeros_like(cache.length)
    held = cache.pages_local != NULL_PAGE
    first = jnp.argmax(held, axis=1).astype(jnp.int32) * cache.page_size
    return jnp.where(jnp.any(held, axis=1), first, cache.length)


def trim(cache: KVCache) -> KVCache:
    """Pages past each row's length go back (a call reserved room for a step it did not use)."""
    return release(cache, cache.length)


def rollback(cache: KVCache, length: jax.Array) -> KVCache:
    """Cut rows back to `length` tokens and return the pages past it. The caller makes sure the
    sliding layers still hold the window of the new length (`sampler.rollback` checks)."""
    return trim(dataclasses.replace(cache, length=jnp.minimum(cache.length, length)))


def drop_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """`rows` hold nothing any more: their pages go back and their length is 0."""
    cache = release(cache, jnp.where(rows, 0, _ALL))
    return dataclasses.replace(cache, length=jnp.where(rows, 0, cache.length))


def evict(cache: KVCache, keep: jax.Array, short: jax.Array) -> tuple[KVCache, jax.Array]:
    """Take back at least `short` pages from rows outside `keep`, most recently used first:
    `short` a count for the global pool, or [2] counts (global, local) for a cache with a
    local pool, which evicts until both are met.

    Returns the cache and which rows were evicted. The caller knows the others hold enough.
    """
    short = jnp.atleast_1d(jnp.asarray(short, jnp.int32))
    have = jnp.stack([held(cache, local) for local, _ in zip((False, True), _pools(cache))])
    candidate = ~keep & (have[0] > 0)
    order = jnp.argsort(jnp.where(candidate, -cache.stamp, jnp.iinfo(jnp.int32).max),
                        stable=True)
    before = jnp.cumsum(have[:, order], axis=1) - have[:, order]  # [pools, B]
    covered = jnp.all(before >= short[: have.shape[0], None], axis=0)
    chosen = jnp.zeros_like(keep).at[order].set(candidate[order] & ~covered)
    return drop_rows(cache, chosen), chosen


def touch(cache: KVCache, rows: jax.Array) -> KVCache:
    """Mark `rows` as used by the call now ending (the eviction order's clock)."""
    return dataclasses.replace(cache, stamp=jnp.where(rows, jnp.max(cache.stamp) + 1,
                                                      cache.stamp))
