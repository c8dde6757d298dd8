"""A run's config: the YAML file, its schema and defaults, and every check that can fail before a
model is loaded or compiled: unknown keys (named), value ranges, checkpoint directories,
tokenizers that differ between the two models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import yaml

from steer_jax import memory
from steer_jax.options import SteerOptions


class RunConfigError(ValueError):
    """A run config that cannot run; the message says what to fix."""


# The config schema: section -> allowed keys (None: a scalar top-level key).
SCHEMA: dict[str, tuple[str, ...] | None] = {
    "small": None, "large": None, "method": None, "dtype": None, "scan_layers": None,
    "cpu_kernels": None, "pair": None,
    "benchmark": ("name", "path", "offset", "limit"),
    "sampling": ("temperature", "top_p", "seed"),
    "steer": ("gamma", "max_steps", "max_step_tokens", "max_new_tokens", "delimiter",
              "confidence", "aggregate", "source", "groups", "refine", "policy", "percentile",
              "threshold", "schedule", "chunk", "fit_over", "min_fit_traces"),
    "batch": ("size",),
    "cache": ("page_size", "pages"),
    "specreason": ("threshold",),
    "rsd": ("prm", "threshold"),
    "router": ("path", "train", "samples"),
    "mesh": ("data", "model"),
    "distributed": ("coordinator", "num_processes", "process_id", "auto"),
}
DEFAULTS: dict[str, Any] = {
    "method": "steer", "dtype": "bfloat16", "scan_layers": None, "cpu_kernels": None,
    "benchmark": {"path": None, "offset": 0, "limit": None},
    "sampling": {"temperature": 0.7, "top_p": 1.0, "seed": 0},
    "steer": {}, "batch": {"size": None}, "cache": {"page_size": 64, "pages": None},
    "specreason": {"threshold": 7}, "rsd": {"prm": None, "threshold": 0.7},
    "router": {"path": None, "train": None, "samples": 1},
    "mesh": {},
    "distributed": {},
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config (safe_load) and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path} is not readable YAML: {e}") from e
    if not isinstance(config, dict):
        raise RunConfigError(f"{path} must hold a mapping of config keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RunConfigError(f"override {item!r} is not of the form key=value")
        try:
            config = set_key(config, key, yaml.safe_load(value))
        except RunConfigError as e:
            raise RunConfigError(f"override {item!r}: {e}") from None
    return config


def set_key(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with the dotted `key` set to `value`, its sections made as needed."""
    out = copy.deepcopy(config)
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise RunConfigError(f"{p} is not a section")
    node[leaf] = value
    return out


def validate(config: dict[str, Any]) -> tuple[dict[str, Any], SteerOptions]:
    """Defaults filled in, every key and value checked; the STEER options built from it."""
    unknown = [k for k in config if k not in SCHEMA]
    for section, keys in SCHEMA.items():
        value = config.get(section)
        if keys is not None and value is not None:
            if not isinstance(value, dict):
                raise RunConfigError(f"config section {section!r} must be a mapping")
            unknown += [f"{section}.{k}" for k in value if k not in keys]
    if unknown:
        raise RunConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for k, v in config.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    for key in ("small", "large"):
        if not cfg.get(key):
            raise RunConfigError(f"config key {key!r} (a local checkpoint directory) is missing")
    if not cfg["benchmark"].get("name"):
        raise RunConfigError("config key 'benchmark.name' is missing")
    if not (cfg.get("pair") is None or isinstance(cfg["pair"], str)):
        raise RunConfigError(f"pair (the paper's name of the model pair, e.g. gemma-3-4b-12b) "
                             f"must be a string, got {cfg['pair']!r}")
    if not (cfg["scan_layers"] is None or isinstance(cfg["scan_layers"], bool)):
        raise RunConfigError("scan_layers must be true, false or null (null: unrolled except on "
                             f"TPUs), got {cfg['scan_layers']!r}")
    if not (cfg["cpu_kernels"] is None or isinstance(cfg["cpu_kernels"], bool)):
        raise RunConfigError("cpu_kernels must be true, false or null (null: where they run: "
                             f"float32 on one CPU device), got {cfg['cpu_kernels']!r}")
    size = cfg["batch"]["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise RunConfigError(f"batch.size must be a positive integer or null, got {size!r}")
    try:
        memory.check_page_size(cfg["cache"]["page_size"])
    except ValueError as e:
        raise RunConfigError(str(e)) from e
    pages = cfg["cache"]["pages"]
    if pages is not None and (isinstance(pages, bool) or not isinstance(pages, int) or pages < 1):
        raise RunConfigError(f"cache.pages (pages in each model's pool) must be a positive "
                             f"integer or null (as many as fit in memory), got {pages!r}")
    try:
        opts = SteerOptions(method=cfg["method"], **cfg["steer"], **cfg["sampling"],
                            judge_threshold=cfg["specreason"]["threshold"],
                            prm_threshold=cfg["rsd"]["threshold"])
    except (TypeError, ValueError) as e:
        raise RunConfigError(str(e)) from e
    if opts.method == "rsd" and not cfg["rsd"]["prm"]:
        raise RunConfigError("method 'rsd' needs rsd.prm, a local process reward model directory")
    samples = cfg["router"]["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise RunConfigError(f"router.samples (runs of each model per training question) must be "
                             f"a positive integer, got {samples!r}")
    if opts.method == "query_router" and not cfg["router"]["path"]:
        raise RunConfigError("method 'query_router' needs router.path (made by "
                             "`steer-jax train-router`)")
    return cfg, opts


def examples_of(spec: dict[str, Any]) -> list:
    """A benchmark slice: `limit` examples from `offset` on (so train and test can split a file)."""
    from steer_jax.eval import load_benchmark

    offset, limit = spec.get("offset") or 0, spec.get("limit")
    examples = load_benchmark(spec["name"], spec.get("path"))[offset:]
    return examples if limit is None else examples[:limit]


def check_tokenizers(small: Any, large: Any, small_path: str, large_path: str) -> None:
    """STEER passes token ids between the models: their vocabularies must be the same."""
    a, b = small.get_vocab(), large.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise RunConfigError(f"the tokenizers of {small_path} and {large_path} differ "
                             f"({len(a)} vs {len(b)} tokens; e.g. {diff}): STEER needs one "
                             "vocabulary")
