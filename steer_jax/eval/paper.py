"""`steer-jax report --paper results.csv`: each measured cell beside the paper's row for the same
pair, method and benchmark, with the difference (ours - paper).

A cell's pair is its runs' (pairs.py: a stated `pair`, else the checkpoint names); a cell whose
runs name no pair, or several, gets no paper row, and stays in the table with the paper's
columns empty. Tables 1/2 (results.csv) give a row per pair, method and benchmark; a row's
average is compared when it has exactly the benchmarks of the paper's average (Table 1: MATH500,
OmniMath, AIME; Table 2: ACPBench, MuSiQue, KOR-Bench pooled). Table 3 (table3_groups.csv beside
results.csv, when present: STEER with the Gemma pair per K groups) stands beside a STEER cell
with K != 1, and beside K = 1 too when the table's STEER rows differ in K.

Table 3 prints FLOPs at half of Tables 1/2's for the same setting (../shared/paper/README.md:
it seems to count N, not 2N, per token): its numbers are shown as printed, marked, and the
differences use twice its FLOPs and half its A/F, the 2 N convention of ours and of Tables 1/2.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from steer_jax.eval.pairs import pair_of
from steer_jax.eval.runs import Run
from steer_jax.eval.table import BENCHMARK_LABELS, Cell, ResultsTable, varying

RESULTS_FILE = "results.csv"
RESULTS_COLUMNS = ("table", "pair", "method", "benchmark", "accuracy", "flops_per_query_1e12",
                   "a_per_f")
TABLE3_FILE = "table3_groups.csv"
TABLE3_COLUMNS = ("benchmark", "groups_k", "accuracy", "flops_per_query_1e12_as_printed",
                  "a_per_f")
TABLE3_PAIR = "gemma-3-4b-12b"  # Table 3 ran the Gemma-3 pair only
TABLE3_FLOPS_FACTOR = 2.0  # its printed FLOPs times this: Tables 1/2's convention
AVERAGE = "average"
CAVEAT = ("† Table 3 of the paper prints FLOPs at half of Tables 1/2's for the same setting "
          "(MATH500 K=1: 7.51 against 15.0), its A/F from those: shown as printed; the "
          "differences use twice its FLOPs and half its A/F (2 N per token, as ours).")


@dataclass(frozen=True)
class PaperRow:
    table: str  # "1", "2" or "3"
    acc: float  # percent
    flops: float  # 1e12 per query, as printed
    a_per_f: float  # as printed
    factor: float = 1.0  # printed FLOPs times this = FLOPs at 2 N per token

    @property
    def label(self) -> str:
        return f"Table {self.table}" + ("†" if self.factor != 1.0 else "")


@dataclass(frozen=True)
class Paper:
    rows: dict[tuple[str, str, str], PaperRow]  # (pair, method, benchmark): Tables 1/2
    averages: dict[tuple[str, str], list[tuple[frozenset[str], PaperRow]]]  # (pair, method)
    groups: dict[tuple[str, str, int], PaperRow]  # (pair, benchmark, K): Table 3


@dataclass(frozen=True)
class Line:
    """One measured cell, and the paper's row beside it (None: no such row)."""

    row: str
    benchmark: str  # a table column, or "average"
    ours: Cell
    paper: PaperRow | None


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (expected "
                             f"{', '.join(columns)})")
        rows = list(reader)
    for n, r in enumerate(rows, 2):
        for c in columns[-3:]:  # accuracy, FLOPs, A/F
            try:
                float(r[c])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{n}: {c} {r[c]!r} is not a number") from None
    return rows


def load_paper(path: str | Path) -> Paper:
    """The paper's tables: `path` is its results.csv (or the folder holding it); Table 3 is read
    from table3_groups.csv beside it when that file is there."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--paper: {path} does not exist (the paper's results.csv)")
    rows: dict[tuple[str, str, str], PaperRow] = {}
    averages: dict[tuple[str, str], list[tuple[frozenset[str], PaperRow]]] = {}
    records = _read_csv(path, RESULTS_COLUMNS)
    for r in records:
        row = PaperRow(table=r["table"], acc=float(r["accuracy"]),
                       flops=float(r["flops_per_query_1e12"]), a_per_f=float(r["a_per_f"]))
        if r["benchmark"] != AVERAGE:
            rows[(r["pair"], r["method"], r["benchmark"])] = row
            continue
        averaged = frozenset(x["benchmark"] for x in records if x["benchmark"] != AVERAGE
                             and (x["table"], x["pair"], x["method"])
                             == (r["table"], r["pair"], r["method"]))
        averages.setdefault((r["pair"], r["method"]), []).append((averaged, row))
    groups = {}
    table3 = path.parent / TABLE3_FILE
    if table3.is_file():
        for r in _read_csv(table3, TABLE3_COLUMNS):
            groups[(TABLE3_PAIR, r["benchmark"], int(r["groups_k"]))] = PaperRow(
                table="3", acc=float(r["accuracy"]),
                flops=float(r["flops_per_query_1e12_as_printed"]), a_per_f=float(r["a_per_f"]),
                factor=TABLE3_FLOPS_FACTOR)
    return Paper(rows=rows, averages=averages, groups=groups)


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def _match(paper: Paper, runs: list[Run], benchmark: str, by_groups: bool) -> PaperRow | None:
    pair, method = _one({pair_of(r) for r in runs}), _one({r.method for r in runs})
    if pair is None or method is None:
        return None
    k = _one({int(r.option("groups") or 1) for r in runs}) if method == "steer" else 1
    if method == "steer" and (k != 1 or by_groups) and (pair, benchmark, k) in paper.groups:
        return paper.groups[(pair, benchmark, k)]
    return paper.rows.get((pair, method, benchmark)) if k == 1 else None


def beside(table: ResultsTable, runs: list[Run], paper: Paper) -> list[Line]:
    """Every measured cell of `table` (in its order, each row's average last when the paper has
    one for it) with the paper's row for it, or None."""
    by_path = {r.path: r for r in runs}
    by_groups = "groups" in varying(runs).get("steer", set())
    lines = []
    for row in table.rows:
        members: list[Run] = []
        matched = []
        for b in table.benchmarks:
            if (row, b) not in table.cells:
                continue
            mine = [by_path[p] for p in table.members[(row, b)]]
            members += mine
            found = _match(paper, mine, b, by_groups)
            matched.append(found)
            lines.append(Line(row, b, table.cells[(row, b)], found))
        average = _average(paper, table, row, members)
        if average is not None and all(m is not None and m.table != "3" for m in matched):
            lines.append(Line(row, AVERAGE, table.average(row)[0], average))
    return lines


