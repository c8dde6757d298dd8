"""`steer-jax plan`: how many traces a device holds, from the models' configs alone.

The arithmetic is `steer_jax.memory`'s, which the runner's pool sizing uses too; this module
gathers it into one plan per run config (prompt lengths from the benchmark and tokenizer when
they are readable) and prints it as a table or JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from steer_jax.memory import (DEFAULT_PAGE_SIZE, DENSE_ROUND, MEMORY_FRACTION, _by_model,
                              _per_trace, _split, calls_per_round, check_page_size,
                              dense_trace_bytes, flat_pools, kv_bytes_per_token, pool_pages,
                              pools_of, resident_in_pool, weight_bytes)
from steer_jax.modeling.config import ModelConfig
from steer_jax.modeling.module import num_params


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model's figures on one device."""

    name: str
    params: int
    weight_bytes: int  # per device
    kv_bytes_per_token: int  # all layers
    page_bytes: int  # a page of the global layers' pool (all layers' with one pool)
    kv_heads: int
    kv_heads_per_device: int  # fewer than kv_heads where they split over the 'model' axis
    trace_pages: int  # pages one trace holds at the plan's tokens (prompt + generated)
    call_pages: int  # pages a row's call adds on top of those while it runs (given back after)
    pool_pages: int  # usable pages of its pool (the pool holds one more: the null page)
    calls_per_round: int  # calls writing a step for all resident traces, without evicting
    dense_trace_bytes: int  # one trace's cache in the old dense layout
    # The sliding layers' pool, for a model with one (`pools_of`); 0 without.
    local_page_bytes: int = 0
    local_trace_pages: int = 0  # pages its window holds at a round boundary
    local_pool_pages: int = 0

    @property
    def trace_bytes(self) -> int:
        """What one resident trace's pages take in this model's pools."""
        return self.trace_pages * self.page_bytes + self.local_trace_pages * self.local_page_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The models of a run on one device: pages, and traces resident at once."""

    models: tuple[ModelPlan, ...]
    dtype: str
    device_memory: int  # bytes of one device
    devices: int  # devices on the 'model' axis
    page_size: int
    prompt_tokens: int  # per trace, for the paged figure (the mean prompt when measured)
    dense_prompt_tokens: int  # for the dense figure (the longest prompt when measured)
    mean_tokens: int  # generated tokens per trace
    max_step_tokens: int
    max_new_tokens: int
    tokens_per_trace: int  # prompt + generated: what a resident trace holds
    call_tokens: int  # what a call reserves ahead of a row: max_step_tokens, within its table
    usable_bytes: int  # fraction * device memory - all weights
    resident_traces: int  # traces every pool keeps through a round without evicting
    dense_traces: int
    benchmark_size: int | None = None
    benchmark: str | None = None
    prompt_source: str = "given"
    paths: tuple[str, ...] = ()

    @property
    def sub_batches(self) -> int | None:
        """Sub-batches per round to walk the whole benchmark (None: size unknown or no fit)."""
        if self.benchmark_size is None or self.resident_traces < 1:
            return None
        return -(-self.benchmark_size // self.resident_traces)


def plan(configs: Sequence[ModelConfig], dtype: Any, device_memory: int, *,
         names: Sequence[str] | None = None, devices: int = 1,
         page_size: int = DEFAULT_PAGE_SIZE, prompt_tokens: int = 256,
         dense_prompt_tokens: int | None = None, mean_tokens: int = 1024,
         max_step_tokens: int = 256, max_new_tokens: int = 4096,
         benchmark_size: int | None = None, fraction: float = MEMORY_FRACTION) -> MemoryPlan:
    """Weights, pages and resident traces of `configs` on devices of `device_memory` bytes each,
    `devices` of them on the 'model' axis.

    A trace holds the pages of `prompt_tokens` + `mean_tokens` generated tokens; a call reserves
    pages for `max_step_tokens` more for its rows only (not past the page table the engine gives
    a trace: the longest prompt + `max_new_tokens` + 2 slots, rounded up to a multiple of 64 and
    of the page size). Resident traces R: in every pool, R * held pages + ceil(R / 8) * the
    pages a row's call adds fit (`resident_in_pool`), so a round's writes run in calls of at
    least R / 8 rows and nothing is evicted. usable = fraction * device_memory - every model's
    weights; the dense figure divides it by each model's dense reservation of
    `dense_prompt_tokens` (default: `prompt_tokens`).
    """
    page_size = check_page_size(page_size)
    for key, v, least in (("devices", devices, 1), ("mean tokens", mean_tokens, 0),
                          ("prompt tokens", prompt_tokens, 0),
                          ("steer.max_step_tokens", max_step_tokens, 1),
                          ("steer.max_new_tokens", max_new_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {v!r}")
    if mean_tokens > max_new_tokens:
        raise ValueError(f"mean tokens {mean_tokens} exceed steer.max_new_tokens "
                         f"{max_new_tokens}: a trace stops there")
    dense_prompt = prompt_tokens if dense_prompt_tokens is None else dense_prompt_tokens
    names = list(names) if names is not None else [f"model {i}" for i in range(len(configs))]
    tokens = prompt_tokens + mean_tokens
    step = -(-64 // page_size) * page_size  # steer.steer: a page table of whole pages
    table = -(-(max(dense_prompt, prompt_tokens) + max_new_tokens + 2) // step) * step
    ahead = max(0, min(max_step_tokens, table - tokens))
    weights = [weight_bytes(c, dtype, devices) for c in configs]
    usable = int(fraction * device_memory) - sum(weights)
    pools = flat_pools(pool_pages(configs, dtype, usable, page_size, tokens, devices,
                             max_step_tokens=ahead))
    held, extra, sizes = _per_trace(configs, dtype, page_size, tokens, devices, ahead)
    resident = min(resident_in_pool(p, h, e) for p, h, e in zip(pools, held, extra))
    calls = [calls_per_round(p, h, e, resident) for p, h, e in zip(pools, held, extra)]
    # Each model's figures: (global pool, local pool or None).
    per_model = [(m, None) if len(pools_of(c)) == 1 else m for c, m in
                 zip(configs, _by_model(configs, list(zip(pools, held, extra, sizes, calls))))]
    models = tuple(ModelPlan(
        name=n, params=num_params(c), weight_bytes=w,
        kv_bytes_per_token=kv_bytes_per_token(c, dtype, devices),
        page_bytes=g[3], kv_heads=c.num_kv_heads,
        kv_heads_per_device=_split(c.num_kv_heads, devices),
        trace_pages=g[1], call_pages=g[2], pool_pages=g[0],
        calls_per_round=max(g[4], loc[4] if loc else 0),
        dense_trace_bytes=dense_trace_bytes(c, dtype, dense_prompt, max_new_tokens, devices),
        **(dict(local_page_bytes=loc[3], local_trace_pages=loc[1], local_pool_pages=loc[0])
           if loc else {}))
        for n, c, w, (g, loc) in zip(names, configs, weights, per_model))
    dense = max(usable, 0) // sum(m.dense_trace_bytes for m in models)
    return MemoryPlan(
        models=models, dtype=str(jnp.dtype(dtype)), device_memory=device_memory,
        devices=devices, page_size=page_size, prompt_tokens=prompt_tokens,
        dense_prompt_tokens=dense_prompt, mean_tokens=mean_tokens,
        max_step_tokens=max_step_tokens, max_new_tokens=max_new_tokens,
        tokens_per_trace=tokens, call_tokens=ahead, usable_bytes=usable,
        resident_traces=resident, dense_traces=dense,
        benchmark_size=benchmark_size)


# ---- from a run config (`steer-jax plan`) -------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _prompt_lengths(config: dict[str, Any]) -> tuple[list[int] | None, int | None, str]:
    """(prompt lengths, benchmark size, how they were found) without downloading anything:
    the benchmark is read only from `benchmark.path` (or the generated demo split)."""
    from pathlib import Path

    from steer_jax.eval import render_prompt
    from steer_jax.eval.benchmarks import DEMO, canonical_name
    from steer_jax.run_config import examples_of

    bench = config.get("benchmark") or {}
    name = bench.get("name")
    if not name:
        return None, None, "no benchmark.name"
    if bench.get("path") is None and canonical_name(name) != DEMO:
        return None, None, f"{name} unread: benchmark.path is null (the plan downloads nothing)"
    try:
        examples = examples_of(bench)
    except (OSError, ValueError) as e:
        return None, None, f"{name} unreadable: {e}"
    small = Path(str(config["small"]))
    if not any((small / f).is_file() for f in _TOKENIZER_FILES):
        return None, len(examples), f"no tokenizer in {small}"
    try:
        from steer_jax.modeling.loading import load_tokenizer

        tok = load_tokenizer(small)
        lengths = [len(tok(render_prompt(tok, ex, name), add_special_tokens=False)["input_ids"])
                   for ex in examples]
    except ValueError as e:
        return None, len(examples), f"cannot render {name}'s prompts: {e}"
    return lengths, len(examples), f"{name}'s {len(examples)} prompts through {small}'s tokenizer"


def plan_from_config(config: dict[str, Any], device_memory: int, *, devices: int = 1,
                     mean_tokens: int = 1024, prompt_tokens: int = 256) -> MemoryPlan:
    """`plan` for a run config (as `run_config.load_config` returns it): the models' config.json
    only, its dtype, `steer.max_step_tokens`, `steer.max_new_tokens`, `cache.page_size`, and
    the benchmark's prompts when the tokenizer and `benchmark.path` are readable (else
    `prompt_tokens` for every trace). The RSD reward model counts as a third model."""
    from steer_jax.modeling.loading import read_config
    from steer_jax.options import SteerOptions

    for key in ("small", "large"):
        if not config.get(key):
            raise ValueError(f"config key {key!r} (a checkpoint folder) is missing")
    dtype = config.get("dtype") or "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    cache = config.get("cache") or {}
    if not isinstance(cache, dict):
        raise ValueError("config section 'cache' must be a mapping (cache.page_size)")
    page_size = check_page_size(cache.get("page_size"))
    steer = {**dataclasses.asdict(SteerOptions()), **(config.get("steer") or {})}
    paths = {"small": config["small"], "large": config["large"]}
    if config.get("method") == "rsd" and (config.get("rsd") or {}).get("prm"):
        paths["prm"] = config["rsd"]["prm"]
    configs = [read_config(p) for p in paths.values()]
    if "prm" in paths:
        configs[-1] = dataclasses.replace(configs[-1], value_head=True)
    lengths, n, source = _prompt_lengths(config)
    if lengths:
        mean, longest = -(-sum(lengths) // len(lengths)), max(lengths)
        source = f"mean {mean}, longest {longest}: {source}"
    else:
        mean = longest = prompt_tokens
        source = f"{prompt_tokens} (--prompt-tokens; {source})"
    result = plan(configs, dtype, device_memory, names=list(paths), devices=devices,
                  page_size=page_size, prompt_tokens=mean, dense_prompt_tokens=longest,
                  mean_tokens=mean_tokens, max_step_tokens=steer["max_step_tokens"],
                  max_new_tokens=steer["max_new_tokens"], benchmark_size=n)
    bench = (config.get("benchmark") or {}).get("name")
    return dataclasses.replace(result, prompt_source=source, benchmark=bench,
                               paths=tuple(str(p) for p in paths.values()))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(p: MemoryPlan) -> str:
    """The plan as `steer-jax plan` prints it."""
    split = ("" if p.devices == 1 else f" on the 'model' axis (weights split over it where a "
             f"dimension divides {p.devices}, else replicated)")
    lines = [f"device: {p.devices} x {_gib(p.device_memory)} ({p.device_memory / 1e9:.1f} GB)"
             f"{split}; {p.dtype}; cache.page_size {p.page_size} tokens",
             *(f"{m.name}: {path}" for m, path in zip(p.models, p.paths)),
             f"prompt tokens: {p.prompt_source}",
             f"per trace: {p.prompt_tokens} prompt + {p.mean_tokens} generated = "
             f"{p.tokens_per_trace} tokens held; a call reserves pages for {p.call_tokens} more "
             "(steer.max_step_tokens) for its rows only, while it runs",
             "resident: every pool holds their pages + the pages a call adds to an eighth of "
             "them, so a round's writes need no eviction (calls of >= 1/8 of them)", ""]
    head = (f"{'model':<6} {'params':>7} {'weights/dev':>12} {'KV/token':>10} {'page':>10} "
            f"{'KV heads/dev':>12} {'pages/trace':>11} {'+call':>5} {'pool pages':>10} "
            f"{'calls/round':>11}")
    lines += [head, "-" * len(head)]
    for m in p.models:
        lines.append(f"{m.name:<6} {m.params / 1e9:>6.2f}B {_gib(m.weight_bytes):>12} "
                     f"{m.kv_bytes_per_token / 2**10:>6.1f} KiB {m.page_bytes / 2**20:>6.2f} MiB "
                     f"{f'{m.kv_heads_per_device} of {m.kv_heads}':>12} {m.trace_pages:>11} "
                     f"{m.call_pages:>5} {m.pool_pages:>10} {m.calls_per_round:>11}")
    for m in p.models:
        if m.local_pool_pages:
            lines.append(f"{m.name} sliding-window layers' pool: page "
                         f"{m.local_page_bytes / 2**20:.2f} MiB, {m.local_trace_pages} pages a "
                         f"trace (its window; the global layers' pool above holds them all), "
                         f"+{m.call_pages} a call, {m.local_pool_pages} pages")
    lines += ["", f"memory for KV pages per device: {MEMORY_FRACTION} x {_gib(p.device_memory)}"
              f" - weights {_gib(sum(m.weight_bytes for m in p.models))} = {_gib(p.usable_bytes)}",
              f"traces resident at {p.mean_tokens} generated tokens each: {p.resident_traces}"
              f" (calls per round: " + ", ".join(f"{m.name} {m.calls_per_round}"
                                                for m in p.models) + ")"]
    if p.sub_batches is not None:
        lines.append(f"sub-batches per round for {p.benchmark} ({p.benchmark_size} traces): "
                     f"{p.sub_batches}")
    else:
        lines.append(f"sub-batches per round for {p.benchmark}: unknown (benchmark size "
                     "unknown)" if p.benchmark_size is None else "no trace fits")
    lines.append(f"dense layout (each trace reserving {p.dense_prompt_tokens} prompt + "
                 f"{p.max_new_tokens} steer.max_new_tokens tokens, rounded to {DENSE_ROUND}): "
                 f"{p.dense_traces} traces")
    return "\n".join(lines)


def plan_json(p: MemoryPlan) -> dict[str, Any]:
    """The plan as one JSON object (`steer-jax plan --json`)."""
    return {**dataclasses.asdict(p), "sub_batches": p.sub_batches}
