"""The paper's figures from run directories, drawn with matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas instead of pyplot, so drawing
needs no display and leaves the caller's pyplot state and backend alone.

- large_usage: share of steps written by the large model by relative step position and by
  difficulty, correct and wrong traces apart (the two marginals of Figure 5).
- accuracy_vs_flops: accuracy against FLOPs, STEER's gamma sweep as a line, baselines as points.

The other figures live beside it: figures_confidence (Figure 2), figures_routing (Figures 3 and
4), figures_usage (Figure 5's heatmaps); figures.build draws every one a set of runs has data for.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from steer_jax.eval.runs import Run
from steer_jax.eval.table import BENCHMARK_LABELS, METHOD_LABELS, pair_label, row_label, varying

# Meta fields that grade a question's difficulty, in the order they are looked for: MATH500 level
# (1-5), Omni-MATH difficulty (1-9.5, binned to whole numbers), MuSiQue hop count.
DIFFICULTY_KEYS = ("level", "difficulty", "hops")


def save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def pick_rounds(available: Sequence[int], k: int = 4) -> list[int]:
    """Up to k rounds spread from the first to the last, the first always included."""
    rounds = sorted(set(available))
    if len(rounds) <= k:
        return rounds
    idx = np.linspace(0, len(rounds) - 1, k).round().astype(int)
    return [rounds[i] for i in sorted(set(idx.tolist()))]


def difficulty_of(meta: dict[str, Any]) -> tuple[str, float] | None:
    """The first DIFFICULTY_KEYS field a question's meta has, and its value (Omni-MATH's binned)."""
    for key in DIFFICULTY_KEYS:
        if meta.get(key) is not None:
            value = float(meta[key])
            return key, float(math.floor(value)) if key == "difficulty" else value
    return None


def position_bin(i: int, n: int, bins: int) -> int:
    """The relative-position bin of step i of n: a step spans [i/n, (i+1)/n] of its trace, and
    its midpoint picks the bin."""
    return min(int((i + 0.5) / n * bins), bins - 1)


def usage_by_position(traces: list[dict[str, Any]], bins: int = 10) -> dict[bool, np.ndarray]:
    """Share of steps from the large model per relative-position bin, for correct/wrong traces."""
    large = {True: np.zeros(bins), False: np.zeros(bins)}
    count = {True: np.zeros(bins), False: np.zeros(bins)}
    for t in traces:
        steps = t.get("steps") or []
        ok = bool(t.get("correct"))
        for i, step in enumerate(steps):
            b = position_bin(i, len(steps), bins)
            count[ok][b] += 1
            large[ok][b] += step.get("model") == "large"
    with np.errstate(invalid="ignore", divide="ignore"):
        return {ok: large[ok] / count[ok] for ok in (True, False)}


def usage_by_difficulty(traces: list[dict[str, Any]]) -> tuple[str | None, dict[bool, dict[float, float]]]:
    """Share of steps from the large model per difficulty value, for correct/wrong traces."""
    large: dict[bool, dict[float, int]] = {True: defaultdict(int), False: defaultdict(int)}
    count: dict[bool, dict[float, int]] = {True: defaultdict(int), False: defaultdict(int)}
    key_used = None
    for t in traces:
        found = difficulty_of(t.get("meta") or {})
        if found is None:
            continue
        key_used, level = found
        ok = bool(t.get("correct"))
        for step in t.get("steps") or []:
            count[ok][level] += 1
            large[ok][level] += step.get("model") == "large"
    shares = {ok: {lv: large[ok][lv] / n for lv, n in count[ok].items() if n} for ok in (True, False)}
    return key_used, shares


def large_usage(run: Run, path: Path, bins: int = 10) -> Path:
    """Figure 5: large-model usage by relative step position and by difficulty."""
    traces = run.traces
    if not traces:
        raise ValueError(f"{run.path} has no traces.jsonl to draw large-model usage from")
    key, by_level = usage_by_difficulty(traces)
    fig = Figure(figsize=(10 if key else 5, 3.6), layout="constrained")
    axes = fig.subplots(1, 2 if key else 1, squeeze=False)[0]
    centers = (np.arange(bins) + 0.5) / bins
    for ok, style in ((True, "tab:blue"), (False, "tab:orange")):
        share = usage_by_position(traces, bins)[ok]
        axes[0].plot(centers, share, marker="o", color=style, label="correct" if ok else "wrong")
    axes[0].set_xlabel("relative step position")
    axes[0].set_ylabel("share of steps by the large model")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize="small")
    if key:
        levels = sorted(set(by_level[True]) | set(by_level[False]))
        x = np.arange(len(levels))
        for offset, ok, style in ((-0.2, True, "tab:blue"), (0.2, False, "tab:orange")):
            heights = [by_level[ok].get(lv, np.nan) for lv in levels]
            axes[1].bar(x + offset, heights, width=0.4, color=style, label="correct" if ok else "wrong")
        axes[1].set_xticks(x, [f"{lv:g}" for lv in levels])
        axes[1].set_xlabel(key)
        axes[1].set_ylim(0, 1)
        axes[1].legend(fontsize="small")
    fig.suptitle(f"{run.path.name}: large-model usage")
    return save_figure(fig, path)


def accuracy_vs_flops(runs: list[Run], path: Path) -> Path:
    """Accuracy against FLOPs per benchmark: STEER runs joined over gamma, baselines as points."""
    benchmarks = sorted(
        {r.benchmark for r in runs},
        key=lambda b: list(BENCHMARK_LABELS).index(b) if b in BENCHMARK_LABELS else len(BENCHMARK_LABELS),
    )
    with_pair = len({r.pair for r in runs}) > 1
    fig = Figure(figsize=(4.2 * len(benchmarks), 3.6), layout="constrained")
    axes = fig.subplots(1, len(benchmarks), squeeze=False)[0]
    markers = dict(zip(METHOD_LABELS, "sD^vPo", strict=True))
    for ax, bench in zip(axes, benchmarks, strict=True):
        here = [r for r in runs if r.benchmark == bench]
        keys = varying(here)
        sweeps: dict[tuple, list[Run]] = defaultdict(list)
        for r in here:
            if r.method == "steer":
                # One line per pair, policy and every other option: a line joins one threshold's
                # sweep (gamma, or p), never percentile runs with posterior ones.
                policy = (r.summary.get("options") or {}).get("policy", "posterior")
                sweeps[(r.pair, policy, *r.variant(keys["steer"])[1:])].append(r)
                continue
            label = row_label(r, with_pair, keys[r.method])
            ax.scatter(
                r.flops_per_query,
                r.accuracy * 100,
                marker=markers.get(r.method, "x"),
                s=45,
                label=label,
                zorder=3,
            )
        for (_, policy, *rest), sweep in sweeps.items():
            sweep.sort(key=lambda r: r.flops_per_query)
            xs = [r.flops_per_query for r in sweep]
            ys = [r.accuracy * 100 for r in sweep]
            label = " ".join([pair_label(sweep[0])] * with_pair + ["STEER", policy, *rest])
            ax.plot(xs, ys, marker="o", label=label, zorder=2)
            for r, x, y in zip(sweep, xs, ys, strict=True):
                ax.annotate(r.routing, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(BENCHMARK_LABELS.get(bench, bench))
        ax.set_xlabel("FLOPs per query (1e12)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("accuracy (%)")
    return save_figure(fig, path)
