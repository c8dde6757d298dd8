"""Reports from small constructed run directories: the table equals the summaries, figures exist."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from steer_jax.eval import main_report, report
from steer_jax.eval.plots import pick_rounds, usage_by_difficulty, usage_by_position
from steer_jax.eval.runs import load_run

PARAMS = {"small": 1_543_714_304, "large": 7_615_616_512}


def _summary(rng: np.random.Generator, method: str, benchmark: str, gamma: float | None = None) -> dict:
    accuracy = float(rng.uniform(0.1, 0.9))
    flops = float(rng.uniform(1.0, 20.0))  # 1e12 units, as summary.json holds it
    summary = {
        "method": method,
        "benchmark": benchmark,
        "n": 20,
        "accuracy": accuracy,
        "flops_per_query": flops,
        "prefill_flops_per_query": flops * 0.1,
        "executed_flops_per_query": flops * 1.2,
        "a_per_f": accuracy * 100 / flops,
        "large_step_fraction": float(rng.uniform(0, 1)),
        "wall_s": float(rng.uniform(1, 100)),
        "params": PARAMS,
    }
    if gamma is not None:
        summary["gamma"] = gamma
    return summary


def _write_run(root: Path, name: str, summary: dict, rng: np.random.Generator, steer: bool) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    with (path / "traces.jsonl").open("w") as f:
        for i in range(20):
            n_steps = int(rng.integers(2, 9))
            steps = [
                {
                    "text": f"step {k}",
                    "model": "large" if rng.uniform() < 0.3 else "small",
                    "tokens": int(rng.integers(5, 50)),
                    "confidence": float(rng.normal(20, 2)),
                    "posterior": float(rng.uniform()),
                    "round": k,
                }
                for k in range(n_steps)
            ]
            trace = {
                "id": f"q{i}",
                "output": "\n\n".join(s["text"] for s in steps),
                "answer": "1",
                "reference": "1",
                "correct": bool(rng.uniform() < summary["accuracy"]),
                "meta": {"level": int(rng.integers(1, 6))},
                "steps": steps,
            }
            f.write(json.dumps(trace) + "\n")
    if steer:
        with (path / "rounds.jsonl").open("w") as f:
            for r in range(6):
                conf = np.concatenate([rng.normal(18, 1, 12), rng.normal(23, 1, 8)])
                record = {
                    "round": r,
                    "group": 0,
                    "weights": [0.6, 0.4],
                    "means": [18.0, 23.0],
                    "variances": [1.0, 1.0],
                    "confidences": conf.tolist(),
                }
                f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    dirs = []
    for bench in ("math500", "aime"):
        for method in ("small_only", "large_only", "specreason"):
            dirs.append(_write_run(root, f"{method}_{bench}", _summary(rng, method, bench), rng, steer=False))
    for gamma in (0.3, 0.5, 0.7):
        dirs.append(
            _write_run(root, f"steer_g{gamma}_math500", _summary(rng, "steer", "math500", gamma), rng, True)
        )
    dirs.append(_write_run(root, "steer_g0.5_aime", _summary(rng, "steer", "aime", 0.5), rng, True))
    return dirs


def test_table_equals_the_summaries(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    console = Console(record=True, width=400)
    assert report(runs, out, console=console) == out
    with (out / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    label = {"small_only": "Small only", "large_only": "Large only", "specreason": "SpecReason"}
    expected_avg: dict[str, list[dict]] = {}
    for run_dir in runs:
        s = json.loads((run_dir / "summary.json").read_text())
        row = label.get(s["method"]) or f"STEER (γ={s['gamma']:g})"
        b = s["benchmark"]
        assert float(rows[row][f"{b}_acc"]) == pytest.approx(s["accuracy"] * 100)
        assert float(rows[row][f"{b}_flops_1e12"]) == pytest.approx(s["flops_per_query"])
        assert float(rows[row][f"{b}_a_per_f"]) == pytest.approx(s["a_per_f"])
        expected_avg.setdefault(row, []).append(s)
    assert set(rows) == set(expected_avg)
    for row, summaries in expected_avg.items():
        assert float(rows[row]["avg_acc"]) == pytest.approx(np.mean([s["accuracy"] * 100 for s in summaries]))
        assert int(rows[row]["avg_n_benchmarks"]) == len(summaries)
        # The paper's Average A/F: average accuracy over average FLOPs.
        assert float(rows[row]["avg_a_per_f"]) == pytest.approx(
            np.mean([s["accuracy"] * 100 for s in summaries]) / np.mean([s["flops_per_query"] for s in summaries])
        )
    # Baselines first, STEER rows by gamma: the paper's row order.
    assert list(rows) == [
        "Small only",
        "Large only",
        "SpecReason",
        "STEER (γ=0.3)",
        "STEER (γ=0.5)",
        "STEER (γ=0.7)",
    ]

    markdown = (out / "results.md").read_text()
    terminal = console.export_text()
    for run_dir in runs:
        s = json.loads((run_dir / "summary.json").read_text())
        shown = f"{s['accuracy'] * 100:.1f}"
        assert shown in markdown and shown in terminal
    assert "| Method | MATH500 Acc | MATH500 FLOPs | MATH500 A/F | AIME Acc |" in markdown
    lines = {
        line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")
    }
    assert lines["STEER (γ=0.3)"].endswith("* |"), "a row without AIME gets a partial average"
    assert "*" not in lines["Small only"]
    assert "\\* averaged over" in markdown


def test_plots_are_written_and_not_empty(runs: list[Path], tmp_path: Path) -> None:
    out = report(runs, tmp_path / "report", console=Console(file=io.StringIO()))
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert "accuracy_vs_flops.png" in names
    for gamma in (0.3, 0.5, 0.7):
        assert f"confidence_steer_g{gamma}_math500.png" in names
        assert f"large_usage_steer_g{gamma}_math500.png" in names
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, p.name
        assert f"plots/{p.name}" in (out / "results.md").read_text()
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(runs)


def test_usage_shares_are_computed_from_the_steps() -> None:
    def trace(models: list[str], correct: bool, level: int) -> dict:
        return {"correct": correct, "meta": {"level": level}, "steps": [{"model": m} for m in models]}

    traces = [
        trace(["large", "small", "small", "small"], True, 1),
        trace(["large", "large", "small", "large"], False, 3),
        trace(["small", "small"], True, 3),
    ]
    by_pos = usage_by_position(traces, bins=2)
    np.testing.assert_allclose(by_pos[True], [1 / 3, 0.0])
    np.testing.assert_allclose(by_pos[False], [1.0, 0.5])
    key, by_level = usage_by_difficulty(traces)
    assert key == "level"
    assert by_level[True] == {1.0: 0.25, 3.0: 0.0}
    assert by_level[False] == {3.0: 0.75}
    assert pick_rounds(range(20), 4) == [0, 6, 13, 19]
    assert pick_rounds([3, 1], 4) == [1, 3]


def test_cli_and_bad_run_dirs(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    # A folder holding run directories stands for all of them.
    assert main_report([str(runs[0].parent), "--out", str(out), "--rounds", "0", "5"]) == 0
    assert (out / "results.md").is_file() and (out / "results.csv").is_file()
    assert main_report([str(tmp_path / "empty_nowhere")]) == 2
    assert "empty_nowhere" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    summary = json.loads((runs[-1] / "summary.json").read_text())
    del summary["gamma"]
    (broken / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="gamma"):
        load_run(broken)
    summary.update(gamma=0.5, accuracy=73.0)
    (broken / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="fraction"):
        load_run(broken)
    assert main_report([str(broken)]) == 2
    assert main_report([str(runs[-1]), "--out", str(tmp_path / "r"), "--rounds", "99"]) == 2


def _half_unit(printed: str) -> float:
    """Half the last printed digit's place: how far the printed number may be from its value."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10.0**-decimals


