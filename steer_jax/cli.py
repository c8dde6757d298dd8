"""`steer-jax` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _generate(args: argparse.Namespace) -> int:
    from steer_jax import generate, load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, list):  # transformers 5 returns a BatchEncoding
        prompt = list(prompt["input_ids"])
    for step in range(args.steps):
        res = generate(model, [prompt], args.max_step_tokens, temperature=args.temperature,
                       seed=args.seed, stop_at_step=True, tokenizer=tokenizer)
        new = res.tokens[0]
        print(f"--- step {step}  confidence {res.step_confidence[0]:.3f}  "
              f"({len(new)} tokens, {res.stop_reasons[0]})")
        print(tokenizer.decode(new, skip_special_tokens=True).strip())
        prompt = prompt + new
        if res.stop_reasons[0] in ("eos", "cache_full"):
            break
    return 0


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from steer_jax.runner import load_config, run

    console = Console(stderr=True)
    config = load_config(args.config, args.set)
    with console.status("running") as status:
        summary = run(config, args.out, progress=lambda msg: status.update(msg))
    console.print(f"{summary.method} on {summary.benchmark}: accuracy {summary.accuracy:.3f}, "
                  f"{summary.flops_per_query:.4g}e12 FLOPs/query, A/F {summary.a_per_f:.4g}, "
                  f"large steps {summary.large_step_fraction:.1%}, {summary.wall_s:.1f}s")
    console.print(f"wrote {args.out}/summary.json, traces.jsonl, rounds.jsonl")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from steer_jax.runner import load_config, sweep

    config = load_config(args.config, args.set)
    gammas = [float(g) for g in args.gammas.split(",")]
    sweep(config, gammas, args.out, progress=print)
    return 0


def _report(args: argparse.Namespace) -> int:
    from steer_jax.eval import main_report

    return main_report(args.rest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steer-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="step-by-step generation with per-step confidence")
    gen.add_argument("--model", required=True, help="local HF checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=int, default=8)
    gen.add_argument("--max-step-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    gen.set_defaults(func=_generate)

    for name, func, text in (("run", _run, "run one config"),
                             ("sweep", _sweep, "run a config over a list of gamma values")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML run config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set steer.gamma=0.7")
        p.add_argument("--out", required=True, help="output directory")
        p.set_defaults(func=func)
        if name == "sweep":
            p.add_argument("--gammas", default="0.1,0.3,0.5,0.7,0.9")

    rep = sub.add_parser("report", help="tables and plots from run directories", add_help=False)
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    rep.set_defaults(func=_report)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # config, checkpoint and input errors: the message says what to fix
        parser.exit(2, f"steer-jax: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
