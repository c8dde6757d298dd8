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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
