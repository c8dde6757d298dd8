"""Every figure a set of runs has data for, written into one folder; figures without data are
skipped, never drawn empty.

Across runs: accuracy against FLOPs; accuracy against p per confidence measure (Figure 3, when a
measure has percentile runs at two p values or more); routing latency per method (Figure 4, when
summaries state `routing_s_per_query`). Per run: the confidence histograms with the fitted mixture
(Figure 2, runs with rounds.jsonl) and, for STEER runs with traces, large-model usage as two
marginals and as position x difficulty heatmaps (Figure 5, when questions carry a difficulty).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from steer_jax.eval import figures_confidence, figures_routing, figures_usage, plots
from steer_jax.eval.runs import Run


def _slug(run: Run, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.path.name) or "run"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def build(runs: list[Run], folder: Path, rounds: Sequence[int] | None = None) -> list[tuple[str, Path]]:
    """Draw the figures into `folder`; returns (title, path) of each written, in report order.

    `rounds` picks the rounds of the confidence histograms (default: up to four, spread out)."""
    folder = Path(folder)
    figures = [("Accuracy against FLOPs", plots.accuracy_vs_flops(runs, folder / "accuracy_vs_flops.png"))]
    across = (
        ("Accuracy against the routed share p, per confidence measure",
         figures_routing.accuracy_vs_percentile(runs, folder / "accuracy_vs_percentile.png")),
        ("Routing latency per method", figures_routing.routing_latency(runs, folder / "routing_latency.png")),
    )
    figures += [(title, path) for title, path in across if path is not None]
    taken: set[str] = set()
    for run in runs:
        slug = _slug(run, taken)
        if run.rounds:
            path = figures_confidence.confidence_histograms(run, folder / f"confidence_{slug}.png", rounds=rounds)
            figures.append((f"Step confidence and fitted mixture: {run.path.name}", path))
        if run.method == "steer" and run.traces:
            path = plots.large_usage(run, folder / f"large_usage_{slug}.png")
            figures.append((f"Large-model usage: {run.path.name}", path))
            grid = figures_usage.usage_heatmaps(run, folder / f"large_usage_grid_{slug}.png")
            if grid is not None:
                figures.append((f"Large-model usage by position and difficulty: {run.path.name}", grid))
    return figures
