"""`steer-jax report --paper`: the paper's rows (read from its CSV here, independently of the
code) beside measured ones, the differences, the pair rule, Table 3 and its FLOPs caveat."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from steer_jax.eval import main_report, report
from steer_jax.eval.pairs import pair_of
from steer_jax.eval.runs import load_run
from steer_jax.options import SteerOptions

GEMMA = ("/ckpt/gemma-3-4b-it", "/hub/models--google--gemma-3-12b-it/snapshots/0a1b")
QWEN_MATH = ("/ckpt/Qwen2.5-Math-1.5B-Instruct", "/ckpt/Qwen2.5-Math-7B-Instruct")


def _run_dir(root: Path, name: str, method: str, benchmark: str, acc: float, flops: float,
             checkpoints: tuple[str, str] | None = None, pair: str | None = None,
             **options) -> Path:
    """A run directory: its summary, and the config it ran with (parts/config.json)."""
    path = root / name
    (path / "parts").mkdir(parents=True)
    opts = {**dataclasses.asdict(SteerOptions()), "method": method, **options}
    summary = {"method": method, "benchmark": benchmark, "n": 50, "accuracy": acc,
               "flops_per_query": flops, "a_per_f": acc * 100 / flops,
               "params": {"small": 1_000_000_000, "large": 7_000_000_000}, "options": opts}
    if method == "steer":
        summary["gamma"] = opts["gamma"]
    (path / "summary.json").write_text(json.dumps(summary))
    small, large = checkpoints or ("/ckpt/small", "/ckpt/large")
    config = {"small": small, "large": large, "method": method, **({"pair": pair} if pair else {})}
    (path / "parts" / "config.json").write_text(json.dumps(config))
    return path


def _paper(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["table"], r["pair"], r["method"], r["benchmark"]): r for r in csv.DictReader(f)}


def _results(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_the_pair_of_a_run(tmp_path: Path) -> None:
    def pair(checkpoints=None, stated=None, summary_pair=None) -> str | None:
        path = _run_dir(tmp_path, f"r{len(list(tmp_path.iterdir()))}", "small_only", "math500",
                        0.5, 1.0, checkpoints, stated)
        if summary_pair:
            s = json.loads((path / "summary.json").read_text())
            (path / "summary.json").write_text(json.dumps({**s, "pair": summary_pair}))
        return pair_of(load_run(path))

    assert pair(GEMMA) == "gemma-3-4b-12b"  # a plain folder and a hub cache folder
    assert pair(QWEN_MATH) == "qwen2.5-math-1.5b-7b"
    assert pair(("/c/qwen2.5-1.5b-instruct", "/c/QWEN2.5-7B-INSTRUCT")) == "qwen2.5-1.5b-7b"
    # Both checkpoints must be the pair's; sizes alone name nothing.
    assert pair(("/ckpt/gemma-3-4b-it", "/ckpt/Qwen2.5-7B-Instruct")) is None
    assert pair(("/ckpt/qwen-math-1.5b", "/ckpt/qwen-math-7b")) is None
    assert pair(("/ckpt/small", "/ckpt/large"), stated="qwen2.5-math-1.5b-7b") == \
        "qwen2.5-math-1.5b-7b"
    assert pair(GEMMA, summary_pair="qwen2.5-1.5b-7b") == "qwen2.5-1.5b-7b"  # stated first


def test_paper_rows_stand_beside_measured_ones(tmp_path: Path, paper_results: Path) -> None:
    paper = _paper(paper_results)
    root = tmp_path / "runs"
    figures = {"math500": (0.82, 14.0), "omnimath": (0.31, 20.0), "aime": (0.12, 25.0)}
    dirs = [_run_dir(root, f"steer_{b}", "steer", b, acc, flops, GEMMA)
            for b, (acc, flops) in figures.items()]
    dirs.append(_run_dir(root, "large_math500", "large_only", "math500", 0.7, 30.0, pair="qwen2.5-math-1.5b-7b"))
    dirs.append(_run_dir(root, "unmatched", "small_only", "math500", 0.4, 2.0))  # no pair
    console = Console(record=True, width=250)
    out = report(dirs, tmp_path / "report", console=console, paper=paper_results)
    rows = _results(out)
    steer = rows["gemma-3-4b-12b STEER (γ=0.5)"]
    for b, (acc, flops) in figures.items():
        want = paper[("1", "gemma-3-4b-12b", "steer", b)]
        assert steer[f"{b}_paper_table"] == "1"
        assert float(steer[f"{b}_paper_acc"]) == float(want["accuracy"])
        assert float(steer[f"{b}_diff_acc"]) == pytest.approx(acc * 100 - float(want["accuracy"]))
        assert float(steer[f"{b}_diff_flops_1e12"]) == pytest.approx(
            flops - float(want["flops_per_query_1e12"]))
        assert float(steer[f"{b}_diff_a_per_f"]) == pytest.approx(
            acc * 100 / flops - float(want["a_per_f"]))
    # The row has every Table 1 benchmark: its average stands beside the paper's.
    avg = paper[("1", "gemma-3-4b-12b", "steer", "average")]
    mean_acc = sum(a for a, _ in figures.values()) * 100 / 3
    assert float(steer["avg_diff_acc"]) == pytest.approx(mean_acc - float(avg["accuracy"]))
    # A stated pair: the Qwen2.5-Math row; no pair: the row stays, its paper columns empty.
    large = rows["qwen2.5-math-1.5b-7b Large only"]
    assert float(large["math500_paper_acc"]) == float(
        paper[("1", "qwen2.5-math-1.5b-7b", "large_only", "math500")]["accuracy"])
    assert large["avg_paper_acc"] == ""  # one benchmark of three: no average to compare
    alone = rows["1B/7B Small only"]
    assert float(alone["math500_acc"]) == pytest.approx(40.0) and alone["math500_paper_acc"] == ""

    markdown, terminal = (out / "results.md").read_text(), console.export_text()
    assert "## Beside the paper" in markdown and "Beside the paper" in terminal
    shown = {line.split(" | ")[0].lstrip("| ") + "/" + line.split(" | ")[1]: line.split(" | ")
             for line in markdown.split("## Beside the paper")[1].splitlines() if line.startswith("| ")}
    m = shown["gemma-3-4b-12b STEER (γ=0.5)/MATH500"]
    want = paper[("1", "gemma-3-4b-12b", "steer", "math500")]
    assert m[2:5] == ["82.0", f"{float(want['accuracy']):.1f}",
                      f"{82.0 - float(want['accuracy']):+.1f}"]
    assert m[-1].strip(" |") == "Table 1"
    assert shown["1B/7B Small only/MATH500"][3:5] == ["", ""]
    assert "gemma-3-4b-12b STEER (γ=0.5)/Average" in shown
    assert f"{82.0 - float(want['accuracy']):+.1f}" in terminal
    assert "†" not in markdown  # no Table 3 row, no caveat


def test_table3_rows_beside_steer_per_k(tmp_path: Path, paper_results: Path) -> None:
    table3 = paper_results.parent / "table3_groups.csv"
    if not table3.is_file():
        pytest.skip(f"{table3} is absent")
    with table3.open() as f:
        printed = {(r["benchmark"], int(r["groups_k"])): r for r in csv.DictReader(f)}
    figures = {1: (0.85, 15.2), 2: (0.84, 14.9), 5: (0.83, 14.0), 3: (0.80, 13.0)}
    dirs = [_run_dir(tmp_path / "runs", f"k{k}", "steer", "math500", acc, flops, pair="gemma-3-4b-12b",
                     groups=k) for k, (acc, flops) in figures.items()]
    console = Console(record=True, width=250)
    out = report(dirs, tmp_path / "report", console=console, paper=paper_results)
    rows = _results(out)
    for k in (1, 2, 5):
        acc, flops = figures[k]
        row = rows["STEER (γ=0.5)" if k == 1 else f"STEER (γ=0.5, K={k})"]
        want = printed[("math500", k)]
        assert row["math500_paper_table"] == "3"
        # As printed, beside a difference taken at 2 N per token: twice its FLOPs, half its A/F.
        assert float(row["math500_paper_flops_1e12"]) == float(want["flops_per_query_1e12_as_printed"])
        assert float(row["math500_paper_flops_factor"]) == 2.0
        assert float(row["math500_diff_flops_1e12"]) == pytest.approx(
            flops - 2 * float(want["flops_per_query_1e12_as_printed"]))
        assert float(row["math500_diff_a_per_f"]) == pytest.approx(
            acc * 100 / flops - float(want["a_per_f"]) / 2)
        assert float(row["math500_diff_acc"]) == pytest.approx(acc * 100 - float(want["accuracy"]))
    assert rows["STEER (γ=0.5, K=3)"]["math500_paper_acc"] == ""  # the paper has no K=3
    markdown, terminal = (out / "results.md").read_text(), console.export_text()
    assert f"{float(printed[('math500', 2)]['flops_per_query_1e12_as_printed']):.3g}†" in markdown
    for text in (markdown, terminal.replace("\n", " ")):
        assert "Table 3†" in text
        assert "prints FLOPs at half of Tables 1/2's" in " ".join(text.split())


def test_a_bad_paper_file_is_named_before_any_work(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path / "runs", "a", "small_only", "math500", 0.5, 1.0, GEMMA)
    bad = tmp_path / "results.csv"
    bad.write_text("table,pair,method,benchmark,accuracy\n1,gemma-3-4b-12b,steer,math500,80\n")
    with pytest.raises(ValueError, match="lacks the column.*flops_per_query_1e12, a_per_f"):
        report([run], tmp_path / "r", console=Console(file=io.StringIO()), paper=bad)
    assert not (tmp_path / "r").exists()
    bad.write_text("table,pair,method,benchmark,accuracy,flops_per_query_1e12,a_per_f\n"
                   "1,gemma-3-4b-12b,steer,math500,80%,15,5.3\n")
    with pytest.raises(ValueError, match=r"results.csv:2: accuracy '80%' is not a number"):
        report([run], tmp_path / "r", console=Console(file=io.StringIO()), paper=bad)
    assert main_report([str(run), "--out", str(tmp_path / "r"), "--paper",
                        str(tmp_path / "nowhere.csv")]) == 2
    assert "nowhere.csv does not exist" in capsys.readouterr().err
