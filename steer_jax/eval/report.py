"""`steer-jax report RUN_DIR... [--out DIR]`: the results table and figures from run directories.

Writes into OUT: results.md (the table, then the figures), results.csv (the table at full
precision), runs.csv (every run's summary, one line each) and plots/*.png; prints the table.
`--best accuracy|a_per_f` shows each method's best grid point only (best.py); `--paper
results.csv` puts the paper's rows beside ours, with the differences (paper.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from steer_jax.eval import figures as figure_set
from steer_jax.eval import paper as paper_rows
from steer_jax.eval.best import CRITERIA, pick_best
from steer_jax.eval.runs import Run, expand_run_dirs, load_run
from steer_jax.eval.table import ResultsTable, build_table, to_markdown, to_rich, write_csv


def _write_runs_csv(runs: list[Run], path: Path) -> Path:
    keys: list[str] = ["run_dir"]
    for run in runs:
        keys += [k for k in run.summary if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for run in runs:
            row = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in run.summary.items()}
            writer.writerow({"run_dir": str(run.path), **row})
    return path


def _tables(runs: list[Run], console: Console, korbench_subsets: bool,
            published: paper_rows.Paper | None, best: str | None
            ) -> tuple[ResultsTable, list[str], list[paper_rows.Line]]:
    """The results table (with `best`, each method's best grid point only, and the caption that
    says how they were chosen) and the paper's rows beside it; all printed on `console`."""
    chosen = pick_best(runs, best, korbench_subsets) if best is not None else None
    shown = chosen.runs if chosen is not None else runs
    table = build_table(shown, korbench_subsets=korbench_subsets, by_method=chosen is not None)
    caption = [chosen.caption, *(f"- {p}" for p in chosen.points)] if chosen is not None else []
    for part in to_rich(table, width=console.width):
        console.print(part)
    for line in caption:
        console.print(line, highlight=False)
    lines = paper_rows.beside(table, shown, published) if published is not None else []
    if lines:
        console.print(paper_rows.to_rich(lines))
    return table, caption, lines


def report(
    run_dirs: list[Path],
    out: Path,
    rounds: Sequence[int] | None = None,
    console: Console | None = None,
    korbench_subsets: bool = False,
    paper: Path | None = None,
    best: str | None = None,
) -> Path:
    """Table (terminal, Markdown, CSV) and figures for `run_dirs`, written into `out`; returns out.

    `rounds` picks the rounds of the confidence histograms (default: up to four, spread out).
    KOR-Bench is one column (its subsets pooled, as the paper reports it) unless
    `korbench_subsets`. `best` ("accuracy" or "a_per_f") keeps each method's best grid point per
    pair and benchmark in the table; `paper` (the paper's results.csv) adds its rows beside ours.
    """
    runs = [load_run(p) for p in expand_run_dirs(list(run_dirs))]
    if not runs:
        raise ValueError("no run directories given")
    if best is not None and best not in CRITERIA:
        raise ValueError(f"--best must be one of {', '.join(CRITERIA)}, got {best!r}")
    published = paper_rows.load_paper(paper) if paper is not None else None
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    console = console or Console()
    table, caption, lines = _tables(runs, console, korbench_subsets, published, best)

    figures = figure_set.build(runs, out / "plots", rounds=rounds)

    md = ["# STEER results", "", to_markdown(table)]
    md += [*caption, ""] if caption else []
    md += ["## Beside the paper", "", paper_rows.to_markdown(lines)] if lines else []
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    md += ["## Runs", ""] + [f"- `{r.path}`" for r in runs] + [""]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    write_csv(table, out / "results.csv",
              extra=paper_rows.csv_columns(lines, table.benchmarks) if lines else None)
    _write_runs_csv(runs, out / "runs.csv")
    return out


def main_report(argv: list[str]) -> int:
    """CLI body of `steer-jax report`; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="steer-jax report",
        description="Results table (paper shape) and figures from STEER / baseline run directories.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories (with summary.json), or folders holding several",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: report/ next to the first run directory)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        nargs="+",
        default=None,
        help="rounds to draw in the confidence histograms (default: four, spread)",
    )
    parser.add_argument(
        "--korbench-subsets",
        action="store_true",
        help="one column per KOR-Bench subset (default: pooled into one, as the paper reports it)",
    )
    parser.add_argument(
        "--paper",
        type=Path,
        default=None,
        metavar="CSV",
        help="the paper's results.csv (e.g. ../shared/paper/results.csv; table3_groups.csv beside "
        "it is read too): its row beside each measured one, with the difference",
    )
    parser.add_argument(
        "--best",
        choices=CRITERIA,
        default=None,
        help="show each method's best grid point per pair and benchmark by this criterion "
        "(ties: fewer FLOPs for accuracy, higher accuracy for A/F; runs.csv keeps every run)",
    )
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.run_dirs[0].resolve().parent / "report"
    try:
        written = report(args.run_dirs, out, rounds=args.rounds, korbench_subsets=args.korbench_subsets,
                         paper=args.paper, best=args.best)
    except (FileNotFoundError, ValueError) as e:
        print(f"steer-jax report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {written}")
    return 0
