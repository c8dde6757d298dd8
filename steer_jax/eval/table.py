"""The results table in the paper's shape: one row per method, Acc / FLOPs / A/F per benchmark, and
an average column; rendered for the terminal (rich), as Markdown and as CSV.

Units: Acc in percent (summary accuracy x 100), FLOPs in 1e12 per query (summary flops_per_query, already
in 1e12 units), A/F exactly as the run's summary states it.

The paper's arithmetic:
- KOR-Bench is one column, its three subsets pooled: accuracy and FLOPs per query over all their
  questions together (each subset weighted by its question count), A/F their ratio. Per-subset
  columns on request (`korbench_subsets=True`).
- The average column's Acc and FLOPs are plain means over the benchmarks the row has, and its A/F
  is average accuracy / average FLOPs, not the mean of the per-benchmark A/F.
A row missing some of the table's benchmarks gets its average marked with "*" (Markdown, terminal)
and its benchmark count in the CSV; a pooled KOR-Bench cell missing a subset is marked "+".
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Collection

from rich.table import Table

from steer_jax.eval.benchmarks import BENCHMARKS
from steer_jax.eval.pairs import pair_of
from steer_jax.eval.runs import METHODS, VARIANT_KEYS, Run

logger = logging.getLogger(__name__)

BENCHMARK_LABELS = {
    "math500": "MATH500",
    "omnimath": "OmniMath",
    "aime": "AIME",
    "acpbench": "ACPBench",
    "musique": "MuSiQue",
    "korbench_cipher": "KOR cipher",
    "korbench_counterfactual": "KOR counterf.",
    "korbench_logic": "KOR logic",
    "korbench": "KOR-Bench",
}
KORBENCH = "korbench"  # the pooled column
KORBENCH_SUBSETS = tuple(b for b in BENCHMARKS if b.startswith(KORBENCH + "_"))
METHOD_LABELS = {
    "small_only": "Small only",
    "large_only": "Large only",
    "query_router": "Query router",
    "specreason": "SpecReason",
    "rsd": "RSD",
    "steer": "STEER",
}


@dataclass(frozen=True)
class Cell:
    acc: float  # percent
    flops: float  # 1e12 per query
    a_per_f: float
    source: Path | None = None
    n: int | None = None  # questions behind the cell, when the summary says
    partial: bool = False  # a pooled KOR-Bench cell that lacks one of the subsets


@dataclass
class ResultsTable:
    benchmarks: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    # The run directories behind each cell (a pooled KOR-Bench cell: one per subset).
    members: dict[tuple[str, str], list[Path]] = field(default_factory=dict)

    def average(self, row: str) -> tuple[Cell | None, int]:
        present = [self.cells[(row, b)] for b in self.benchmarks if (row, b) in self.cells]
        if not present:
            return None, 0
        acc, flops = fmean(c.acc for c in present), fmean(c.flops for c in present)
        return Cell(acc=acc, flops=flops, a_per_f=acc / flops if flops > 0 else float("nan")), len(present)


def pool(cells: list[Cell]) -> Cell:
    """Several benchmarks' cells as one benchmark: accuracy and FLOPs per query over all their
    questions (each cell weighted by its `n`), A/F their ratio."""
    if any(c.n is None for c in cells):
        missing = [str(c.source) for c in cells if c.n is None]
        raise ValueError(f"cannot pool KOR-Bench subsets: {', '.join(missing)} give no question "
                         "count (summary.json 'n'); report them with korbench_subsets")
    n = sum(c.n for c in cells)
    acc = sum(c.acc * c.n for c in cells) / n
    flops = sum(c.flops * c.n for c in cells) / n
    return Cell(acc=acc, flops=flops, a_per_f=acc / flops if flops > 0 else float("nan"), n=n, partial=len(cells) < len(KORBENCH_SUBSETS))


def _params_label(value: Any) -> str:
    if isinstance(value, (int, float)) and value >= 1e6:
        return f"{value / 1e9:.3g}B"
    return str(value)


def pair_label(run: Run) -> str:
    """The paper's name of the run's pair when it is one of them (pairs.py), else its sizes:
    two pairs of one size (Qwen2.5-Math and Qwen2.5 1.5B/7B) stay apart when known."""
    known = pair_of(run)
    if known is not None:
        return known
    small, large = run.pair
    return f"{_params_label(small)}/{_params_label(large)}"


def varying(runs: list[Run]) -> dict[str, set[str]]:
    """Per method, the options (VARIANT_KEYS) its runs here differ in: what tells them apart."""
    out: dict[str, set[str]] = {}
    for method in {r.method for r in runs}:
        mine = [r for r in runs if r.method == method]
        out[method] = {key for key, _, methods in VARIANT_KEYS
                       if (methods is None or method in methods)
                       and len({repr(r.option(key)) for r in mine}) > 1}
    return out


def method_label(run: Run, with_pair: bool = False) -> str:
    label = METHOD_LABELS.get(run.method, run.method)
    return f"{pair_label(run)} {label}" if with_pair else label


def row_label(run: Run, with_pair: bool = False, keys: Collection[str] = ()) -> str:
    """The method, STEER's rule, and each of `keys` the run has off its default."""
    label = METHOD_LABELS.get(run.method, run.method)
    parts = run.variant(keys)
    if parts:
        label = f"{label} ({', '.join(parts)})"
    return f"{pair_label(run)} {label}" if with_pair else label


