"""Figure 5: the share of steps the large model wrote, by relative step position (10 bins, 0.1 =
the first tenth of a trace ... 1.0 = its last) and by the question's difficulty, as two heatmaps:
correctly and incorrectly solved traces side by side, on one colour scale, empty cells blank.

Difficulty is the first of plots.DIFFICULTY_KEYS a question's meta holds (MATH500 and the demo's
`level`, Omni-MATH's `difficulty` floored to a whole number, MuSiQue's `hops`); traces without one
are left out. Positions are binned as plots.usage_by_position bins them (the step's midpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from steer_jax.eval.plots import difficulty_of, position_bin, save_figure
from steer_jax.eval.runs import Run


@dataclass(frozen=True)
class UsageGrid:
    """Step counts per (difficulty level, position bin), for correct (True) and incorrect traces."""

    key: str | None  # the meta field the levels come from; None: no trace has one
    levels: list[float]
    large: dict[bool, np.ndarray]  # [len(levels), bins] steps written by the large model
    count: dict[bool, np.ndarray]  # [len(levels), bins] all steps
    traces: dict[bool, int]  # traces counted

    def share(self, correct: bool) -> np.ndarray:
        """Large steps over all steps per cell; NaN where a cell has no step."""
        count = self.count[correct]
        out = np.full(count.shape, np.nan)
        np.divide(self.large[correct], count, out=out, where=count > 0)
        return out


def usage_grid(traces: list[dict[str, Any]], bins: int = 10) -> UsageGrid:
    """Count each trace's steps into its (difficulty, position) cell, correct and incorrect apart."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    rated = []
    key = None
    for t in traces:
        found = difficulty_of(t.get("meta") or {})
        if found is not None and t.get("steps"):
            key = key or found[0]
            if found[0] == key:  # one scale per figure: a trace graded by another field is left out
                rated.append((found[1], t))
    levels = sorted({level for level, _ in rated})
    row = {level: i for i, level in enumerate(levels)}
    large = {ok: np.zeros((len(levels), bins)) for ok in (True, False)}
    count = {ok: np.zeros((len(levels), bins)) for ok in (True, False)}
    for level, t in rated:
        ok, steps = bool(t.get("correct")), t["steps"]
        for i, step in enumerate(steps):
            cell = row[level], position_bin(i, len(steps), bins)
            count[ok][cell] += 1
            large[ok][cell] += step.get("model") == "large"
    traces = {ok: sum(bool(t.get("correct")) == ok for _, t in rated) for ok in (True, False)}
    return UsageGrid(key, levels, large, count, traces)


def usage_heatmaps(run: Run, path: Path, bins: int = 10) -> Path | None:
    """Draw the two heatmaps; None (nothing written) when no trace has a difficulty and steps."""
    grid = usage_grid(run.traces, bins)
    if not grid.levels:
        return None
    fig = Figure(figsize=(11, 0.45 * len(grid.levels) + 2.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, ok in zip(axes, (True, False), strict=True):
        # A masked cell is drawn in the axes' background: blank, not the colour of a 0 share.
        share = np.ma.masked_invalid(grid.share(ok))
        image = ax.imshow(share, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                          interpolation="nearest")
        ax.set_xticks(np.arange(bins), [f"{(b + 1) / bins:.1f}" for b in range(bins)], fontsize=8)
        ax.set_yticks(np.arange(len(grid.levels)), [f"{lv:g}" for lv in grid.levels])
        ax.set_xlabel("relative step position")
        ax.set_title(f"{'correct' if ok else 'incorrect'} traces (n={grid.traces[ok]}, "
                     f"{int(grid.count[ok].sum())} steps)")
    axes[0].set_ylabel(grid.key)
    fig.colorbar(image, ax=list(axes), label="share of steps by the large model")
    fig.suptitle(f"{run.path.name}: large-model steps by position and {grid.key}")
    return save_figure(fig, path)