def _average(paper: Paper, table: ResultsTable, row: str, members: list[Run]) -> PaperRow | None:
    pair, method = _one({pair_of(r) for r in members}), _one({r.method for r in members})
    have = frozenset(b for b in table.benchmarks if (row, b) in table.cells)
    for averaged, found in paper.averages.get((pair, method), []):
        if averaged == have:
            return found
    return None


def _differences(line: Line) -> tuple[float, float, float] | None:
    p = line.paper
    if p is None:
        return None
    return (line.ours.acc - p.acc, line.ours.flops - p.flops * p.factor,
            line.ours.a_per_f - p.a_per_f / p.factor)


def _display(lines: list[Line]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "Benchmark", "Acc", "Paper Acc", "ΔAcc", "FLOPs", "Paper FLOPs", "ΔFLOPs",
              "A/F", "Paper A/F", "ΔA/F", "Paper"]
    body = []
    for line in lines:
        o, p, d = line.ours, line.paper, _differences(line)
        mark = "†" if p is not None and p.factor != 1.0 else ""
        paper = ["", "", ""] if p is None else [f"{p.acc:.1f}", f"{p.flops:.3g}{mark}",
                                                 f"{p.a_per_f:.3g}{mark}"]
        diff = ["", "", ""] if d is None else [f"{d[0]:+.1f}", f"{d[1]:+.3g}", f"{d[2]:+.3g}"]
        bench = "Average" if line.benchmark == AVERAGE else BENCHMARK_LABELS.get(
            line.benchmark, line.benchmark)
        body.append([line.row, bench, f"{o.acc:.1f}", paper[0], diff[0], f"{o.flops:.3g}",
                     paper[1], diff[1], f"{o.a_per_f:.4g}", paper[2], diff[2],
                     "" if p is None else p.label])
    return header, body


NOTE = ("Δ = ours - paper. A run's pair: a `pair` it states (summary.json, or its config's `pair`: "
        "configs/paper/*.yaml set it), else its checkpoint names; empty paper columns: no "
        "paper row for that pair, method and benchmark.")


def to_markdown(lines: list[Line]) -> str:
    header, body = _display(lines)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    out += ["", NOTE]
    if any(line.paper is not None and line.paper.factor != 1.0 for line in lines):
        out.append(CAVEAT)
    return "\n".join(out) + "\n"


def to_rich(lines: list[Line]) -> Table:
    header, body = _display(lines)
    notes = [NOTE] + ([CAVEAT] if any(r[-1].endswith("†") for r in body) else [])
    out = Table(title="Beside the paper", caption="\n".join(notes), header_style="bold")
    for i, name in enumerate(header):
        out.add_column(name, justify="left" if i in (0, 1) else "right", no_wrap=i > 1)
    for r in body:
        out.add_row(*r)
    return out


def csv_columns(lines: list[Line], benchmarks: list[str]) -> dict[str, dict[str, Any]]:
    """Per table row, the paper's columns for results.csv: per benchmark of `benchmarks` (then
    `avg`) its table, accuracy, FLOPs and A/F as printed, the FLOPs factor (2 for Table 3) and
    the differences; empty where the row has no paper row."""
    names = ("paper_table", "paper_acc", "paper_flops_1e12", "paper_a_per_f", "paper_flops_factor",
             "diff_acc", "diff_flops_1e12", "diff_a_per_f")
    empty = {f"{b}_{n}": "" for b in [*benchmarks, "avg"] for n in names}
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        cols = out.setdefault(line.row, dict(empty))
        d, p = _differences(line), line.paper
        if p is not None and d is not None:
            b = "avg" if line.benchmark == AVERAGE else line.benchmark
            values = (p.table, p.acc, p.flops, p.a_per_f, p.factor, *d)
            cols.update({f"{b}_{n}": v for n, v in zip(names, values)})
    return out
