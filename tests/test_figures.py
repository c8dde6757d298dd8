"""The report's figures (issue #23): the data each draws against hand counts, the mixture carried
onto a transformed confidence axis against the normal CDF, and each figure written from
synthetic run directories, or skipped when the runs lack its data."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console
from scipy import integrate, stats

from steer_jax.eval import report
from steer_jax.eval.confidence_axes import axis_for, component_densities
from steer_jax.eval.figures_confidence import round_confidences
from steer_jax.eval.figures_routing import accuracy_by_percentile, latency_bars, routing_latency
from steer_jax.eval.figures_usage import usage_grid
from steer_jax.eval.runs import Run
from steer_jax.options import SteerOptions

PARAMS = {"small": 1_543_714_304, "large": 7_615_616_512}
DEFAULTS = dataclasses.asdict(SteerOptions())


@pytest.mark.parametrize(
    ("measure", "weights", "means", "sds", "x_range"),
    [
        ("max_prob", [0.3, 0.7], [0.90, 0.985], [0.04, 0.006], (0.80, 0.9995)),
        ("neg_entropy", [0.4, 0.6], [-0.60, -0.08], [0.15, 0.03], (-1.1, -0.002)),
        ("max_logit", [0.5, 0.5], [18.0, 23.0], [1.0, 1.5], (15.0, 26.0)),
    ],
)
def test_the_transformed_mixture_keeps_its_mass(measure, weights, means, sds, x_range) -> None:
    axis = axis_for(measure)
    lo, hi = axis.forward(np.array(x_range))
    variances = np.square(sds)
    for k in range(2):
        def density(y: float, k: int = k) -> float:
            return float(component_densities(np.array([y]), weights, means, variances, axis)[k, 0])

        got, _ = integrate.quad(density, lo, hi, limit=200, points=[float(axis.forward(np.array(means[k])))])
        dist = stats.norm(means[k], sds[k])
        want = weights[k] * (dist.cdf(x_range[1]) - dist.cdf(x_range[0]))
        assert got == pytest.approx(want, rel=1e-6), (measure, k)
        if measure != "max_logit":
            # Without the Jacobian the curve is not a density on the plotted axis.
            bare, _ = integrate.quad(lambda y: weights[k] * dist.pdf(axis.inverse(np.array(y))), lo, hi, limit=200)
            assert abs(bare - want) > 0.05 * want
    ys = np.linspace(lo, hi, 7)
    np.testing.assert_allclose(axis.forward(axis.inverse(ys)), ys, rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(axis.forward(np.linspace(*x_range, 50))) > 0), "confident stays on the right"


def test_a_probability_of_one_is_drawn_at_the_axis_cap() -> None:
    axis = axis_for("max_prob")
    assert axis.forward(np.array([1.0]))[0] == pytest.approx(24 * math.log(2))
    assert axis_for("max_prob", transform=False).forward(np.array([0.5]))[0] == 0.5
    with pytest.raises(ValueError, match="unknown confidence measure 'logit'"):
        axis_for("logit")


def test_round_confidences_split_by_correctness_group_and_model() -> None:
    def trace(correct: bool, steps: list[tuple[int, str, float]]) -> dict:
        return {"correct": correct, "steps": [{"round": r, "model": m, "confidence": c} for r, m, c in steps]}

    traces = [  # two groups of two: traces 0-1 and 2-3
        trace(True, [(0, "small", 1.0), (1, "large", 2.0), (2, "small", 3.0)]),
        trace(False, [(0, "large", 4.0), (1, "small", 5.0)]),
        trace(True, [(0, "small", 6.0), (1, "small", 7.0)]),
        trace(False, [(0, "small", 8.0), (1, "large", 9.0)]),
    ]
    got = round_confidences(traces, 1)
    assert got[True].tolist() == [2.0, 7.0] and got[False].tolist() == [5.0, 9.0]
    got = round_confidences(traces, 1, group=1, groups=2)
    assert got[True].tolist() == [7.0] and got[False].tolist() == [9.0]
    got = round_confidences(traces, 0, group=0, groups=2, model="small")
    assert got[True].tolist() == [1.0] and got[False].tolist() == []
    with pytest.raises(ValueError, match="group 2 is not one of 2"):
        round_confidences(traces, 0, group=2, groups=2)


def test_usage_grid_equals_a_hand_count() -> None:
    def trace(models: str, correct: bool, meta: dict) -> dict:
        steps = [{"model": "large" if m == "L" else "small"} for m in models]
        return {"correct": correct, "meta": meta, "steps": steps}

    traces = [
        trace("LSSL", True, {"difficulty": 2.5}),  # Omni-MATH's 2.5 is level 2
        trace("SSL", True, {"level": 4}),  # graded by another field: left out
        trace("SL", True, {"difficulty": 2.0}),
        trace("LLSSSLSL", False, {"difficulty": 7}),
        trace("LLL", False, {}),  # no difficulty: left out
    ]
    grid = usage_grid(traces, bins=4)
    assert grid.key == "difficulty" and grid.levels == [2.0, 7.0]
    assert grid.traces == {True: 2, False: 1}
    # Step i of n falls in bin floor((i + 0.5) / n * 4): "SL" in bins 1 and 3, the 8-step trace two a bin.
    np.testing.assert_array_equal(grid.count[True], [[1, 2, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(grid.large[True], [[1, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(grid.count[False], [[0, 0, 0, 0], [2, 2, 2, 2]])
    np.testing.assert_array_equal(grid.large[False], [[0, 0, 0, 0], [2, 0, 1, 1]])
    np.testing.assert_array_equal(grid.share(True), [[1, 0, 0, 1], [np.nan] * 4])
    np.testing.assert_array_equal(grid.share(False), [[np.nan] * 4, [1, 0, 0.5, 0.5]])
    assert usage_grid([traces[4]]).levels == []


def _summary(method: str, benchmark: str, accuracy: float, **options) -> dict:
    summary = {"method": method, "benchmark": benchmark, "n": 20, "accuracy": accuracy, "flops_per_query": 5.0,
               "a_per_f": accuracy * 100 / 5.0, "large_step_fraction": 0.3, "wall_s": 10.0, "params": PARAMS,
               "options": {**DEFAULTS, "method": method, **options}}
    if method == "steer":
        summary["gamma"] = options.get("gamma", 0.5)
    return summary


def _pct(measure: str, p: float, acc: float, bench: str = "math500", **options) -> dict:
    return _summary("steer", bench, acc, policy="percentile", percentile=p, confidence=measure, **options)


def test_accuracy_by_percentile_lines_per_measure() -> None:
    summaries = [
        _pct("max_logit", 0.5, 0.80), _pct("max_logit", 0.1, 0.60), _pct("max_logit", 0.3, 0.70),
        _pct("max_prob", 0.3, 0.66), _pct("max_prob", 0.1, 0.58),
        _pct("neg_entropy", 0.3, 0.65),  # one p only: no line
        _pct("max_logit", 0.1, 0.55, aggregate="math"), _pct("max_logit", 0.3, 0.75, aggregate="math"),
        _summary("steer", "math500", 0.9),  # posterior routing: not in the figure
        _pct("max_logit", 0.3, 0.40, bench="aime"),  # a panel with no line
    ]
    runs = [Run(Path(f"run{i}"), s) for i, s in enumerate(summaries)]
    data = accuracy_by_percentile(runs)
    assert list(data) == [("1.54B/7.62B", "math500")]
    lines = data[("1.54B/7.62B", "math500")]
    assert set(lines) == {"max_logit", "max_prob", "max_logit, aggregate=math"}
    expected = {"max_logit": [(0.1, 60.0), (0.3, 70.0), (0.5, 80.0)], "max_prob": [(0.1, 58.0), (0.3, 66.0)],
                "max_logit, aggregate=math": [(0.1, 55.0), (0.3, 75.0)]}
    for label, points in expected.items():
        assert [p for p, _ in lines[label]] == [p for p, _ in points]
        np.testing.assert_allclose([a for _, a in lines[label]], [a for _, a in points])


def test_latency_bars_average_each_method(tmp_path: Path) -> None:
    timed = {"steer": [(0.002, 0.02), (0.004, 0.06)], "specreason": [(0.1, 1.0)], "small_only": [(0.0, 0.0)]}
    runs = []
    for method, values in timed.items():
        for q, r in values:
            s = _summary(method, "math500", 0.5)
            s.update(routing_s_per_query=q, routing_s_per_round=r)
            runs.append(Run(Path(f"{method}{q}"), s))
    runs.append(Run(Path("large"), _summary("large_only", "math500", 0.7)))  # no timing stated
    bars, untimed = latency_bars(runs)
    assert [b.label for b in bars] == ["SpecReason", "STEER"]  # METHODS order: specreason before steer
    assert [(b.mean, b.low, b.high, b.runs) for b in bars] == [
        pytest.approx((0.1, 0.1, 0.1, 1)), pytest.approx((0.003, 0.002, 0.004, 2))]
    assert untimed == ["small_only"]
    bars, _ = latency_bars(runs, "routing_s_per_round")
    assert bars[1].mean == pytest.approx(0.04)
    with pytest.raises(ValueError, match="routing_s_per_step"):
        latency_bars(runs, "routing_s_per_step")
    assert routing_latency(runs[-1:], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _write_run(root: Path, name: str, summary: dict, rng: np.random.Generator) -> Path:
    """A run directory whose steps' confidences are max probabilities (in (0, 1])."""
    path = root / name
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    traces = []
    for i in range(24):
        steps = [{"text": f"s{k}", "model": "large" if rng.uniform() < 0.3 else "small", "tokens": 10,
                  "confidence": float(1 - np.exp(-rng.normal(4, 1.5))), "posterior": 0.5, "round": k}
                 for k in range(int(rng.integers(2, 9)))]
        traces.append({"id": f"q{i}", "output": "", "answer": "1", "reference": "1",
                       "correct": bool(rng.uniform() < 0.6), "meta": {"difficulty": float(rng.uniform(1, 9.5))},
                       "steps": steps})
    (path / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    if summary["method"] == "steer":
        records = [{"round": r, "group": 0, "model": "all", "weights": [0.4, 0.6], "means": [0.93, 0.995],
                    "variances": [0.002, 0.00001], "confidences": [s["confidence"] for t in traces
                                                                   for s in t["steps"] if s["round"] == r]}
                   for r in range(8)]
        (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _png_drawn(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, path.name
    assert float(np.std(imread(path)[..., :3])) > 0.05, f"{path.name} is blank"


def test_every_figure_is_written_from_run_dirs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    dirs = [_write_run(root, f"pct_{m}_{p}", _pct(m, p, float(rng.uniform(0.4, 0.9))), rng)
            for m in ("max_logit", "max_prob") for p in (0.1, 0.3, 0.5)]
    dirs.append(_write_run(root, "steer_prob", _summary("steer", "omnimath", 0.6, confidence="max_prob"), rng))
    for method, seconds in (("specreason", 0.2), ("rsd", 0.15), ("small_only", 0.0)):
        s = _summary(method, "omnimath", float(rng.uniform(0.3, 0.8)))
        s.update(routing_s_per_query=seconds, routing_s_per_round=seconds * 10)
        dirs.append(_write_run(root, method, s, rng))
    out = report(dirs, tmp_path / "report", console=Console(file=io.StringIO()))
    plots = {p.name for p in (out / "plots").glob("*.png")}
    for name in ("accuracy_vs_flops", "accuracy_vs_percentile", "routing_latency", "confidence_steer_prob",
                 "large_usage_steer_prob", "large_usage_grid_steer_prob", "large_usage_grid_pct_max_prob_0.3"):
        assert f"{name}.png" in plots, name
    markdown = (out / "results.md").read_text()
    for name in plots:
        _png_drawn(out / "plots" / name)
        assert f"plots/{name}" in markdown

    # Without percentile sweeps, routing times or difficulties, those figures are not drawn.
    plain = []
    for name in ("steer_prob", "specreason"):
        summary = json.loads((root / name / "summary.json").read_text())
        summary.pop("routing_s_per_query", None)
        summary.pop("routing_s_per_round", None)
        traces = [json.loads(line) for line in (root / name / "traces.jsonl").read_text().splitlines()]
        for t in traces:
            t["meta"] = {}
        (root / name / "summary.json").write_text(json.dumps(summary))
        (root / name / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
        plain.append(root / name)
    out = report(plain, tmp_path / "plain", console=Console(file=io.StringIO()))
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {"accuracy_vs_flops.png", "confidence_steer_prob.png", "large_usage_steer_prob.png"}


def test_histograms_pick_a_mixture_or_say_which_is_missing(tmp_path: Path) -> None:
    from steer_jax.eval.figures_confidence import confidence_histograms
    from steer_jax.eval.runs import load_run

    rng = np.random.default_rng(3)
    run = load_run(_write_run(tmp_path, "steer", _summary("steer", "math500", 0.6, confidence="max_prob"), rng))
    path = confidence_histograms(run, tmp_path / "c.png", rounds=[0, 3])
    _png_drawn(path)
    with pytest.raises(ValueError, match="no mixture for group 0, model large"):
        confidence_histograms(run, tmp_path / "x.png", model="large")
    with pytest.raises(ValueError, match=r"no mixture for round\(s\) \[99\]"):
        confidence_histograms(run, tmp_path / "x.png", rounds=[99])
    assert not (tmp_path / "x.png").exists()
