"""`steer-jax report RUN_DIR... [--out DIR]`: the results table and figures from run directories.

Writes into OUT: results.md (the table, then the figures), results.csv (the table at full
precision), runs.csv (every run's summary, one line each) and plots/*.png; prints the table.
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
from steer_jax.eval.runs import Run, expand_run_dirs, load_run
from steer_jax.eval.table import build_table, to_markdown, to_rich, write_csv


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


def report(
    run_dirs: list[Path],
    out: Path,
    rounds: Sequence[int] | None = None,
    console: Console | None = None,
    korbench_subsets: bool = False,
) -> Path:
    """Table (terminal, Markdown, CSV) and figures for `run_dirs`, written into `out`; returns out.

    `rounds` picks the rounds of the confidence histograms (default: up to four, spread out).
    KOR-Bench is one column (its subsets pooled, as the paper reports it) unless
    `korbench_subsets`.
    """
    runs = [load_run(p) for p in expand_run_dirs(list(run_dirs))]
    if not runs:
        raise ValueError("no run directories given")
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    table = build_table(runs, korbench_subsets=korbench_subsets)
    console = console or Console()
    for part in to_rich(table, width=console.width):
        console.print(part)

    figures = figure_set.build(runs, out / "plots", rounds=rounds)

    md = ["# STEER results", "", to_markdown(table)]
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    md += ["## Runs", ""] + [f"- `{r.path}`" for r in runs] + [""]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    write_csv(table, out / "results.csv")
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
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.run_dirs[0].resolve().parent / "report"
    try:
        written = report(args.run_dirs, out, rounds=args.rounds, korbench_subsets=args.korbench_subsets)
    except (FileNotFoundError, ValueError) as e:
        print(f"steer-jax report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {written}")
    return 0