def _row_key(run: Run) -> tuple:
    method_rank = METHODS.index(run.method) if run.method in METHODS else len(METHODS)
    return (str(run.pair), method_rank, run.method, run.routing[:2],
            run.gamma if run.gamma is not None else -1.0,
            run.variant([k for k, _, _ in VARIANT_KEYS]))


def _labels(runs: list[Run], with_pair: bool, by_method: bool = False) -> dict[Path, str]:
    """Each run's row label (`by_method`: the method and pair alone, for one chosen run per
    method, pair and benchmark); runs that would share a cell (the same label and benchmark:
    their configs differ in nothing the label shows) get their directory's name too, so no run
    is dropped or merged into another's cell."""
    if by_method:
        labels = {r.path: method_label(r, with_pair) for r in runs}
    else:
        keys = varying(runs)
        labels = {r.path: row_label(r, with_pair, keys[r.method]) for r in runs}
    seen: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        seen.setdefault((labels[r.path], r.benchmark), []).append(r)
    for (label, bench), same in seen.items():
        if len(same) > 1:
            logger.warning("%d runs give %s on %s; each keeps a row of its own, named by its "
                           "directory", len(same), label, bench)
            for r in same:
                labels[r.path] = f"{label} [{r.path.name}]"
    return labels


def build_table(runs: list[Run], korbench_subsets: bool = False,
                by_method: bool = False) -> ResultsTable:
    """One cell per (row, benchmark), every run in a cell of its own (`_labels`). KOR-Bench's
    subsets are pooled into one column unless `korbench_subsets`. `by_method`: rows named by
    method and pair alone (runs already cut to one per method, pair and benchmark: best.py)."""
    with_pair = len({pair_label(r) for r in runs}) > 1
    known = [b for b in BENCHMARKS if any(r.benchmark == b for r in runs)]
    extra = sorted({r.benchmark for r in runs} - set(BENCHMARKS))
    rows: list[str] = []
    table = ResultsTable(benchmarks=known + extra, rows=rows)
    labels = _labels(runs, with_pair, by_method)
    for run in sorted(runs, key=_row_key):
        if labels[run.path] not in rows:
            rows.append(labels[run.path])
    for run in runs:
        n = run.summary.get("n")
        table.cells[(labels[run.path], run.benchmark)] = Cell(
            acc=run.accuracy * 100.0,
            flops=run.flops_per_query,
            a_per_f=run.a_per_f,
            source=run.path,
            n=None if n is None else int(n),
        )
        table.members[(labels[run.path], run.benchmark)] = [run.path]
    return table if korbench_subsets else _pool_korbench(table)


def _pool_korbench(table: ResultsTable) -> ResultsTable:
    subsets = [b for b in table.benchmarks if b in KORBENCH_SUBSETS]
    if not subsets:
        return table
    at = table.benchmarks.index(subsets[0])
    benchmarks = [b for b in table.benchmarks if b not in subsets]
    benchmarks.insert(at, KORBENCH)
    cells = {k: c for k, c in table.cells.items() if k[1] not in subsets}
    members = {k: m for k, m in table.members.items() if k[1] not in subsets}
    for row in table.rows:
        parts = [table.cells[(row, b)] for b in subsets if (row, b) in table.cells]
        if parts:
            cells[(row, KORBENCH)] = pool(parts)
            members[(row, KORBENCH)] = [p for b in subsets for p in table.members.get((row, b), [])]
    return ResultsTable(benchmarks=benchmarks, rows=table.rows, cells=cells, members=members)


