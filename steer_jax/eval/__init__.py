"""Evaluation on the paper's six benchmarks: loaders, prompts, answer extraction, graders, reports.

load_benchmark(name, path=None, limit=None) -> list[Example]
build_messages(example, benchmark, family) / render_prompt(tokenizer, example, benchmark)
extract_answer(name, output) -> str;  grade(name, output, example) -> bool;  metrics(...)
report(run_dirs, out) -> Path;  main_report(argv) -> int   (`steer-jax report`)
"""

from steer_jax.eval.benchmarks import BENCHMARKS, canonical_name, load_benchmark
from steer_jax.eval.example import Example
from steer_jax.eval.grading import extract_answer, grade, metrics
from steer_jax.eval.prompts import FAMILIES, build_messages, detect_family, render_prompt
from steer_jax.eval.report import main_report, report

__all__ = [
    "BENCHMARKS",
    "FAMILIES",
    "Example",
    "build_messages",
    "canonical_name",
    "detect_family",
    "extract_answer",
    "grade",
    "load_benchmark",
    "main_report",
    "metrics",
    "render_prompt",
    "report",
]
