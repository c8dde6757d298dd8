"""STEER variants on the demo pair: `steer.source` small vs generator, `steer.refine` first vs all,
and the gamma sweep, against the small_only and large_only baselines, all in one process.

    python benchmarks/demo_variants.py [--config configs/demo.yaml] [--out runs/demo-variants]

Each variant is one run directory under OUT (summary.json, traces.jsonl); the printed Markdown
table is what the README's demo section quotes (`steer-jax report OUT/gamma_* ...` draws the
sweep).
"""

from __future__ import annotations

import argparse

from steer_jax.demo import run_demo
from steer_jax.runner import load_config

VARIANTS = {
    "small_only": {"method": "small_only"},
    "large_only": {"method": "large_only"},
    "source_small-refine_first": {"steer": {"source": "small", "refine": "first"}},
    "source_generator-refine_first": {"steer": {"source": "generator", "refine": "first"}},
    "source_small-refine_all": {"steer": {"source": "small", "refine": "all"}},
    "source_generator-refine_all": {"steer": {"source": "generator", "refine": "all"}},
    **{f"gamma_{g}": {"steer": {"gamma": g}} for g in (0.1, 0.3, 0.5, 0.7, 0.9)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/demo-variants")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    # Accuracy and FLOPs do not depend on compiles; the wall-clock here includes them (make demo's
    # does not).
    summaries = run_demo(config, args.out, runs=VARIANTS, warm_up=False)
    large = summaries["large_only"]
    print("| run | Acc | FLOPs / large_only | large steps | wall-clock / large_only |")
    print("|---|---|---|---|---|")
    for name, s in summaries.items():
        print(f"| {name} | {100 * s.accuracy:.1f} | {s.flops_per_query / large.flops_per_query:.2f}"
              f" | {100 * s.large_step_fraction:.1f}% | {s.wall_s / large.wall_s:.2f} |")


if __name__ == "__main__":
    main()
