"""Figure 2: step confidences of chosen rounds, correct and incorrect traces stacked, under the
mixture the round fitted, on the measure's plotting axis (confidence_axes).

Which steps a round's histogram holds: the kept steps whose `round` is that round, of the traces
in the mixture's group (groups are contiguous blocks of the run's traces, as the loop forms them:
trace i of n is in group i * K // n) and, when each model's steps had their own mixture
(`source: generator`), written by that model. The mixture itself was fitted on the round's
confidences as rounds.jsonl lists them; in round 0 those include the small drafts that were
rewritten, which the traces no longer hold. A run without traces shows those listed confidences,
unsplit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from steer_jax.eval.confidence_axes import ConfidenceAxis, axis_for, component_densities, plot_range
from steer_jax.eval.plots import pick_rounds, save_figure
from steer_jax.eval.runs import Run

# Which mixture a histogram shows when a round has several (source: generator fits one per model).
MODEL_ORDER = ("all", "small", "large")


def run_measure(run: Run) -> str:
    """The confidence measure a run routed on (its options; max logit, the default, when absent)."""
    return str(run.option("confidence") or "max_logit")


def round_confidences(
    traces: list[dict[str, Any]], round_: int, group: int = 0, groups: int = 1, model: str = "all"
) -> dict[bool, np.ndarray]:
    """The confidences of round `round_`'s kept steps in `group` (of `groups`), by the trace's
    correctness; only `model`'s steps unless model is "all"."""
    if groups < 1 or not 0 <= group < groups:
        raise ValueError(f"group {group} is not one of {groups} group(s)")
    out: dict[bool, list[float]] = {True: [], False: []}
    n = len(traces)
    for i, trace in enumerate(traces):
        if i * groups // n != group:
            continue
        for step in trace.get("steps") or []:
            if int(step.get("round", -1)) == round_ and model in ("all", step.get("model")):
                out[bool(trace.get("correct"))].append(float(step["confidence"]))
    return {ok: np.asarray(v, dtype=float) for ok, v in out.items()}


def _pick(records: list[dict[str, Any]], group: int | None, model: str | None) -> tuple[int, str, dict]:
    """The group and model drawn, and round -> its mixture record."""
    if group is None:
        group = min(int(r.get("group", 0)) for r in records)
    mine = [r for r in records if int(r.get("group", 0)) == group]
    present = {str(r.get("model", "all")) for r in mine}
    if model is None:
        model = next((m for m in MODEL_ORDER if m in present), min(present, default="all"))
    by_round = {int(r["round"]): r for r in mine if str(r.get("model", "all")) == model}
    return group, model, by_round


def _stacked_histogram(
    ax: Any, parts: dict[bool, np.ndarray], listed: np.ndarray, axis: ConfidenceAxis, bins: np.ndarray
) -> int:
    """Correct and incorrect steps stacked, scaled so the whole stack has area 1 (a density, like
    the mixture's); the mixture's listed confidences when no step is in the traces. Returns n."""
    width = float(bins[1] - bins[0])
    n = sum(v.size for v in parts.values())
    if n == 0:
        y = axis.forward(listed)
        if y.size:
            ax.hist(y, bins=bins, weights=np.full(y.size, 1 / (y.size * width)), color="0.75",
                    label="steps (correctness unknown)")
        return int(y.size)
    data = [axis.forward(parts[True]), axis.forward(parts[False])]
    weights = [np.full(d.size, 1 / (n * width)) for d in data]
    ax.hist(data, bins=bins, weights=weights, stacked=True, color=["tab:blue", "tab:orange"],
            label=[f"correct traces ({data[0].size})", f"incorrect traces ({data[1].size})"])
    return n


def confidence_histograms(
    run: Run,
    path: Path,
    rounds: Sequence[int] | None = None,
    group: int | None = None,
    model: str | None = None,
    transform: bool = True,
) -> Path:
    """Per chosen round: correct/incorrect step confidences stacked, with the fitted mixture's
    components and sum as densities on the measure's axis (raw values when not `transform`)."""
    records = run.rounds
    if not records:
        raise ValueError(f"{run.path} has no rounds.jsonl to draw confidence histograms from")
    axis = axis_for(run_measure(run), transform)
    group, model, by_round = _pick(records, group, model)
    if not by_round:
        raise ValueError(f"{run.path}: rounds.jsonl has no mixture for group {group}, model {model}")
    chosen = list(rounds) if rounds is not None else pick_rounds(list(by_round))
    missing = [r for r in chosen if r not in by_round]
    if missing:
        raise ValueError(f"{run.path}: no mixture for round(s) {missing} in group {group}")
    groups = int(run.option("groups") or (1 + max(int(r.get("group", 0)) for r in records)))
    traces = run.traces
    fig = Figure(figsize=(3.8 * len(chosen), 3.3), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, r in zip(axes, chosen, strict=True):
        rec = by_round[r]
        listed = np.asarray(rec["confidences"], dtype=float)
        weights, means, variances = (np.asarray(rec[k], dtype=float) for k in ("weights", "means", "variances"))
        parts = round_confidences(traces, r, group, groups, model) if traces else {
            True: np.zeros(0), False: np.zeros(0)}
        every = np.concatenate([listed, parts[True], parts[False]])
        lo, hi = plot_range(every, means, variances, axis)
        bins = np.linspace(lo, hi, min(40, max(10, every.size // 5)) + 1)
        n = _stacked_histogram(ax, parts, listed, axis, bins)
        ys = np.linspace(lo, hi, 400)
        comps = component_densities(ys, weights, means, variances, axis)
        confident = int(np.argmax(means))
        for k, comp in enumerate(comps):
            # Shaded, so each component stays visible under the mixture curve it sums into.
            ax.fill_between(ys, comp, alpha=0.3, color="tab:green" if k == confident else "tab:red",
                            label="confident" if k == confident else "unconfident")
        ax.plot(ys, comps.sum(axis=0), color="black", linewidth=1.5, label="mixture")
        ax.set_title(f"round {r} (n={n})")
        ax.set_xlabel(axis.label)
    axes[0].set_ylabel("density")
    axes[-1].legend(fontsize="x-small")
    which = f"group {group}" + ("" if model == "all" else f", {model} model's steps")
    fig.suptitle(f"{run.path.name}: step confidence and fitted mixture ({which})")
    return save_figure(fig, path)
