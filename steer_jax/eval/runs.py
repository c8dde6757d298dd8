"""Reading run directories: the files a run writes and everything a report reads back.

DIR/summary.json   method, benchmark, n, accuracy (a fraction in [0, 1]), flops_per_query
                   (in units of 1e12 FLOPs), prefill_flops_per_query, executed_flops_per_query,
                   a_per_f, large_step_fraction, wall_s, routing_s_per_query and
                   routing_s_per_round (device seconds spent deciding who writes, per query
                   and per round or chunk boundary; 0.0 for small_only and large_only),
                   params {small, large}, gamma (steer)
DIR/traces.jsonl   one question per line: id, output, answer, reference, correct, meta, steps
                   [{text, model: "small"|"large", tokens, confidence, posterior, round}]
DIR/rounds.jsonl   steer only, one line per (round, group): round, group, weights [2],
                   means [2], variances [2], confidences [the step confidences fitted on]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Collection

from steer_jax.options import SteerOptions

# What the results table cannot do without; the other documented fields are read when present.
REQUIRED_SUMMARY_KEYS = ("method", "benchmark", "accuracy", "flops_per_query", "a_per_f")
METHODS = ("small_only", "large_only", "query_router", "specreason", "rsd", "steer")
# Options that can tell two runs of a method apart: (key, how it is shown, the methods it matters
# to; None: all). A table shows those its runs of a method differ in (table.varying).
VARIANT_KEYS = (
    ("confidence", "{}", ("steer",)), ("aggregate", "aggregate={}", ("steer",)),
    ("refine", "refine={}", ("steer",)), ("source", "source={}", ("steer",)),
    ("groups", "K={}", ("steer",)), ("judge_threshold", "judge>={}", ("specreason",)),
    ("prm_threshold", "PRM>={}", ("rsd",)), ("schedule", "{}", None), ("chunk", "chunk={}", None),
    ("temperature", "T={}", None), ("top_p", "top-p={}", None),
    ("max_new_tokens", "budget={}", None), ("max_step_tokens", "step<={}", None),
    ("max_steps", "steps<={}", None), ("seed", "seed={}", None),
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


@dataclass(frozen=True)
class Run:
    """One run directory. Traces and rounds are read on first use: they can be large."""

    path: Path
    summary: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.summary["method"])

    @property
    def benchmark(self) -> str:
        return str(self.summary["benchmark"])

    @property
    def gamma(self) -> float | None:
        gamma = self.summary.get("gamma")
        return None if gamma is None else float(gamma)

    @property
    def routing(self) -> str:
        """STEER's routing rule in a few characters: "γ=0.5", "p=0.3" (percentile), "τ=..."."""
        opts = self.summary.get("options") or {}
        policy = opts.get("policy", "posterior")
        if policy == "percentile":
            return f"p={float(opts['percentile']):g}"
        if policy == "threshold":
            return f"τ={float(opts['threshold']):g}"
        return f"γ={self.gamma:g}" if self.gamma is not None else ""

    def option(self, key: str) -> Any:
        return (self.summary.get("options") or {}).get(key)

    def variant(self, keys: Collection[str]) -> list[str]:
        """STEER's routing rule, then each of `keys` that matters to the method and is off its
        default, as VARIANT_KEYS shows it."""
        parts = [self.routing] if self.method == "steer" and self.routing else []
        for key, fmt, methods in VARIANT_KEYS:
            value = self.option(key)
            if key in keys and value is not None and (methods is None or self.method in methods) \
                    and value != getattr(SteerOptions, key):
                parts.append(fmt.format(value))
        return parts

    @property
    def accuracy(self) -> float:
        return float(self.summary["accuracy"])

    @property
    def flops_per_query(self) -> float:
        return float(self.summary["flops_per_query"])

    @property
    def a_per_f(self) -> float:
        return float(self.summary["a_per_f"])

    @property
    def pair(self) -> tuple[Any, Any]:
        params = self.summary.get("params") or {}
        return params.get("small"), params.get("large")

    @cached_property
    def traces(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "traces.jsonl")

    @cached_property
    def rounds(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "rounds.jsonl")


def load_run(path: str | Path) -> Run:
    """A run directory, its summary checked for the fields the results table needs."""
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no summary.json")
    with summary_path.open(encoding="utf-8") as f:
        summary = json.load(f)
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if summary.get("method") == "steer" and "gamma" not in summary:
        missing.append("gamma")
    if missing:
        raise ValueError(f"{summary_path} lacks {', '.join(missing)}")
    accuracy = float(summary["accuracy"])
    # A percentage here would silently print as 5000%: refuse it instead.
    if not (0.0 <= accuracy <= 1.0) or math.isnan(accuracy):
        raise ValueError(f"{summary_path}: accuracy {accuracy} is not a fraction in [0, 1]")
    return Run(path=path, summary=summary)


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories named directly, or found one level below a folder that holds several."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "summary.json").is_file()) if p.is_dir() else []
        if not children:
            raise FileNotFoundError(f"{p} is not a run directory and holds none (no summary.json)")
        out.extend(children)
    return out
