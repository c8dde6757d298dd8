"""Sub-batched rounds and small page pools against one batch: same traces, one mixture a round.

Runs the demo config (configs/demo.yaml, its shipped models) on the first `--limit` problems
three ways through `steer_jax.run`, in this one process:
  one batch      batch.size = limit, every trace's pages up front (nothing evicted);
  sub-batches    batch.size = --batch: each model's work in a round in calls of that many traces;
  small pools    the same, with pools of --pages pages of --page-size tokens, so traces give
                 their pages back and read their tokens again when next scheduled.
For each it prints the traces that differ from the one-batch run (a re-read cache can differ from
the decoded one in the last float bits, which may flip a sampled token), the confidences each
round's mixtures were fitted on, the tokens each model computed (executed) and the wall-clock.

    python benchmarks/paging.py [--limit 64] [--batch 16] [--page-size 16] [--pages 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from steer_jax.run_config import load_config
from steer_jax.runner import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=400)
    args = ap.parse_args()
    base = [f"benchmark.limit={args.limit}", f"small={ROOT / 'models/demo-qwen2-small'}",
            f"large={ROOT / 'models/demo-qwen2-large'}"]
    variants = {
        "one batch": [f"batch.size={args.limit}"],
        "sub-batches": [f"batch.size={args.batch}"],
        "small pools": [f"batch.size={args.batch}", f"cache.page_size={args.page_size}",
                        f"cache.pages={args.pages}"],
    }
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in variants.items():
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            summary = run(load_config(args.config, base + sets), out)
            wall = time.perf_counter() - start
            traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
            rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
            outputs[name] = (traces, rounds, summary, wall)
    ref_traces, _, ref_summary, ref_wall = outputs["one batch"]
    print(f"demo config, {args.limit} problems, method {ref_summary.method}")
    for name, (traces, rounds, summary, wall) in outputs.items():
        differ = sum(a["output"] != b["output"] or
                     [s["model"] for s in a["steps"]] != [s["model"] for s in b["steps"]]
                     for a, b in zip(traces, ref_traces))
        fitted = Counter((m["round"], m["model"]) for m in rounds)
        sizes = sorted({len(m["confidences"]) for m in rounds if m["round"] == 0})
        executed = summary.executed_flops_per_query / ref_summary.executed_flops_per_query
        print(f"{name:12s} {differ}/{len(traces)} traces differ; mixtures a round and writer: "
              f"{max(fitted.values())}; round 0 fitted on {sizes} confidences; accuracy "
              f"{summary.accuracy:.3f}; executed FLOPs {executed:.2f}x one batch; wall "
              f"{wall:.1f} s ({ref_wall / wall:.2f}x one batch's speed)")


if __name__ == "__main__":
    main()
