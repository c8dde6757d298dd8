"""`steer-jax report --best`: the grid point each criterion documents, ties included, on run
directories whose figures are chosen here; the rule stated; every run kept in runs.csv."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console

from steer_jax.eval import main_report, report
from steer_jax.options import SteerOptions


def _run(root: Path, name: str, method: str, benchmark: str, acc: float, flops: float,
         a_per_f: float | None = None, n: int = 50, **options) -> Path:
    path = root / name
    path.mkdir(parents=True)
    opts = {**dataclasses.asdict(SteerOptions()), "method": method, **options}
    summary = {"method": method, "benchmark": benchmark, "n": n, "accuracy": acc,
               "flops_per_query": flops,
               "a_per_f": acc * 100 / flops if a_per_f is None else a_per_f,
               "params": {"small": 4_000_000_000, "large": 12_000_000_000}, "options": opts,
               **({"gamma": opts["gamma"]} if method == "steer" else {})}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture()
def grid(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "runs"
    runs = {
        # MATH500: 0.3 and 0.5 tie on accuracy, 0.5 with fewer FLOPs; 0.7 and 0.9 tie on A/F
        # (set, not computed: an exact tie), 0.7 the more accurate.
        "g0.3_m": ("steer", "math500", 0.80, 10.0, 8.0, {"gamma": 0.3}),
        "g0.5_m": ("steer", "math500", 0.80, 8.0, 10.0, {"gamma": 0.5}),
        "g0.7_m": ("steer", "math500", 0.70, 5.0, 14.0, {"gamma": 0.7}),
        "g0.9_m": ("steer", "math500", 0.35, 2.5, 14.0, {"gamma": 0.9}),
        # AIME: two points alike in every figure: the first directory by name.
        "g0.5_a": ("steer", "aime", 0.30, 10.0, 3.0, {"gamma": 0.5}),
        "g0.3_a": ("steer", "aime", 0.30, 10.0, 3.0, {"gamma": 0.3}),
        "judge7": ("specreason", "math500", 0.75, 9.0, None, {}),
        "judge8": ("specreason", "math500", 0.78, 12.0, None, {"judge_threshold": 8}),
        "small": ("small_only", "math500", 0.60, 3.0, None, {}),
    }
    return {name: _run(root, name, m, b, acc, flops, af, **opts)
            for name, (m, b, acc, flops, af, opts) in runs.items()}


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


@pytest.mark.parametrize("criterion, chosen", [
    ("accuracy", {"STEER": {"math500": "g0.5_m", "aime": "g0.3_a"}, "SpecReason": {"math500": "judge8"}}),
    ("a_per_f", {"STEER": {"math500": "g0.7_m", "aime": "g0.3_a"}, "SpecReason": {"math500": "judge7"}}),
])
def test_best_picks_the_documented_point(grid, tmp_path, criterion, chosen) -> None:
    console = Console(record=True, width=300)
    out = report(list(grid.values()), tmp_path / criterion, console=console, best=criterion)
    rows = _rows(out)
    assert set(rows) == {"STEER", "SpecReason", "Small only"}  # one row per method
    chosen = {**chosen, "Small only": {"math500": "small"}}
    for row, cells in chosen.items():
        for bench, name in cells.items():
            s = _summary(grid[name])
            assert float(rows[row][f"{bench}_acc"]) == pytest.approx(s["accuracy"] * 100), (row, bench)
            assert float(rows[row][f"{bench}_flops_1e12"]) == pytest.approx(s["flops_per_query"])
            assert float(rows[row][f"{bench}_a_per_f"]) == pytest.approx(s["a_per_f"])
    tie = {"accuracy": "ties: fewer FLOPs per query", "a_per_f": "ties: the higher accuracy"}[criterion]
    markdown, terminal = (out / "results.md").read_text(), " ".join(console.export_text().split())
    for text in (markdown, terminal):
        assert f"best grid point per pair and benchmark by {'accuracy' if criterion == 'accuracy' else 'A/F'}" in text
        assert tie in text and "then the run directory first by name" in text
        assert f"{len(chosen) + 1} of {len(grid)} runs shown" in text
        assert f"({chosen['STEER']['math500']}; best of 4)" in text
        # A full tie shows the same figures whichever wins: the rule names the one it took.
        assert f"({chosen['STEER']['aime']}; best of 2)" in text
    with (out / "runs.csv").open() as f:  # the other points stay on record
        assert sorted(Path(r["run_dir"]).name for r in csv.DictReader(f)) == sorted(grid)


def test_best_chooses_one_point_for_the_pooled_korbench(tmp_path: Path) -> None:
    # Point 0.3 wins the cipher subset, 0.5 the pooled column (weighted by question counts).
    subsets = {"korbench_cipher": (10, 0.9, 0.1), "korbench_counterfactual": (30, 0.5, 0.6),
               "korbench_logic": (60, 0.5, 0.6)}
    dirs = [_run(tmp_path / "runs", f"g{g}_{b}", "steer", b, acc[i], 5.0, n=n, gamma=g)
            for b, (n, *acc) in subsets.items() for i, g in enumerate((0.3, 0.5))]
    out = report(dirs, tmp_path / "r", console=Console(record=True), best="accuracy")
    rows = _rows(out)
    want = sum(n * acc[1] for n, *acc in subsets.values()) / sum(n for n, *_ in subsets.values())
    assert float(rows["STEER"]["korbench_acc"]) == pytest.approx(want * 100)
    assert "g0.5_korbench_cipher, g0.5_korbench_counterfactual, g0.5_korbench_logic; best of 2" \
        in (out / "results.md").read_text()


def test_best_on_the_command_line(grid, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main_report([*map(str, grid.values()), "--out", str(out), "--best", "a_per_f"]) == 0
    assert float(_rows(out)["STEER"]["math500_acc"]) == pytest.approx(70.0)
    with pytest.raises(SystemExit):
        main_report([str(grid["small"]), "--best", "flops"])
    assert "invalid choice: 'flops'" in capsys.readouterr().err
