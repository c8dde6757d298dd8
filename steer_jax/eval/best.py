"""`steer-jax report --best accuracy|a_per_f`: each method's best grid point, as the paper shows
its methods (every threshold the best of a grid search).

Runs compete within one (pair, method, benchmark column): whatever else they differ in (gamma,
percentile, K, a judge threshold, ...) are grid points of that method. Criterion `accuracy`:
the highest accuracy, ties to fewer FLOPs per query; `a_per_f`: the highest A/F, ties to the
higher accuracy; then, still tied, the run directory first by name. A pooled KOR-Bench column
chooses one grid point for its three subsets together: runs of the subsets with the same options
are one point, scored on their pooled figures (table.pool).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass

from steer_jax.eval.runs import Run
from steer_jax.eval.table import (BENCHMARK_LABELS, KORBENCH, KORBENCH_SUBSETS, METHOD_LABELS,
                                  Cell, pair_label, pool, varying)

CRITERIA = ("accuracy", "a_per_f")
TIE_BREAKS = {"accuracy": "fewer FLOPs per query", "a_per_f": "the higher accuracy"}


@dataclass(frozen=True)
class Best:
    """The chosen runs and the words that say how they were chosen."""

    runs: list[Run]
    caption: str  # the rule: criterion, tie-breaks, how many runs were left out
    points: list[str]  # per chosen grid point: which it was


def _column(run: Run, korbench_subsets: bool) -> str:
    return KORBENCH if not korbench_subsets and run.benchmark in KORBENCH_SUBSETS else run.benchmark


def _point_key(run: Run, pooled: bool) -> str:
    # Only a pooled column joins runs (one per subset) into a point; elsewhere a run is one.
    options = run.summary.get("options")
    return json.dumps(options, sort_keys=True) if pooled and options else str(run.path)


def _score(runs: list[Run], criterion: str) -> tuple:
    """Sort key of a grid point: best first, then the tie-breaks."""
    if len(runs) == 1:
        acc, flops, a_f = runs[0].accuracy * 100.0, runs[0].flops_per_query, runs[0].a_per_f
    else:
        cell = pool([Cell(acc=r.accuracy * 100.0, flops=r.flops_per_query, a_per_f=r.a_per_f,
                          source=r.path, n=r.summary.get("n")) for r in runs])
        acc, flops, a_f = cell.acc, cell.flops, cell.a_per_f
    a_f = -math.inf if math.isnan(a_f) else a_f  # no FLOPs: nothing to rank by
    first = min((r.path.name, str(r.path)) for r in runs)
    return (-acc, flops, first) if criterion == "accuracy" else (-a_f, -acc, first)


def pick_best(runs: list[Run], criterion: str, korbench_subsets: bool = False) -> Best:
    """One grid point per (pair, method, benchmark column), by `criterion` (module docstring)."""
    if criterion not in CRITERIA:
        raise ValueError(f"--best must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    groups: dict[tuple[str, str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        column = _column(run, korbench_subsets)
        groups[(pair_label(run), run.method, column)][_point_key(run, column == KORBENCH)].append(run)
    keys = varying(runs)
    chosen: list[Run] = []
    points = []
    for (pair, method, column), candidates in groups.items():
        best = min(candidates.values(), key=lambda rs: _score(rs, criterion))
        chosen += best
        what = ", ".join(best[0].variant(keys[method])) or "its only setting"
        dirs = ", ".join(sorted(r.path.name for r in best))
        points.append(f"{pair} {METHOD_LABELS.get(method, method)} on "
                      f"{BENCHMARK_LABELS.get(column, column)}: {what} "
                      f"({dirs}; best of {len(candidates)})")
    caption = (f"Each method's best grid point per pair and benchmark by "
               f"{'accuracy' if criterion == 'accuracy' else 'A/F'} (ties: "
               f"{TIE_BREAKS[criterion]}, then the run directory first by name); "
               f"{len(chosen)} of {len(runs)} runs shown, every run in runs.csv.")
    return Best(runs=chosen, caption=caption, points=points)
