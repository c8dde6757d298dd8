"""Where a compiled loop's time goes: XLA's ops per iteration, named by the line that emitted them.

`dump_flags` must reach XLA_FLAGS before JAX starts its backend; `profile` then traces one call
with jax.profiler and joins each executed op (trace events carry `hlo_module` / `hlo_op`) to the
line of our code that emitted it, through the compiled HLO's metadata. Only the ops that ran
inside the module's loop are counted, divided by its iterations: a decode step, without the
prefill. Written for XLA's CPU backend; a GPU trace names device kernels differently and is not
handled here.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from pathlib import Path
from typing import Callable

import jax


def dump_flags(folder: str, module: str) -> str:
    """XLA_FLAGS words that write `module`'s optimized HLO (with source locations) to `folder`."""
    return f"--xla_dump_to={folder} --xla_dump_hlo_module_re={module}"


def _source_lines(hlo: str) -> dict[str, str]:
    """HLO instruction name -> 'file.py:line function (op)' of the code that emitted it."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif section and (m := re.match(r"(\d+) (.*)", line)):
            tables[section][int(m[1])] = m[2]
        else:
            section = None

    def where(frame: int) -> str:
        loc = dict(re.findall(r"(\w+)=(\d+)", tables["StackFrames"][frame]))
        loc = tables["FileLocations"][int(loc["file_location_id"])]
        loc = dict(re.findall(r"(\w+)=(\d+)", loc))
        path = tables["FileNames"][int(loc["file_name_id"])].strip('"')
        func = tables["FunctionNames"][int(loc["function_name_id"])].strip('"')
        return f"{Path(path).name}:{loc['line']} {func}"

    # One source line (a `_dense`) emits several matmuls: the output shape tells them apart.
    names = {}
    for m in re.finditer(r'%([\w.-]+) = (\([^)]*\)|\S+) .*?metadata=\{op_name="([^"]*)"'
                         r'(?: stack_frame_id=(\d+))?', hlo):
        op = f"{m[3].rsplit('/', 1)[-1]} {re.sub(r'{[^}]*}', '', m[2])}"
        names[m[1]] = f"{where(int(m[4]))} ({op})" if m[4] else f"({op})"
    return names


def profile(fn: Callable[[], object], dump_dir: str, module: str, rows: int = 24) -> list[str]:
    """Trace one call of `fn` (already compiled, with `dump_flags` set): the report's lines, the
    `rows` costliest emitting lines of code first."""
    hlo_files = glob.glob(f"{dump_dir}/*.{module}.*after_optimizations.txt")
    if len(hlo_files) != 1:
        # Op names (`fusion.12`) mean different things in two programs of the same name.
        raise RuntimeError(f"{len(hlo_files)} optimized programs named {module} in {dump_dir}; "
                           "profile() needs exactly the one it traces: set XLA_FLAGS with "
                           "dump_flags() before JAX starts, bypass the compilation cache, and "
                           "profile before compiling another program of that name")
    names = _source_lines(Path(hlo_files[0]).read_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            fn()
        found = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        trace = json.load(gzip.open(found[0]))
    ops = [e for e in trace["traceEvents"] if e.get("ph") == "X"
           and e.get("args", {}).get("hlo_module") == module]
    # The loop is where its body's ops run: every one of them once an iteration (a `while`
    # event's own span is no use, as the loop hands over between threads).
    counts = collections.Counter(e["args"]["hlo_op"] for e in ops)
    repeated = collections.Counter(n for n in counts.values() if n > 1)
    if not repeated:
        raise RuntimeError(f"no op of {module} ran more than once in the traced call: no loop")
    iterations = repeated.most_common(1)[0][0]
    body = [e for e in ops if counts[e["args"]["hlo_op"]] == iterations]
    start, end = min(e["ts"] for e in body), max(e["ts"] + e["dur"] for e in body)
    inside = [e for e in ops if start <= e["ts"] < end and e["args"]["hlo_op"] != "while"]
    total: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for e in inside:
        key = names.get(e["args"]["hlo_op"], e["args"]["hlo_op"])
        total[key] += e["dur"] / 1e3 / iterations
        calls[key] += 1
    busy = sum(total.values())
    wall = (end - start) / 1e3 / iterations
    out = [f"{module}: {iterations} loop iterations, {wall:.2f} ms each; its ops sum to "
           f"{busy:.2f} ms an iteration ({busy / wall:.2f} running at once on average, on "
           f"{len({e['tid'] for e in inside})} threads; one op may itself use more)",
           "  ms/iter  share  ops/iter  emitted by"]
    ranked = sorted(total.items(), key=lambda kv: -kv[1])
    for key, ms in ranked[:rows]:
        out.append(f"  {ms:7.3f} {ms / busy:6.1%} {calls[key] / iterations:8.0f}  {key}")
    if len(ranked) > rows:
        rest = sum(ms for _, ms in ranked[rows:])
        out.append(f"  {rest:7.3f} {rest / busy:6.1%}           {len(ranked) - rows} more lines")
    return out