def test_the_average_column_reproduces_the_papers_arithmetic(tmp_path: Path, paper_results: Path) -> None:
    """The paper's own per-benchmark rows in, as run directories; its printed averages out."""
    with paper_results.open() as f:
        rows = list(csv.DictReader(f))
    pairs = sorted({(r["table"], r["pair"]) for r in rows})
    printed, dirs = {}, []
    for size, (table, pair) in enumerate(pairs, 1):
        for r in (r for r in rows if (r["table"], r["pair"]) == (table, pair)):
            key = (table, pair, r["method"])
            if r["benchmark"] == "average":
                printed[key] = r
                continue
            acc, flops = float(r["accuracy"]), float(r["flops_per_query_1e12"])
            summary = {"method": r["method"], "benchmark": r["benchmark"], "n": 100, "accuracy": acc / 100,
                       "flops_per_query": flops, "a_per_f": float(r["a_per_f"]),
                       "params": {"small": size * 10**9, "large": size * 10**10}}
            if r["method"] == "steer":
                summary["gamma"] = 0.5
            path = tmp_path / "runs" / f"t{table}_{pair}_{r['method']}_{r['benchmark']}"
            path.mkdir(parents=True)
            (path / "summary.json").write_text(json.dumps(summary))
            dirs.append((key, path))
    ours = {}
    for table in sorted({t for t, _ in pairs}):
        for pair in sorted({p for t, p in pairs if t == table}):
            mine = [d for (t, p, _), d in dirs if (t, p) == (table, pair)]
            out = report(mine, tmp_path / f"report_{table}_{pair}", console=Console(file=io.StringIO()))
            with (out / "results.csv").open() as f:
                got = list(csv.DictReader(f))
            for row in got:
                method = {"Small only": "small_only", "Large only": "large_only", "Query router": "query_router",
                          "SpecReason": "specreason", "RSD": "rsd"}.get(row["method"], "steer")
                inputs = [r for r in rows if (r["table"], r["pair"], r["method"]) == (table, pair, method)
                          and r["benchmark"] != "average"]
                ours[(table, pair, method)] = (row, inputs)
    assert set(ours) == set(printed)
    # The paper averaged unrounded values and printed them rounded; we average its rounded
    # inputs. Each tolerance is exactly those two roundings.
    hits, mean_of_af_hits, misses = 0, 0, []
    for key, (row, inputs) in ours.items():
        want = printed[key]
        acc, flops, a_f = (float(row[k]) for k in ("avg_acc", "avg_flops_1e12", "avg_a_per_f"))
        assert acc == pytest.approx(np.mean([float(r["accuracy"]) for r in inputs]))
        assert flops == pytest.approx(np.mean([float(r["flops_per_query_1e12"]) for r in inputs]))
        e_acc = np.mean([_half_unit(r["accuracy"]) for r in inputs])
        e_flops = np.mean([_half_unit(r["flops_per_query_1e12"]) for r in inputs])
        tol = a_f * (e_acc / acc + e_flops / flops) * 1.01 + _half_unit(want["a_per_f"])
        if abs(a_f - float(want["a_per_f"])) <= tol:
            hits += 1
        else:
            misses.append((key, want))
        mean_af = np.mean([float(r["a_per_f"]) for r in inputs])
        tol_mean = np.mean([_half_unit(r["a_per_f"]) for r in inputs]) + _half_unit(want["a_per_f"])
        mean_of_af_hits += abs(mean_af - float(want["a_per_f"])) <= tol_mean
    # Average accuracy / average FLOPs gives the paper's printed A/F on 21 of its 24 rows; the
    # mean of the per-benchmark A/F on none.
    assert hits >= 21 and mean_of_af_hits == 0, (hits, mean_of_af_hits)
    # Each row it misses is one where the paper's printed averages contradict its own figures:
    # its average FLOPs is not the mean of its inputs, or its A/F not its average accuracy over
    # its average FLOPs, to their rounding.
    for key, want in misses:
        _, inputs = ours[key]
        f_mean = np.mean([float(r["flops_per_query_1e12"]) for r in inputs])
        f_tol = np.mean([_half_unit(r["flops_per_query_1e12"]) for r in inputs]) + _half_unit(
            want["flops_per_query_1e12"])
        printed_af = float(want["accuracy"]) / float(want["flops_per_query_1e12"])
        af_tol = printed_af * (_half_unit(want["accuracy"]) / float(want["accuracy"]) + _half_unit(
            want["flops_per_query_1e12"]) / float(want["flops_per_query_1e12"])) + _half_unit(want["a_per_f"])
        assert (abs(f_mean - float(want["flops_per_query_1e12"])) > f_tol
                or abs(printed_af - float(want["a_per_f"])) > af_tol), key