def _fmt(cell: Cell | None) -> tuple[str, str, str]:
    if cell is None:
        return "–", "–", "–"
    mark = "+" if cell.partial else ""
    return f"{cell.acc:.1f}{mark}", f"{cell.flops:.3g}{mark}", f"{cell.a_per_f:.4g}{mark}"


def _display_rows(table: ResultsTable) -> tuple[list[str], list[list[str]]]:
    header = ["Method"]
    for b in table.benchmarks:
        name = BENCHMARK_LABELS.get(b, b)
        header += [f"{name} Acc", f"{name} FLOPs", f"{name} A/F"]
    header += ["Avg Acc", "Avg FLOPs", "Avg A/F"]
    body = []
    for row in table.rows:
        line = [row]
        for b in table.benchmarks:
            line += _fmt(table.cells.get((row, b)))
        avg, n = table.average(row)
        cells = list(_fmt(avg))
        if avg is not None and n < len(table.benchmarks):
            cells = [c + "*" for c in cells]
        body.append(line + cells)
    return header, body


def to_markdown(table: ResultsTable) -> str:
    header, body = _display_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    notes = [
        "",
        "Acc in %, FLOPs in 1e12 per query (2 N per generated token), A/F as each run reports it; "
        "Avg A/F = Avg Acc / Avg FLOPs, as in the paper.",
    ]
    if KORBENCH in table.benchmarks:
        notes.append("KOR-Bench: its cipher, counterfactual and logic subsets pooled over all their questions.")
    if any(c.partial for c in table.cells.values()):
        notes.append("\\+ pooled over the KOR-Bench subsets that row has, not all three.")
    if any("*" in c for r in body for c in r[-3:]):
        notes.append("\\* averaged over the benchmarks that row has, not all of them.")
    return "\n".join(lines + notes) + "\n"


def to_rich(table: ResultsTable, width: int = 120) -> list[Table]:
    """The table for a terminal of `width` columns: as many benchmarks side by side as fit, the
    rest (and the average) in further tables below, so no number is ever cut to an ellipsis."""
    header, body = _display_rows(table)
    groups = [header[i : i + 3] for i in range(1, len(header), 3)]  # (Acc, FLOPs, A/F) per benchmark

    def col_width(i: int) -> int:  # cell text plus rich's padding and border
        return max(len(r[i]) for r in [[h.rsplit(" ", 1)[0] for h in header], *body]) + 3

    method_width = col_width(0) + 1
    chunks: list[list[int]] = []
    used = width  # forces a first chunk
    for g in range(len(groups)):
        need = sum(col_width(1 + 3 * g + k) for k in range(3))
        if used + need > width and (not chunks or chunks[-1]):
            chunks.append([])
            used = method_width
        chunks[-1].append(g)
        used += need
    tables = []
    for n, chunk in enumerate(chunks):
        out = Table(title="Results" if n == 0 else None, header_style="bold")
        out.add_column("Method", no_wrap=True)
        for g in chunk:
            bench = groups[g][0].rsplit(" ", 1)[0]
            for name in ("Acc", "FLOPs", "A/F"):
                out.add_column(f"{bench}\n{name}", justify="right", no_wrap=True)
        for r in body:
            out.add_row(r[0], *(r[1 + 3 * g + k] for g in chunk for k in range(3)))
        tables.append(out)
    return tables


def write_csv(table: ResultsTable, path: Path,
              extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Full-precision values, one row per method, the same columns as the Markdown table;
    `extra` adds columns to rows (row -> column -> value; paper.py's paper rows), in the order
    they first appear, empty where a row has none."""
    extra = extra or {}
    fields = ["method"]
    for b in table.benchmarks:
        fields += [f"{b}_acc", f"{b}_flops_1e12", f"{b}_a_per_f"]
    fields += ["avg_acc", "avg_flops_1e12", "avg_a_per_f", "avg_n_benchmarks"]
    for columns in extra.values():
        fields += [c for c in columns if c not in fields]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in table.rows:
            record: dict[str, Any] = {"method": row}
            for b in table.benchmarks:
                cell = table.cells.get((row, b))
                if cell is not None:
                    record.update(
                        {f"{b}_acc": cell.acc, f"{b}_flops_1e12": cell.flops, f"{b}_a_per_f": cell.a_per_f}
                    )
            avg, n = table.average(row)
            if avg is not None:
                record.update({"avg_acc": avg.acc, "avg_flops_1e12": avg.flops, "avg_a_per_f": avg.a_per_f})
            record["avg_n_benchmarks"] = n
            writer.writerow({**record, **extra.get(row, {})})
    return path
