"""Continuous against rounds STEER on the embedded demo, and both against the large model alone.

For each demo pair (configs/demo.yaml, configs/demo-gemma3.yaml) on its 500-problem test split,
in this one process, every run twice, the second one timed:
  large_only_unbarriered  the large model's `generate` to EOS over the same prompts, one batch,
                          graded as a run is: the honest wall-clock peer
  steer_rounds            the config as shipped (schedule rounds)
  steer_continuous        schedule continuous, steer.chunk --chunk. The demo's steps are 10-24
                          tokens and its max_step_tokens 24: a chunk of 24 or more ends every
                          step at every boundary, as rounds do; 8 makes a step span calls.
It prints accuracy, FLOPs per query, large steps, rounds and wall-clock, continuous against
rounds (accuracy points, FLOPs ratio) and every run's wall-clock against the peer.

    python benchmarks/schedules.py [--chunk 8] [--limit 500] [--pairs qwen2 gemma3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from steer_jax import generate
from steer_jax.eval import grade, render_prompt
from steer_jax.modeling.loading import load_model, load_tokenizer
from steer_jax.run_config import examples_of, load_config, validate
from steer_jax.runner import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"qwen2": "configs/demo.yaml", "gemma3": "configs/demo-gemma3.yaml"}


def _peer(cfg: dict, models: tuple) -> dict:
    """The large model alone, one `generate` to EOS: accuracy and wall-clock."""
    _, opts = validate(cfg)
    small, large, tok = models
    bench = cfg["benchmark"]
    examples = examples_of(bench)
    prompts = [tok(render_prompt(tok, ex, bench["name"]), add_special_tokens=False)["input_ids"]
               for ex in examples]
    start = time.perf_counter()
    out = generate(large, prompts, opts.max_new_tokens, temperature=opts.temperature,
                   top_p=opts.top_p, seed=opts.seed, stream=1)
    wall = time.perf_counter() - start
    right = [grade(bench["name"], tok.decode(t, skip_special_tokens=True), ex)
             for t, ex in zip(out.tokens, examples)]
    flops = 2 * large.num_params * sum(map(len, out.tokens)) / len(prompts) / 1e12
    return dict(accuracy=sum(right) / len(right), flops=flops, wall_s=wall, large_steps=1.0,
                rounds=None)


def _steer(cfg: dict, models: tuple) -> dict:
    s = run(cfg, models=models)
    return dict(accuracy=s.accuracy, flops=s.flops_per_query, wall_s=s.wall_s,
                large_steps=s.large_step_fraction, rounds=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--pairs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    print("| pair | run | accuracy | FLOPs/query (1e12) | large steps | wall-clock | "
          "vs large_only_unbarriered |")
    print("|---|---|---|---|---|---|---|")
    for pair in args.pairs:
        base = [f"benchmark.limit={args.limit}"] if args.limit else []
        base += [f"small={ROOT / load_config(ROOT / CONFIGS[pair])['small']}",
                 f"large={ROOT / load_config(ROOT / CONFIGS[pair])['large']}"]
        cfg = load_config(ROOT / CONFIGS[pair], base)
        models = (load_model(cfg["small"], cfg["dtype"]), load_model(cfg["large"], cfg["dtype"]),
                  load_tokenizer(cfg["small"]))
        variants = {
            "large_only_unbarriered": lambda: _peer(cfg, models),
            "steer_rounds": lambda: _steer(cfg, models),
            "steer_continuous": lambda: _steer(load_config(
                ROOT / CONFIGS[pair], base + ["steer.schedule=continuous",
                                              f"steer.chunk={args.chunk}"]), models),
        }
        res = {}
        for name, fn in variants.items():
            fn()  # compiles
            res[name] = fn()
        peer = res["large_only_unbarriered"]["wall_s"]
        for name, r in res.items():
            print(f"| {pair} | {name} | {100 * r['accuracy']:.1f} | {r['flops']:.3g} | "
                  f"{r['large_steps']:.0%} | {r['wall_s']:.2f} s | {r['wall_s'] / peer:.2f} |")
        a, b = res["steer_rounds"], res["steer_continuous"]
        print(f"| {pair} | continuous vs rounds | {100 * (b['accuracy'] - a['accuracy']):+.1f} "
              f"points | {b['flops'] / a['flops']:.3f}x | | {b['wall_s'] / a['wall_s']:.2f}x | |")


if __name__ == "__main__":
    main()