def test_korbench_subsets_pool_into_one_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    counts = {"korbench_cipher": 10, "korbench_counterfactual": 30, "korbench_logic": 60}
    dirs = []
    for method in ("small_only", "large_only"):
        for bench, n in counts.items():
            if method == "large_only" and bench == "korbench_logic":
                continue  # a row that lacks a subset
            s = {**_summary(rng, method, bench), "n": n}
            dirs.append(_write_run(tmp_path / "runs", f"{method}_{bench}", s, rng, steer=False))
    console = Console(file=io.StringIO())
    out = report(dirs, tmp_path / "pooled", console=console)
    with (out / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for label, method in (("Small only", "small_only"), ("Large only", "large_only")):
        runs = [json.loads((d / "summary.json").read_text()) for d in dirs if d.name.startswith(method)]
        n = sum(s["n"] for s in runs)
        acc = sum(s["accuracy"] * 100 * s["n"] for s in runs) / n
        flops = sum(s["flops_per_query"] * s["n"] for s in runs) / n
        assert float(rows[label]["korbench_acc"]) == pytest.approx(acc)
        assert float(rows[label]["korbench_flops_1e12"]) == pytest.approx(flops)
        assert float(rows[label]["korbench_a_per_f"]) == pytest.approx(acc / flops)
        assert int(rows[label]["avg_n_benchmarks"]) == 1
        assert not any(k.startswith("korbench_cipher") for k in rows[label])
    markdown = (out / "results.md").read_text()
    assert "KOR-Bench Acc" in markdown and "KOR cipher" not in markdown
    assert "\\+ pooled over the KOR-Bench subsets that row has" in markdown
    split = report(dirs, tmp_path / "split", console=console, korbench_subsets=True)
    with (split / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["Small only"]["korbench_logic_acc"]) > 0 and "korbench_acc" not in rows["Small only"]
    without_n = json.loads((dirs[0] / "summary.json").read_text())
    del without_n["n"]
    (dirs[0] / "summary.json").write_text(json.dumps(without_n))
    with pytest.raises(ValueError, match="question count"):
        report(dirs, tmp_path / "no_n", console=console)


def test_distinct_runs_never_share_a_label(tmp_path: Path) -> None:
    from steer_jax.steer import SteerOptions

    rng = np.random.default_rng(2)
    base = dataclasses.asdict(SteerOptions())
    variants = {
        "gamma": ("steer", {}),
        "percentile": ("steer", {"policy": "percentile", "percentile": 0.3}),
        "max_prob": ("steer", {"confidence": "max_prob"}),
        "refine_all": ("steer", {"refine": "all"}),
        "groups": ("steer", {"groups": 5}),
        "continuous": ("steer", {"schedule": "continuous", "chunk": 8}),
        "judge7": ("specreason", {}),
        "judge8": ("specreason", {"judge_threshold": 8}),
        "again_a": ("small_only", {"seed": 3}),
        "again_b": ("small_only", {"seed": 3}),  # the same config twice: both kept
    }
    dirs = []
    for name, (method, change) in variants.items():
        s = _summary(rng, method, "math500", 0.5 if method == "steer" else None)
        s["options"] = {**base, "method": method, **change}
        dirs.append(_write_run(tmp_path / "runs", name, s, rng, steer=method == "steer"))
    out = report(dirs, tmp_path / "report", console=Console(file=io.StringIO()))
    with (out / "results.csv").open() as f:
        rows = [r["method"] for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) == len(variants)
    for want in ("STEER (γ=0.5)", "STEER (p=0.3)", "STEER (γ=0.5, max_prob)", "STEER (γ=0.5, refine=all)",
                 "STEER (γ=0.5, K=5)", "STEER (γ=0.5, continuous, chunk=8)", "SpecReason",
                 "SpecReason (judge>=8)", "Small only [again_a]", "Small only [again_b]"):
        assert want in rows
