"""Figures 3 and 4: how the routing rule and its confidence measure trade accuracy, and what
deciding who writes costs.

- accuracy_vs_percentile (Figure 3): STEER runs with `policy: percentile` (the lowest p-fraction
  of the running traces' step confidences go to the large model), accuracy against p, one line
  per confidence measure, one panel per model pair x benchmark.
- routing_latency (Figure 4): one bar per method (log scale) of the device time spent deciding
  who writes, summary.json's `routing_s_per_query`, and `routing_s_per_round` as a second panel
  when runs have it.
Each is drawn only when some run has its data: the functions return None and write nothing
otherwise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from steer_jax.eval.plots import save_figure
from steer_jax.eval.runs import METHODS, Run
from steer_jax.eval.table import BENCHMARK_LABELS, METHOD_LABELS, pair_label, varying

ROUTING_KEYS = {"routing_s_per_query": "seconds per query", "routing_s_per_round": "seconds per round"}

Panel = tuple[str, str]  # (pair label, benchmark)


def _bench_rank(bench: str) -> int:
    return list(BENCHMARK_LABELS).index(bench) if bench in BENCHMARK_LABELS else len(BENCHMARK_LABELS)


def accuracy_by_percentile(runs: list[Run]) -> dict[Panel, dict[str, list[tuple[float, float]]]]:
    """(pair, benchmark) -> line -> [(p, accuracy in %)] sorted by p, for STEER percentile runs.

    A line is a confidence measure, with whatever else its panel's runs differ in (aggregate,
    source, groups ...) appended, so a line never joins runs that differ in more than p. Lines
    with fewer than two distinct p are left out, and panels left with no line."""
    panels: dict[Panel, list[Run]] = defaultdict(list)
    for r in runs:
        if r.method == "steer" and r.option("policy") == "percentile":
            panels[(pair_label(r), r.benchmark)].append(r)
    out: dict[Panel, dict[str, list[tuple[float, float]]]] = {}
    for panel in sorted(panels, key=lambda k: (k[0], _bench_rank(k[1]), k[1])):
        here = panels[panel]
        keys = varying(here).get("steer", set()) - {"confidence"}
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in here:
            measure = str(r.option("confidence") or "max_logit")
            # variant() leads with the routing rule ("p=0.3"), which is the x axis here.
            label = ", ".join([measure, *r.variant(keys)[1:]])
            lines[label].append((float(r.option("percentile")), r.accuracy * 100))
        kept = {k: sorted(v) for k, v in sorted(lines.items()) if len({p for p, _ in v}) >= 2}
        if kept:
            out[panel] = kept
    return out


def accuracy_vs_percentile(runs: list[Run], path: Path) -> Path | None:
    """Figure 3; None (nothing written) when no measure has runs at two p values."""
    data = accuracy_by_percentile(runs)
    if not data:
        return None
    fig = Figure(figsize=(4.2 * len(data), 3.6), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, ((pair, bench), lines) in zip(axes, data.items(), strict=True):
        for label, points in lines.items():
            ps, accs = zip(*points, strict=True)
            ax.plot(ps, accs, marker="o", label=label)
        ax.set_title(f"{pair} {BENCHMARK_LABELS.get(bench, bench)}")
        ax.set_xlabel("p (share of steps routed to the large model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("accuracy (%)")
    return save_figure(fig, path)


@dataclass(frozen=True)
class LatencyBar:
    label: str
    mean: float  # seconds, over the runs behind the bar
    low: float
    high: float
    runs: int


def _positive(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def latency_bars(runs: list[Run], key: str = "routing_s_per_query") -> tuple[list[LatencyBar], list[str]]:
    """One bar per method (per pair and benchmark too when the runs span several): the mean of
    `key` over its runs, with their min and max. Returns the bars and the methods whose runs state
    no positive time (no routing to time: small only, large only), which a log axis cannot show."""
    if key not in ROUTING_KEYS:
        raise ValueError(f"unknown routing latency key {key!r}; expected one of {list(ROUTING_KEYS)}")
    timed = [r for r in runs if key in r.summary]
    with_pair = len({r.pair for r in timed}) > 1
    with_bench = len({r.benchmark for r in timed}) > 1
    values: dict[tuple, list[float]] = defaultdict(list)
    untimed: set[str] = set()
    for r in timed:
        rank = METHODS.index(r.method) if r.method in METHODS else len(METHODS)
        group = (pair_label(r) if with_pair else "", _bench_rank(r.benchmark) if with_bench else 0,
                 r.benchmark if with_bench else "", rank, r.method)
        x = _positive(r.summary[key])
        if x is None:
            untimed.add(r.method)
        else:
            values[group].append(x)
    bars = []
    for (pair, _, bench, _, method), xs in sorted(values.items()):
        parts = [pair, METHOD_LABELS.get(method, method), BENCHMARK_LABELS.get(bench, bench)]
        bars.append(LatencyBar(" ".join(p for p in parts if p), float(np.mean(xs)), min(xs), max(xs), len(xs)))
    timed_methods = {m for *_, m in values}
    return bars, sorted(untimed - timed_methods, key=lambda m: METHODS.index(m) if m in METHODS else 99)


def _seconds(x: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def routing_latency(runs: list[Run], path: Path) -> Path | None:
    """Figure 4; None (nothing written) when no run states a positive routing time."""
    panels = [(key, *latency_bars(runs, key)) for key in ROUTING_KEYS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    width = max(len(p[1]) for p in panels)
    fig = Figure(figsize=(max(4.0, 0.9 * width + 1.5) * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, bars, untimed) in zip(axes, panels, strict=True):
        x = np.arange(len(bars))
        means = np.array([b.mean for b in bars])
        spread = np.array([[b.mean - b.low for b in bars], [b.high - b.mean for b in bars]])
        ax.bar(x, means, yerr=spread, capsize=3, color="tab:blue")
        ax.set_yscale("log")
        for xi, b in zip(x, bars, strict=True):
            ax.annotate(_seconds(b.mean), (xi, b.high), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
        ax.set_xticks(x, [b.label for b in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"routing time, {ROUTING_KEYS[key]}")
        if untimed:
            ax.set_title("no routing: " + ", ".join(METHOD_LABELS.get(m, m) for m in untimed), fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Device time spent deciding who writes (mean over runs, whiskers min-max)")
    return save_figure(fig, path)
