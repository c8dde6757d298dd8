"""Writes configs/paper/*.yaml: one run config per paper setting, each headed by the paper's own
figures for it (read from ../shared/paper/results.csv, never typed by hand), with a token budget
that fits its models' real context.

    python configs/paper/write_configs.py [--shared ../shared]

The budget is the paper's 4096 new tokens where that fits; else the context less the longest
prompt of the benchmark (through the small model's real tokenizer and chat template) and
SpecReason's judge prompt, so every method runs on every question. Both are said in the file.
Where a tokenizer is not in ../shared/data/hf (Gemma 3), a prompt's UTF-8 bytes bound its
tokens from above: every token of those vocabularies is at least one byte.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAPER_BUDGET = 4096
# (small, large) -> (the paper's pair name in results.csv, the tokenizer copy in shared/data/hf,
# the benchmarks the paper runs the pair on)
SETTINGS = {
    ("Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct"):
        ("qwen2.5-math-1.5b-7b", "Qwen2.5-Math-1.5B", ("math500", "omnimath", "aime")),
    ("gemma-3-4b-it", "gemma-3-12b-it"):
        ("gemma-3-4b-12b", None, ("math500", "omnimath", "aime", "acpbench", "musique",
                                  "korbench_cipher", "korbench_counterfactual", "korbench_logic")),
    ("Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct"):
        ("qwen2.5-1.5b-7b", "Qwen2.5-1.5B-Instruct",
         ("acpbench", "musique", "korbench_cipher", "korbench_counterfactual", "korbench_logic")),
}


def paper_rows(results_csv: Path, pair: str, benchmark: str) -> tuple[str, list[dict[str, str]]]:
    """The paper's table and rows for a pair on a benchmark, in its order (KOR-Bench subsets: its
    pooled row)."""
    bench = "korbench" if benchmark.startswith("korbench_") else benchmark
    with results_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r["pair"] == pair and r["benchmark"] == bench]
    return (rows[0]["table"] if rows else ""), rows


def longest_prompt(shared: Path, benchmark: str, hf_dir: str | None) -> tuple[int, int, str]:
    """Tokens of the benchmark's longest prompt and of SpecReason's judge prompt, and how they
    were counted."""
    from steer_jax.baselines.judge import JUDGE_PROMPT, judge_suffix
    from steer_jax.eval import load_benchmark
    from steer_jax.eval.prompts import build_messages, render_prompt

    examples = load_benchmark(benchmark, shared / "data")
    if hf_dir is not None:
        from steer_jax.modeling.loading import load_tokenizer

        tok = load_tokenizer(shared / "data" / "hf" / hf_dir)
        n = max(len(tok(render_prompt(tok, ex, benchmark), add_special_tokens=False)["input_ids"])
                for ex in examples)
        return n, len(judge_suffix(tok)), f"{hf_dir}'s tokenizer"
    import jinja2

    template = json.loads((shared / "data" / "hf" / "gemma-3-4b-it" / "chat_template.json")
                          .read_text())["chat_template"]
    render = jinja2.Environment().from_string(template).render
    n = max(len(render(messages=build_messages(ex, benchmark, "gemma"), bos_token="<bos>",
                       add_generation_prompt=True).encode()) for ex in examples)
    judge = len(render(messages=[{"role": "user", "content": JUDGE_PROMPT}], bos_token="",
                       add_generation_prompt=True).encode())
    return n, judge, "UTF-8 bytes through the chat template (an upper bound)"


def context(small: str, large: str, shared: Path) -> int:
    from steer_jax.modeling import families
    from steer_jax.modeling.loading import read_config

    sizes = []
    for name in (small, large):
        path = shared / "data" / "hf" / name
        cfg = read_config(path) if (path / "config.json").is_file() else families.known(name)
        sizes.append(cfg.max_position_embeddings)
    return min(sizes)


def header(small: str, large: str, benchmark: str, table: str, rows: list[dict[str, str]],
           budget_note: list[str]) -> list[str]:
    label = benchmark if not benchmark.startswith("korbench_") else f"KOR-Bench ({benchmark})"
    out = [f"# STEER paper setting: {small} (small) with {large} (large)", f"# on {label}.",
           "# Fill in `small` and `large` with local Hugging Face checkpoint folders (config.json, "
           "tokenizer,",
           "# safetensors). Without `benchmark.path` the hub dataset is downloaded; a local copy "
           "in the layout",
           "# of the shared data folder works too, e.g. path: /path/to/data/math500/test.jsonl",
           "#",
           "# Paper numbers (Lee et al., \"Confidence-Guided Stepwise Model Routing for "
           "Cost-Efficient",
           f"# Reasoning\", arXiv:2511.06190, Table {table}; each method at its best grid point), "
           "written by",
           "# configs/paper/write_configs.py from the paper's tables as CSV:"]
    for r in rows:
        out.append(f"#   {r['method']:<13} Acc {r['accuracy']:>5}   FLOPs (1e12/query) "
                   f"{r['flops_per_query_1e12']:>5}   A/F {r['a_per_f']}")
    if benchmark.startswith("korbench_"):
        out.append("# The paper reports KOR-Bench as one column, its three subsets pooled: these "
                   "are that row.")
    return out + ["#"] + budget_note


def write(shared: Path, out: Path = HERE) -> list[Path]:
    written = []
    results_csv = shared / "paper" / "results.csv"
    for (small, large), (pair, hf_dir, benchmarks) in SETTINGS.items():
        ctx = context(small, large, shared)
        for benchmark in benchmarks:
            table, rows = paper_rows(results_csv, pair, benchmark)
            prompt, judge, how = longest_prompt(shared, benchmark, hf_dir)
            if prompt + judge + PAPER_BUDGET <= ctx:
                budget = PAPER_BUDGET
                note = [f"# max_new_tokens: the paper's {PAPER_BUDGET}: the longest prompt ({prompt} "
                        f"tokens) and the judge prompt",
                        f"# ({judge}) fit beside it in the context ({ctx}).", f"# Counted by {how}."]
            else:
                budget = ctx - prompt - judge
                note = [f"# max_new_tokens: {ctx} (the models' context) - {prompt} (the longest "
                        f"prompt) - {judge} (SpecReason's",
                        f"# judge prompt) = {budget}: the paper's {PAPER_BUDGET} does not fit.",
                        f"# Counted by {how}."]
            lines = header(small, large, benchmark, table, rows, note) + config_lines(
                small, large, pair, benchmark, budget)
            path = out / f"{pair}_{benchmark}.yaml"
            path.write_text("\n".join(lines) + "\n")
            written.append(path)
    return written


def config_lines(small: str, large: str, pair: str, benchmark: str, budget: int) -> list[str]:
    aggregate = "math" if benchmark in ("math500", "omnimath", "aime") else "all"
    steer: dict[str, Any] = {
        "gamma": 0.5, "max_steps": 64, "max_step_tokens": 256, "max_new_tokens": budget,
        "delimiter": '"\\n\\n"', "confidence": "max_logit", "aggregate": aggregate,
        "source": "small", "groups": 1, "refine": "first", "policy": "posterior",
        "percentile": 0.3, "threshold": "null"}
    return [f"small: /path/to/{small}   # local HF dir", f"large: /path/to/{large}",
            f"pair: {pair}   # the paper's name for it: `steer-jax report --paper` matches by it",
            "method: steer            # steer | small_only | large_only | specreason | rsd | "
            "query_router",
            f"benchmark: {{name: {benchmark}, path: null, limit: null}}",
            "sampling: {temperature: 0.7, top_p: 1.0, seed: 0}",
            "steer: {" + ", ".join(f"{k}: {v}" for k, v in steer.items()) + "}",
            "batch: {size: null}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared",
                    help="the shared folder: data/ (benchmarks, hf/) and paper/results.csv")
    for path in write(ap.parse_args().shared):
        print(path)


if __name__ == "__main__":
    main()
