"""`steer-jax` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Sequence

# train-demo's defaults, as steer_jax.train_demo.TrainOptions has them (not imported: jax is slow
# to import and --help should not wait for it).
TRAIN_STEPS, TRAIN_BATCH = 1500, 32


def _generate(args: argparse.Namespace) -> int:
    from steer_jax import load_model, load_tokenizer, steer

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # One model's steps through the STEER engine: small_only with the model on both sides.
    result = steer(model, model, tokenizer, [ids], method="small_only", max_steps=args.steps,
                   max_step_tokens=args.max_step_tokens,
                   max_new_tokens=args.steps * args.max_step_tokens,
                   temperature=args.temperature, seed=args.seed)
    for step in result.traces[0].steps:
        print(f"--- step {step.round}  confidence {step.confidence:.3f}  ({step.tokens} tokens)")
        print(step.text.strip())
    return 0


@contextlib.contextmanager
def _progress_bar():
    """A rich progress bar; yields the `progress(done, total, message)` callback runs accept."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("loading", total=None)
        yield lambda done, total, msg: bar.update(task, completed=done, total=total,
                                                  description=msg)


def _print_summary(s) -> None:
    print(f"{s.method} on {s.benchmark}" + (f" (gamma {s.gamma:g})" if s.gamma is not None else "")
          + f": accuracy {s.accuracy:.3f}, {s.flops_per_query * 1e12:.4g} FLOPs/query, "
          f"A/F {s.a_per_f:.4g}, large steps {s.large_step_fraction:.1%}, {s.wall_s:.1f}s")


# The exit status of a run stopped by SIGTERM after saving its round: 128 + SIGTERM, what a
# scheduler sees of a process SIGTERM ended, so its requeue rules apply; `--resume` continues.
PREEMPTED = 143


def _run(args: argparse.Namespace) -> int:
    from steer_jax.run_config import load_config
    from steer_jax.runner import Preempted, run

    config = load_config(args.config, args.set)
    try:
        with _progress_bar() as progress:
            summary = run(config, args.out, progress=progress, resume=args.resume,
                          checkpoint_every=args.checkpoint_every)
    except Preempted as e:
        print(f"steer-jax: {e} (--resume)", file=sys.stderr)
        return PREEMPTED
    if summary is None:
        print("this process's part is written; process 0 writes the outputs")
        return 0
    _print_summary(summary)
    print(f"wrote {args.out}/summary.json, traces.jsonl, rounds.jsonl")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from steer_jax.run_config import load_config
    from steer_jax.runner import Preempted
    from steer_jax.sweeps import DEFAULT_GAMMAS, parse_grid, sweep

    config = load_config(args.config, args.set)
    # --gammas is `--grid steer.gamma=...`; with neither flag, the default gammas.
    gammas = [] if args.gammas is None and args.grid else \
        [f"steer.gamma={args.gammas or DEFAULT_GAMMAS}"]
    grid = parse_grid(gammas + args.grid)
    try:
        with _progress_bar() as progress:
            summaries = sweep(config, grid, args.out, progress=progress, resume=args.resume,
                              checkpoint_every=args.checkpoint_every)
    except Preempted as e:
        print(f"steer-jax: {e} (--resume)", file=sys.stderr)
        return PREEMPTED
    for s in summaries:
        _print_summary(s)
    print(f"wrote a run directory per grid point under {args.out}/ and {args.out}/sweep.md")
    return 0


