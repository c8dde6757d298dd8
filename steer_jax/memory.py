"""Device memory of paged KV caches: what one device holds, what is left for pages, how many
traces fit. Pure arithmetic over configs (weights are shapes from `jax.eval_shape`, never loaded),
so `steer-jax plan` (steer_jax/plan.py) and the runner's pool sizing agree on every figure.

The layout this models: each model has one pool of fixed-size pages, `page_size` tokens each,
stored per layer as [num_kv_heads, pages, page_size, head_dim] for k and for v, stacked over all
layers, so one page id names the same slot range in every layer. Page 0 is a null page that is
never allocated (page tables point unused entries at it), so N usable pages cost N + 1 pages.
A trace of n tokens holds ceil(n / page_size) pages of each model, nothing ahead. A model's call
on a set of rows reserves, for those rows only and only during the call, pages up to
n + `max_step_tokens`, and the pages a step did not use go back after the call. The engine
(`calls._plan`) takes a call's rows in order while their new pages fit the free ones, with no
eviction (the round is cut into more calls), as long as a call holds at least an eighth of its
rows; else it evicts traces outside the call. So R traces stay resident through a round when
each pool holds R * pages(n) + ceil(R / 8) * (pages a call adds to a row). The pools are
replicated over a mesh's 'data' axis and split over 'model' along KV heads where the head count
divides that axis (the rule `_spec` in `steer_jax.distributed` applies to every tensor), so all
figures here are for one device.

Sliding-window layers (Gemma 3: 5 of every 6) have a pool of their own where a model has both
kinds (`KVCache.k_local`): a page id there covers only the sliding layers, so they give back the
pages below a trace's window at every round boundary (`paging.slide`) and hold about
window / page_size + 1 pages a trace however long it grows, while the global layers hold them all.
Such a model has two pools, each sized to hold the same traces as every other pool; a
figure "per pool" below is one of them, and `trace_pages` says what a trace holds in each.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from steer_jax.distributed import RULES, _param_axes
from steer_jax.modeling.config import ModelConfig
from steer_jax.modeling.kv_cache import local_layers
from steer_jax.modeling.module import param_shapes

DEFAULT_PAGE_SIZE = 64
DENSE_ROUND = 64  # the dense layout rounded its slots up to a multiple of this
MEMORY_FRACTION = 0.9  # the rest is for activations, the logits of a step, compiled programs
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '16GiB', '1.5TB' or a plain byte count -> bytes (GB is 10^9, GiB 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write a number and a unit, "
                         "e.g. 80GiB, 141GB or 16GiB (KB/MB/GB/TB: powers of 1000; "
                         "KiB/MiB/GiB/TiB: powers of 1024)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive, e.g. 80GiB")
    return value


def check_page_size(value: Any) -> int:
    """`cache.page_size` as a positive int, or a ValueError that names the key."""
    if value is None:
        return DEFAULT_PAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cache.page_size must be a positive integer (tokens per KV page, "
                         f"default {DEFAULT_PAGE_SIZE}), got {value!r}")
    return value


def _itemsize(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


def _split(size: int, shards: int) -> int:
    """One device's part of a dimension split over the 'model' axis: whole where it does not
    divide, as `distributed._spec` replicates such a dimension."""
    return size // shards if size % shards == 0 else size


def kv_bytes_per_token(cfg: ModelConfig, dtype: Any, model_shards: int = 1) -> int:
    """k + v bytes of one token over all layers, on one device."""
    heads = _split(cfg.num_kv_heads, model_shards)
    return 2 * cfg.num_layers * heads * cfg.head_dim * _itemsize(dtype)


def page_bytes(cfg: ModelConfig, dtype: Any, page_size: int, model_shards: int = 1,
               local: bool = False) -> int:
    """Bytes of one page (k and v of `page_size` tokens in every layer of its pool: the sliding
    layers' with `local`, else the others, or all where the model has one pool) on one
    device."""
    n_local = len(local_layers(cfg))
    layers = n_local if local else cfg.num_layers - n_local
    return page_size * kv_bytes_per_token(cfg, dtype, model_shards) * layers // cfg.num_layers


def pools_of(cfg: ModelConfig) -> tuple[bool, ...]:
    """The pools a model keeps, as `local` flags: (False,) or (False, True)."""
    return (False, True) if local_layers(cfg) else (False,)


def layer_windows(cfg: ModelConfig) -> tuple[int | None, ...]:
    """Each layer's attention window in tokens (None: global), for a paging rule that frees
    what a sliding window no longer sees."""
    return tuple(cfg.sliding_window if s else None for s in cfg.sliding_layers)


def trace_pages(cfg: ModelConfig, tokens: int, page_size: int, local: bool = False) -> int:
    """Pages of one of `cfg`'s pools (the sliding layers' with `local`) that a trace holding
    `tokens` tokens holds at a round boundary.

    The global layers hold every token. The sliding layers' pool holds the pages from the one
    that a query at the trace's newest token (t = tokens - 1, which a discarded step may roll
    back to) still sees, t - window + 1, on: `paging.slide` gave back those below.
    """
    pages = max(1, -(-tokens // page_size))  # a trace holds a page from its first token
    window = cfg.sliding_window if local else None
    if not window:
        return pages
    return pages - max(tokens - window, 0) // page_size


def call_pages(cfg: ModelConfig, tokens: int, page_size: int, max_step_tokens: int) -> int:
    """Pages a row of `tokens` tokens takes on top of those it holds while a call that may write
    `max_step_tokens` more runs (given back after it): pages(tokens + max_step_tokens) -
    pages(tokens): ceil(max_step_tokens / page_size) or one less, by the room left in the last
    page the row holds. The same in either pool: a call gives nothing back before it ends."""
    return (trace_pages(cfg, tokens + max_step_tokens, page_size)
            - trace_pages(cfg, tokens, page_size))


def weight_bytes(cfg: ModelConfig, dtype: Any, model_shards: int = 1) -> int:
    """Bytes of the weights on the most loaded device of a mesh with `model_shards` devices on
    its 'model' axis, from the parameter shapes (no weights are loaded or allocated).

    Each tensor is split along the dims `distributed.RULES` maps to 'model' where the size
    divides, else kept whole, as `distributed.param_shardings` places them; the split is even,
    so every device of the axis holds the same bytes.
    """
    shapes = param_shapes(cfg, dtype)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        _, axes = _param_axes(path)
        shard = [_split(size, model_shards) if RULES.get(a) == "model" else size
                 for size, a in zip(leaf.shape, axes)]
        total += math.prod(shard) * _itemsize(dtype)
    return total


def dense_trace_bytes(cfg: ModelConfig, dtype: Any, prompt_tokens: int, max_new_tokens: int,
                      model_shards: int = 1) -> int:
    """One trace's cache in the dense layout this replaces: prompt + max_new_tokens (+2) slots,
    rounded up to a multiple of 64, in every layer."""
    slots = -(-(prompt_tokens + max_new_tokens + 2) // DENSE_ROUND) * DENSE_ROUND
    return slots * kv_bytes_per_token(cfg, dtype, model_shards)


def _per_trace(configs: Sequence[ModelConfig], dtype: Any, page_size: int, tokens_per_trace: int,
               model_shards: int, max_step_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """(pages a trace holds, pages a row's call adds, page bytes) of each pool, the models' pools
    in order (`pools_of`)."""
    pools = [(c, local) for c in configs for local in pools_of(c)]
    held = [trace_pages(c, tokens_per_trace, page_size, local) for c, local in pools]
    extra = [call_pages(c, tokens_per_trace, page_size, max_step_tokens) for c, _ in pools]
    sizes = [page_bytes(c, dtype, page_size, model_shards, local) for c, local in pools]
    return held, extra, sizes


def _by_model(configs: Sequence[ModelConfig], per_pool: Sequence[Any]) -> list[Any]:
    """Per-pool figures grouped per model: a model's one figure, or (global, local)."""
    it = iter(per_pool)
    return [next(it) if len(pools_of(c)) == 1 else (next(it), next(it)) for c in configs]


def pool_pages(configs: Sequence[ModelConfig], dtype: Any, budget_bytes: int, page_size: int,
               tokens_per_trace: int, model_shards: int = 1, *,
               max_step_tokens: int = 0) -> list[int | tuple[int, int]]:
    """Usable pages of each model's pool (its arrays hold one more, the null page) so that the
    pools fill `budget_bytes` of one device and each model holds as many traces as the others;
    for a model with a sliding layers' pool, (global pool, local pool).

    Each model's pages are proportional to what one resident trace of `tokens_per_trace` tokens
    costs it: the pages it holds plus an eighth of the pages its row adds during a call that
    may write `max_step_tokens` more (a call holds at least an eighth of the resident rows, see
    `resident_in_pool`). Pages left over after whole traces are kept, as traces differ in
    length. Returns zeros when the budget cannot hold the null pages.
    """
    page_size = check_page_size(page_size)
    held, extra, sizes = _per_trace(configs, dtype, page_size, tokens_per_trace, model_shards,
                                    max_step_tokens)
    room = budget_bytes - sum(sizes)  # the null pages come first
    if room <= 0:
        return _by_model(configs, [0] * len(sizes))
    share = [8 * h + e for h, e in zip(held, extra)]  # eighths of a page per trace
    per_unit = sum(w * s for w, s in zip(share, sizes))
    return _by_model(configs, [int(room * w // per_unit) for w in share])


def flat_pools(pools: Sequence[int | tuple[int, int]]) -> list[int]:
    """Every pool's figure in order, a model's pair as two."""
    return [x for p in pools for x in (p if isinstance(p, tuple) else (p,))]


def resident_in_pool(pool: int, held: int, extra: int) -> int:
    """The most traces R of `held` pages each that a pool of `pool` usable pages keeps resident
    through a round: R * held + ceil(R / 8) * extra <= pool, `extra` being the pages a row's
    call adds. The engine then writes all R without evicting, in calls of >= R / 8 rows."""
    lo, hi = 0, max(pool, 0) // held
    while lo < hi:  # the cost grows with R: the largest R that fits
        mid = (lo + hi + 1) // 2
        if mid * held + -(-mid // 8) * extra <= pool:
            lo = mid
        else:
            hi = mid - 1
    return lo


def calls_per_round(pool: int, held: int, extra: int, resident: int) -> int:
    """Calls a model needs to write a step for all `resident` traces: ceil(R / rows a call
    holds), rows a call holds = floor((pool - R * held) / extra); 0 when nothing is resident."""
    if resident < 1:
        return 0
    if extra == 0:
        return 1
    rows = (pool - resident * held) // extra
    return -(-resident // rows) if rows > 0 else 0


def resident_traces(configs: Sequence[ModelConfig], dtype: Any, budget_bytes: int,
                    page_size: int, tokens_per_trace: int, model_shards: int = 1, *,
                    max_step_tokens: int = 0) -> int:
    """Traces of `tokens_per_trace` tokens each that the pools `pool_pages` sizes keep resident
    through a round whose calls may write `max_step_tokens` tokens a row."""
    pools = flat_pools(pool_pages(configs, dtype, budget_bytes, page_size, tokens_per_trace,
                             model_shards, max_step_tokens=max_step_tokens))
    held, extra, _ = _per_trace(configs, dtype, page_size, tokens_per_trace, model_shards,
                                max_step_tokens)
    return min(resident_in_pool(p, h, e) for p, h, e in zip(pools, held, extra))


# ---- how much of one device the pools may use ------------------------------------------------

def _host_free_memory() -> int:
    """Host memory this process could still take, in bytes: MemAvailable, which counts the page
    cache as free (reading safetensors fills it with the checkpoint's files, and that cache is
    given back on demand); MemFree where /proc/meminfo is absent. A function of its own so a
    test can stand in for the host."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _live_bytes(devices: Sequence[Any]) -> int:
    """Bytes of the live jax arrays this process holds on `devices`."""
    wanted = set(devices)
    return sum(shard.data.nbytes for a in jax.live_arrays() for shard in a.addressable_shards
               if shard.device in wanted)


def device_budget(weights_to_load: int = 0, *, devices: Sequence[Any] | None = None,
                  fraction: float = MEMORY_FRACTION) -> int:
    """Bytes the KV pools may use on each of `devices` (the run's mesh devices; default the
    first local device), every byte counted once; <= 0 when nothing is left.

    budget = fraction * capacity - held - weights_to_load, where `held` is what this process
    already holds (loaded weights included) and `weights_to_load` the per-device bytes of
    weights not loaded yet (`weight_bytes`; 0 once the models are loaded), so sizing before
    loading and after it give the same figure.
    - Accelerator: capacity = memory_stats()['bytes_limit'], held = its 'bytes_in_use'; the
      smallest figure over `devices`.
    - CPU: every CPU device lives in the same host memory, so capacity = free host memory
      (`_host_free_memory`) + the bytes of all live jax arrays on the local CPU devices (they
      are taken out of the free figure already; adding them back counts them once), held =
      those bytes, and what is left is split evenly over `devices`.
    """
    devices = [jax.local_devices()[0]] if devices is None else list(devices)
    stats = [d.memory_stats() or {} for d in devices]
    if all("bytes_limit" in s for s in stats):
        return min(int(fraction * s["bytes_limit"]) - int(s.get("bytes_in_use", 0))
                   for s in stats) - weights_to_load
    host = [d for d in jax.local_devices() if d.platform == devices[0].platform]
    held = _live_bytes(host)
    capacity = _host_free_memory() + held
    return (int(fraction * capacity) - held) // len(devices) - weights_to_load
