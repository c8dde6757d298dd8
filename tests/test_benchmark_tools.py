"""benchmarks/op_profile.py: a loop's time an iteration, op by op, named by the line that ran it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tiny

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# A loop whose costs are known in advance: a [256, 512] x [512, 512] matmul an iteration (~134
# MFLOP) beside an elementwise op on 256 numbers, 7 iterations from a runtime count (XLA would
# unroll a constant one), then a matmul outside the loop that must not be counted; then a second
# program of the same name, after which profile() must refuse.
SCRIPT = """
import os, sys
sys.path.insert(0, {benchmarks!r})
from op_profile import dump_flags, profile
folder = sys.argv[1]
os.environ["XLA_FLAGS"] += " " + dump_flags(folder, "jit_loop")
import jax, jax.numpy as jnp

@jax.jit
def loop(x, w, n):
    def body(carry):
        i, x, s = carry
        big = jnp.matmul(x, w)  # THE MATMUL
        return i + 1, jnp.tanh(big), s + jnp.sum(x[:, 0]) * 0.5  # THE SUM
    _, x, s = jax.lax.while_loop(lambda c: c[0] < n, body, (0, x, 0.0))
    return x @ w.T, s  # AFTER THE LOOP

x, w = jnp.ones((256, 512)) / 512, jnp.ones((512, 512))
loop(x, w, 7)[0].block_until_ready()
print("\\n".join(profile(lambda: loop(x, w, 7)[0].block_until_ready(), folder, "jit_loop")))
loop(x[:8], w, 7)  # a second program named jit_loop: its op names would be ambiguous
try:
    profile(lambda: loop(x, w, 7)[0].block_until_ready(), folder, "jit_loop")
except RuntimeError as e:
    print("REFUSED", e)
"""


def test_profile_counts_the_loop_body_per_iteration_and_names_its_source_lines(tmp_path):
    script = tmp_path / "loop_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(benchmarks=str(BENCHMARKS))))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "hlo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=tiny.cpu_process_env(1))
    (out,) = tiny.outputs([proc], timeout=120)
    assert proc.returncode == 0, out
    lines = script.read_text().splitlines()
    matmul = next(i for i, line in enumerate(lines, 1) if "THE MATMUL" in line)
    total = next(i for i, line in enumerate(lines, 1) if "THE SUM" in line)
    after = next(i for i, line in enumerate(lines, 1) if "AFTER THE LOOP" in line)
    # Once a second program of that name is compiled, op names are ambiguous: profile refuses.
    assert "REFUSED 2 optimized programs named jit_loop" in out, out
    report = out[out.index("jit_loop:"):out.index("REFUSED")].splitlines()
    assert report[0].startswith("jit_loop: 7 loop iterations"), out
    rows = [re.match(r"\s+([\d.]+)\s+[\d.]+%\s+(\d+)\s+(.*)", r) for r in report[2:]]
    assert all(rows), report
    # The costliest line is the loop's matmul, once an iteration; the matmul after the loop (same
    # shape, its own line) is not counted.
    ms, per_iter, where = rows[0].groups()
    assert where == f"loop_script.py:{matmul} loop.<locals>.body (dot_general f32[256,512])", report
    assert per_iter == "1" and float(ms) > 0
    assert not any(r[3].startswith(f"loop_script.py:{after} ") for r in rows), report
    assert any(r[3].startswith(f"loop_script.py:{total} loop.<locals>.body") for r in rows), report
