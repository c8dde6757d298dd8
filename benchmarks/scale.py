"""Wall-clock at real step lengths: STEER in rounds and continuous against the large model alone.

The workload (benchmarks/workload.py): a model pair whose sampled steps follow a stated length
law (default: a mixture of geometrics fitted to a lognormal of median 35 tokens, sigma 0.9;
12 steps a trace on average), enforced by the models' weights, at `--shape` (tiny-wide: the CPU
default, a small decode step 0.23 of the large one's; tiny: the first one, 0.41;
Qwen2.5-Math-1.5B/7B: the real dimensions in bfloat16, for an accelerator). Every run
decodes the same prompts, twice; the second run, compiled, is timed:

  large_only_unbarriered  the large model's `generate` to EOS, one batch, no step barrier: the
                          honest peer every ratio is taken against
  large_only_rounds       method large_only, schedule rounds (every round waits for its longest
                          step)
  large_only_continuous   method large_only, schedule continuous (not a peer: it shows what the
                          continuous schedule alone does to the large model)
  steer_rounds            STEER, percentile policy (--percentile of the running traces' newest
                          steps go to the large model), schedule rounds
  steer_continuous        the same, schedule continuous, steer.chunk --chunk

For each: decode iterations (positions stepped) per model, tokens written, executed and useful
token-rows per model (rows x positions computed; tokens written or read), FLOPs at 2N per written
token, wall-clock and its ratio to the peer. Then the step lengths the peer's text measured against
the stated law, and (--rows) what one decode step costs at 16, 64 and 256 rows: where that grows
with the rows (a CPU), executed token-rows are the wall-clock; where it does not (a
memory-bound accelerator), iterations are.

    python benchmarks/scale.py [--traces 256] [--shape tiny-wide] [--chunk 8] [--json]

The default chunk is what measured best on the CPU (RESULTS.md: 8 and 16 against 32); the
library's default for `steer.chunk` stays 32, for accelerators, where idle rows cost nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import (SHAPES, StepLengths, build_pair, decode_step_seconds,  # noqa: E402
                      prompts, split_steps, summarize)

from steer_jax import generate, steer  # noqa: E402
from steer_jax.programs import release_programs  # noqa: E402

PEER = "large_only_unbarriered"


def _law(args: argparse.Namespace) -> StepLengths:
    if args.geometric:
        return StepLengths.geometric(args.geometric, args.mean_steps)
    if args.weights or args.means:
        return StepLengths(tuple(args.weights), tuple(args.means), args.mean_steps)
    return StepLengths(mean_steps=args.mean_steps)


def _unbarriered(large, qs, args) -> tuple[dict[str, Any], list[list[int]]]:
    # The large model's sampling stream in a STEER run: large_only draws these very tokens.
    out = generate(large, qs, args.max_new_tokens, temperature=0.7, seed=args.seed, stream=1)
    n = [len(t) for t in out.tokens]
    rows = len(qs) * max(n)  # every row stays in the batch until the longest is done
    return dict(iterations={"large": max(n)}, tokens=sum(n), longest=max(n),
                executed={"large": rows}, useful={"large": sum(n) + sum(map(len, qs))},
                flops=2 * large.num_params * sum(n)), out.tokens


def _steer(small, large, tok, qs, args, **kw) -> tuple[dict[str, Any], list[list[int]]]:
    res = steer(small, large, tok, qs, max_steps=args.max_steps, max_step_tokens=256,
                max_new_tokens=args.max_new_tokens, policy="percentile",
                percentile=args.percentile, refine="none", seed=args.seed,
                batch_size=args.batch, **kw)
    steps = [s for t in res.traces for s in t.steps]
    written = {m: sum(t.generated[m] for t in res.traces) for m in ("small", "large")}
    useful = {m: written[m] + sum(t.read[m] for t in res.traces) for m in ("small", "large")}
    return dict(iterations=res.iterations, tokens=sum(written.values()),
                longest=max(len(t.tokens) for t in res.traces), executed=res.executed_tokens,
                useful=useful, flops=sum(2 * res.params[m] * written[m] for m in written),
                large_steps=sum(s.model == "large" for s in steps) / max(len(steps), 1),
                rounds=max(s.round for s in steps) + 1), [t.tokens for t in res.traces]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny-wide", choices=sorted(SHAPES))
    ap.add_argument("--traces", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--max-steps", type=int, default=64)
    ap.add_argument("--percentile", type=float, default=0.3)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="batch.size (default: all traces)")
    ap.add_argument("--geometric", type=float, help="steps of one geometric law of this mean")
    ap.add_argument("--weights", type=float, nargs="*", help="mixture weights of the law")
    ap.add_argument("--means", type=float, nargs="*", help="mixture means of the law")
    ap.add_argument("--mean-steps", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each; the last is timed")
    ap.add_argument("--rows", default="16,64,256", help="decode-step timings ('' for none)")
    ap.add_argument("--only", default="", help="comma-separated runs to make (the peer always)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--save", help="also write that JSON object to this file")
    args = ap.parse_args()
    law = _law(args)
    small, large, tok = build_pair(args.shape, law, args.seed)
    qs = prompts(args.traces, args.prompt_len, args.seed)
    runs = {
        PEER: lambda: _unbarriered(large, qs, args),
        "large_only_rounds": lambda: _steer(small, large, tok, qs, args, method="large_only"),
        "large_only_continuous": lambda: _steer(small, large, tok, qs, args, method="large_only",
                                                schedule="continuous", chunk=args.chunk),
        "steer_rounds": lambda: _steer(small, large, tok, qs, args),
        "steer_continuous": lambda: _steer(small, large, tok, qs, args, schedule="continuous",
                                           chunk=args.chunk),
    }
    if args.only:
        keep = {PEER, *args.only.split(",")}
        if keep - set(runs):
            ap.error(f"--only: no runs {sorted(keep - set(runs))}; there are {list(runs)}")
        runs = {k: v for k, v in runs.items() if k in keep}
    results, texts = {}, {}
    for name, fn in runs.items():
        release_programs()  # each run compiles its own (a process holds ~200: programs.py)
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name], texts[name] = fn()
            results[name]["wall_s"] = time.perf_counter() - start
            print(f"{name}: {results[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    peer = results[PEER]
    for r in results.values():
        r["vs_peer"] = r["wall_s"] / peer["wall_s"]
        # Against the run's own longest trace: the fewest positions any schedule needs.
        r["iterations_vs_longest"] = max(r["iterations"].values()) / r["longest"]
        r["all_iterations_vs_longest"] = sum(r["iterations"].values()) / r["longest"]
    measured = summarize(sum((split_steps(t, tok) for t in texts[PEER]), []))
    stated = {f"p{q}": law.quantile(q / 100) for q in (50, 90, 99)}
    rows = {}
    if args.rows:
        for name, m in (("small", small), ("large", large)):
            rows[name] = {int(r): decode_step_seconds(m, int(r), length=args.max_new_tokens // 2)
                          for r in args.rows.split(",")}
    report = dict(shape=args.shape, traces=args.traces, law=dict(
        weights=law.weights, means=law.means, mean_steps=law.mean_steps, stated=stated,
        measured=measured), params={"small": small.num_params, "large": large.num_params},
        decode_step_s=rows, **results)
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
        return
    _print(report, args)


def _print(rep: dict[str, Any], args: argparse.Namespace) -> None:
    p = rep["params"]
    print(f"shape {rep['shape']}: small {p['small'] / 1e6:.2f}M, large {p['large'] / 1e6:.2f}M "
          f"parameters ({p['small'] / p['large']:.2f}); {rep['traces']} traces of "
          f"{args.prompt_len}-token prompts, max_new_tokens {args.max_new_tokens}, chunk "
          f"{args.chunk}, percentile {args.percentile}")
    law = rep["law"]
    m = law["measured"]
    print(f"step lengths: stated p50/p90/p99 {law['stated']['p50']}/{law['stated']['p90']}/"
          f"{law['stated']['p99']}, measured on the peer's text {m['median']:.0f}/{m['p90']:.0f}/"
          f"{m['p99']:.0f} over {m['count']} complete steps (mean {m['mean']:.1f})")
    for name, sec in rep["decode_step_s"].items():
        print(f"decode step, {name}: " + ", ".join(f"{r} rows {1e3 * s:.1f} ms"
                                                   for r, s in sec.items()))
    print("| run | iterations (small/large) | x longest trace (max; sum) | tokens | "
          "executed/useful token-rows (small; large) | large steps | FLOPs | wall-clock | vs " + PEER + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in (PEER, "large_only_rounds", "large_only_continuous", "steer_rounds",
                 "steer_continuous"):
        if name not in rep:
            continue
        r = rep[name]
        it = r["iterations"]
        ex = "; ".join(f"{r['executed'].get(k, 0)}/{r['useful'].get(k, 0)}"
                       for k in ("small", "large"))
        frac = f"{r['large_steps']:.0%}" if "large_steps" in r else "-"
        print(f"| {name} | {it.get('small', 0)}/{it.get('large', 0)} | "
              f"{r['iterations_vs_longest']:.2f}; {r['all_iterations_vs_longest']:.2f} | "
              f"{r['tokens']} | {ex} | {frac} | "
              f"{r['flops']:.3g} | {r['wall_s']:.1f} s | {r['vs_peer']:.2f} |")


if __name__ == "__main__":
    main()