def _train_router(args: argparse.Namespace) -> int:
    from steer_jax.run_config import load_config
    from steer_jax.train_router import train_router_from_config

    with _progress_bar() as progress:
        out = train_router_from_config(load_config(args.config, args.set), args.out, progress)
    print(f"router saved to {out}; use it with method: query_router and router.path: {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from steer_jax.modeling.convert import convert

    out = convert(args.hf_dir, args.out_dir, args.dtype)
    print(f"wrote {out}: load it with load_model({str(out)!r}) or name it in a run config")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from steer_jax.train_demo import FAMILIES, TrainOptions, train_pair

    opts = TrainOptions(steps=args.steps, batch=args.batch, seed=args.seed)
    for family in FAMILIES if args.family == "all" else [args.family]:
        record = train_pair(family, args.out, opts, sizes=args.sizes.split(","))
        for size, m in record["models"].items():
            print(f"{family} {size}: {m['params']:,} parameters, final loss "
                  f"{m['final_loss']:.4f}, {m['seconds']:.0f}s -> {m['path']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from steer_jax.demo import run_demo
    from steer_jax.eval.report import report
    from steer_jax.eval.runs import expand_run_dirs
    from steer_jax.run_config import load_config

    config = load_config(args.config, args.set)
    with _progress_bar() as progress:
        summaries = run_demo(config, args.out, progress=progress)
    for s in summaries.values():
        _print_summary(s)
    out = report(expand_run_dirs([args.out]), Path(args.out) / "report")
    print(f"runs in {args.out}/<method>/ (summary.json, traces.jsonl); table and plots in {out}/")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from steer_jax.memory import parse_bytes
    from steer_jax.plan import format_plan, plan_from_config, plan_json
    from steer_jax.run_config import load_config

    memory = parse_bytes(args.device_memory)
    for flag, value, least in (("--devices", args.devices, 1), ("--mean-tokens",
                               args.mean_tokens, 0), ("--prompt-tokens", args.prompt_tokens, 1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    result = plan_from_config(load_config(args.config, args.set), memory, devices=args.devices,
                              mean_tokens=args.mean_tokens, prompt_tokens=args.prompt_tokens)
    print(json.dumps(plan_json(result), indent=2) if args.json else format_plan(result))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="KV pages and traces that fit on a device, from the models' "
                        "config.json alone (no weights)")
    pl.add_argument("config", help="YAML run config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set small=/path/to/checkpoint")
    pl.add_argument("--device-memory", default="80GiB", help="memory of one device, e.g. "
                    "80GiB, 141GB, 16GiB")
    pl.add_argument("--devices", type=int, default=1,
                    help="devices on the 'model' axis, each of --device-memory")
    pl.add_argument("--mean-tokens", type=int, default=1024,
                    help="generated tokens per trace for the resident count")
    pl.add_argument("--prompt-tokens", type=int, default=256, help="prompt length when the "
                    "tokenizer or benchmark.path cannot be read")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=_plan)


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
                             ("sweep", _sweep, "run a config at every point of a grid of "
                              "option values"),
                             ("train-router", _train_router,
                              "train the query_router baseline on router.train")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML run config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set steer.gamma=0.7")
        p.add_argument("--out", required=True, help="output directory (router: its checkpoint)")
        p.set_defaults(func=func)
        if name == "sweep":
            p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                           help="a config key and its values (YAML scalars), e.g. "
                           "steer.groups=1,2,5,10 or method=steer,specreason; repeat to cross "
                           "several; one run directory per point")
            p.add_argument("--gammas", default=None, metavar="G1,G2,...",
                           help="shorthand for --grid steer.gamma=G1,G2,... (the default "
                           "without --grid: 0.1,0.3,0.5,0.7,0.9)")
        if name in ("run", "sweep"):
            p.add_argument("--resume", action="store_true",
                           help="continue a killed run from the parts it finished and its "
                           "newest checkpoint (out/parts/: a round, or where a SIGTERM stopped "
                           "one)")
            p.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                           help="save the rounds in flight every K rounds, so a run killed "
                           "outright loses at most K rounds (a SIGTERM saves the round in "
                           "flight after its call in flight and exits with status 143)")

    td = sub.add_parser("train-demo", help="train the demo's small/large pairs (optax, CPU)")
    td.add_argument("--out", default="models", help="folder for the demo-<family>-<size>/ dirs")
    td.add_argument("--family", default="all", choices=["all", "qwen2", "gemma3"])
    td.add_argument("--steps", type=int, default=TRAIN_STEPS)
    td.add_argument("--batch", type=int, default=TRAIN_BATCH)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--sizes", default="small,large", help="which of each pair to (re)train")
    td.set_defaults(func=_train_demo)

    demo = sub.add_parser("demo", help="the demo's methods on its test split, then the report")
    demo.add_argument("--config", default="configs/demo.yaml")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_demo)

    conv = sub.add_parser("convert", help="HF checkpoint -> orbax, restorable into a mesh")
    conv.add_argument("hf_dir")
    conv.add_argument("out_dir")
    conv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    conv.set_defaults(func=_convert)

    _add_plan(sub)

    rep = sub.add_parser("report", help="tables and plots from run directories", add_help=False)
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    rep.set_defaults(func=_report)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint and input errors: the message says what to fix
        parser.exit(2, f"steer-jax: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
