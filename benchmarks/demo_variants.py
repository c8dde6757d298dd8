"""STEER variants on the demo pair: `steer.source` small vs generator, `steer.refine` first vs all,
and the gamma sweep, against the small_only and large_only baselines, all in one process.

    python benchmarks/demo_variants.py [--config configs/demo.yaml] [--out runs/demo-variants]
    python benchmarks/demo_variants.py --measures   # which step confidence to route on
    python benchmarks/demo_variants.py --mixture    # which traces the mixture is fitted over

`--measures` runs the small model alone on a held-out split (500 problems of the test bucket drawn
with seed 1, none of them in the test split) once per confidence measure and prints how well each
step confidence ranks the small model's right steps above its wrong ones (ROC AUC against
scikit-learn's `roc_auc_score`; a step is right when it equals the worked solution's line and
every step before it was right). This is how the demo configs' `confidence` was chosen.

`--mixture` runs STEER at the config's settings under `steer.fit_over` running (the paper's, the
default) and running_and_ended, each with `steer.min_fit_traces` 16 (the default) and 1 (every
pool refitted; with running_and_ended, the rule before issue #23), beside large_only, and prints
accuracy, FLOPs and large-step share (no wall-clock: these runs are not warmed up).

Each variant is one run directory under OUT (summary.json, traces.jsonl); the printed Markdown
table is what the README's demo section quotes (`steer-jax report OUT/gamma_* ...` draws the
sweep).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from steer_jax.demo import run_demo
from steer_jax.run_config import load_config

VARIANTS = {
    "small_only": {"method": "small_only"},
    "large_only": {"method": "large_only"},
    "source_small-refine_first": {"steer": {"source": "small", "refine": "first"}},
    "source_generator-refine_first": {"steer": {"source": "generator", "refine": "first"}},
    "source_small-refine_all": {"steer": {"source": "small", "refine": "all"}},
    "source_generator-refine_all": {"steer": {"source": "generator", "refine": "all"}},
    # 0 and 1 are the curve's ends (small_only; every step from the large model). Up to 0.999:
    # the posterior is sharp when the mixture separates well, so the interesting part of the
    # curve sits close to 1.
    **{f"gamma_{g}": {"steer": {"gamma": g}}
       for g in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 1.0)},
}


MIXTURE = {
    "large_only": {"method": "large_only"},
    **{f"fit_{rule}-min_{n}": {"steer": {"fit_over": rule, "min_fit_traces": n}}
       for rule in ("running", "running_and_ended") for n in (16, 1)},
}


def held_out_split(path: Path, n: int = 500) -> Path:
    from steer_jax.eval import demo_task

    test = {e.question for e in demo_task.make_split("test")}
    dev = [e for e in demo_task.make_split("test", 2 * n, seed=1) if e.question not in test]
    return demo_task.write_split(path, dev[:n])


def step_auroc(run_dir: Path, examples: dict) -> tuple[float, int, int]:
    """(AUROC of step confidence for "step right", steps, wrong steps) up to each first error."""
    from sklearn.metrics import roc_auc_score

    right, conf = [], []
    for line in (run_dir / "traces.jsonl").read_text().splitlines():
        trace = json.loads(line)
        lines = examples[trace["id"]].meta["solution"].split("\n\n")
        for i, step in enumerate(trace["steps"]):
            ok = i < len(lines) and step["text"].replace("<|im_end|>", "").strip() == lines[i]
            right.append(ok)
            conf.append(step["confidence"])
            if not ok:
                break
    return float(roc_auc_score(right, conf)), len(right), right.count(False)


def measures(config: dict, out: str) -> None:
    from steer_jax.eval import demo_task

    with tempfile.TemporaryDirectory() as tmp:
        path = held_out_split(Path(tmp) / "held_out.jsonl")
        examples = {e.id: e for e in demo_task.read_split(path)}
        config = {**config, "benchmark": {"name": "demo", "path": str(path), "limit": None}}
        runs = {m: {"method": "small_only", "steer": {"confidence": m}}
                for m in ("max_logit", "max_prob", "neg_entropy")}
        run_demo(config, out, runs=runs, warm_up=False)
    print("| step confidence | AUROC (right vs wrong steps) | steps | wrong |")
    print("|---|---|---|---|")
    for m in runs:
        auc, n, wrong = step_auroc(Path(out) / m, examples)
        print(f"| {m} | {auc:.3f} | {n} | {wrong} |")


def mixture(config: dict, out: str) -> None:
    summaries = run_demo(config, out, runs=MIXTURE, warm_up=False)
    large = summaries["large_only"]
    print("| run | Acc | FLOPs/query (1e12) | vs large_only | large steps |")
    print("|---|---|---|---|---|")
    for name, s in summaries.items():
        print(f"| {name} | {100 * s.accuracy:.1f} | {s.flops_per_query:.3g} | "
              f"{s.flops_per_query / large.flops_per_query:.2f} | "
              f"{100 * s.large_step_fraction:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/demo-variants")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--measures", action="store_true", help="compare confidence measures")
    parser.add_argument("--mixture", action="store_true", help="compare mixture pool rules")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    if args.measures:
        return measures(config, args.out + "-measures")
    if args.mixture:
        return mixture(config, args.out + "-mixture")
    # Warmed up as make demo is, so the wall-clock column compares compiled programs.
    summaries = run_demo(config, args.out, runs=VARIANTS)
    large = summaries["large_only"]
    print("| run | Acc | FLOPs / large_only | large steps | wall-clock / large_only |")
    print("|---|---|---|---|---|")
    for name, s in summaries.items():
        print(f"| {name} | {100 * s.accuracy:.1f} | {s.flops_per_query / large.flops_per_query:.2f}"
              f" | {100 * s.large_step_fraction:.1f}% | {s.wall_s / large.wall_s:.2f} |")


if __name__ == "__main__":
    main()
