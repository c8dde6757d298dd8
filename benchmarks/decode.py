"""Decode throughput: steer-jax `generate` against HF transformers `generate`, same weights.

A random Qwen2-shaped model of about 40M parameters is built by transformers and saved; both
engines load that checkpoint, are warmed up, and generate 64 greedy tokens for a batch of 16
prompts in this one process, on JAX's default device (torch runs on CUDA when JAX runs on a GPU,
else on the CPU). Also printed: the fraction of this machine's roofline that our decode steps
reach, with the bandwidth and matmul rate measured here and now.

    python benchmarks/decode.py [--batch 16] [--new 64] [--repeats 3] [--untied] [--dtype bfloat16]
                                [--shape Qwen2.5-1.5B-Instruct] [--scan-layers auto|yes|no]
                                [--page-size 64] [--profile]

`--untied` gives the model its own lm_head (as Qwen2.5-7B has) instead of the tied embedding;
`--dtype bfloat16` runs both engines in bfloat16 (the roofline then counts 2 bytes a weight);
`--shape` takes a known checkpoint's shapes (random weights) instead of the 40M model;
`--page-size` is the KV cache's page size (rows' pages interleaved, as a run's rows take them);
the same generation with one page a row, the contiguous layout of the dense cache this engine had
before paging, is timed beside it;
`--profile` then traces one generation and lists a decode step's ops by the line that emitted them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as tf
from op_profile import dump_flags, profile

from steer_jax import generate, load_model
from steer_jax.modeling import qwen2


def on_gpu() -> bool:  # not at import: --profile sets XLA_FLAGS before the backend starts
    return jax.default_backend() == "gpu"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bandwidth() -> float:
    """Bytes per second XLA reads from memory (a sum over 256 MiB, 2 GiB on a GPU: well past its
    cache): what a decode step's weight reads are bound by."""
    x = jnp.ones(((512 if on_gpu() else 64) * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / best_of(lambda: total(x).block_until_ready(), 5)


def matmul_rate(dtype: str) -> float:
    """FLOP/s of a large matmul (random operands: zeros run faster on some chips)."""
    m, n = (8192, 8192) if on_gpu() else (256, 2048)
    a = jax.random.normal(jax.random.key(0), (m, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    # float32 as the models compute it (see execution.precision), not a GPU's TF32.
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    mm(a, b).block_until_ready()
    return 2 * m * n * n / best_of(lambda: mm(a, b).block_until_ready(), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--untied", action="store_true", help="a separate lm_head, not tied")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--shape", choices=sorted(qwen2._KNOWN), default=None,
                    help="a known checkpoint's shapes, random weights (default: the 40M model)")
    ap.add_argument("--scan-layers", choices=("auto", "yes", "no"), default="auto",
                    help="layers stacked under lax.scan or unrolled (auto: scanned on TPUs only)")
    ap.add_argument("--cpu-kernels", choices=("auto", "no", "both"), default="auto",
                    help="steer-jax's CPU matmul kernel (auto: float32 on one CPU device), or "
                         "XLA's dot throughout; both: auto, and XLA's dot timed beside it")
    ap.add_argument("--page-size", type=int, default=64,
                    help="KV cache page size in tokens (the engine's default: 64)")
    ap.add_argument("--profile", action="store_true",
                    help="then show where a decode step's time goes, op by op (CPU backend)")
    args = ap.parse_args()
    if args.profile:  # XLA must write the decode program's HLO, so compile it afresh
        dump = tempfile.TemporaryDirectory()
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), dump_flags(dump.name, "jit_decode")])
        jax.config.update("jax_enable_compilation_cache", False)

    if args.shape:
        shape = dict(qwen2._KNOWN[args.shape])
        args.untied = args.untied or not shape["tie_word_embeddings"]
        shape["tie_word_embeddings"] = not args.untied
    else:
        shape = dict(vocab_size=32768, hidden_size=512, intermediate_size=1536,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     tie_word_embeddings=not args.untied, max_position_embeddings=4096)
    # No EOS: every row generates exactly --new tokens in both engines.
    config = tf.Qwen2Config(**{**shape, "eos_token_id": None, "bos_token_id": None})
    device = torch.device("cuda" if on_gpu() else "cpu")
    torch.manual_seed(0)
    with device:  # a billion-parameter init is minutes on the CPU, seconds on a GPU
        hf = tf.Qwen2ForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(Path(d), dtype=args.dtype,
                          scan_layers={"auto": None, "yes": True, "no": False}[args.scan_layers],
                          cpu_kernels=False if args.cpu_kernels == "no" else None)
        # The same checkpoint with XLA's dot throughout, for the kernels' own ratio.
        plain = load_model(Path(d), dtype=args.dtype,
                           scan_layers={"auto": None, "yes": True, "no": False}[args.scan_layers],
                           cpu_kernels=False) if args.cpu_kernels == "both" else None
    n_params = ours.num_params
    prompts = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.prompt))

    def run_ours(new: int = args.new, page_size: int | None = args.page_size, model=ours):
        return generate(model, prompts.tolist(), new, page_size=page_size)

    def run_hf():
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        return out.cpu()  # waits for the GPU: the time counts the whole generation

    got, ref = run_ours(), run_hf()  # warm-up (and compile)
    if args.profile:  # now, while this is the one decode program compiled
        ops = profile(run_ours, dump.name, "jit_decode")
    same = sum(t == r for t, r in zip(got.tokens, ref[:, args.prompt:].tolist()))
    one_page = lambda: run_ours(page_size=None)  # noqa: E731
    one_page()
    t_ours = best_of(run_ours, args.repeats)
    t_hf = best_of(run_hf, args.repeats)
    t_rows = best_of(one_page, args.repeats)
    tokens = args.batch * args.new
    print(f"model: {args.shape or 'Qwen2'}-shaped, {'untied' if args.untied else 'tied'}, "
          f"{n_params / 1e6:.1f}M params, {args.dtype}, scan layers {args.scan_layers}, "
          f"CPU kernel {'yes' if ours.config.execution.cpu_kernels else 'no'}; "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy; torch threads "
          f"{torch.get_num_threads()}, torch device {device}, jax devices {jax.devices()}")
    print(f"greedy rows identical to transformers: {same}/{args.batch}")
    print(f"steer-jax:    {t_ours:.3f} s  {tokens / t_ours:8.1f} tok/s")
    print(f"transformers: {t_hf:.3f} s  {tokens / t_hf:8.1f} tok/s")
    print(f"ratio (steer-jax / transformers throughput): {t_hf / t_ours:.2f}x")
    print(f"pages of {args.page_size} tokens against one page a row (the dense layout): "
          f"{t_rows / t_ours:.2f}x throughput ({t_rows:.3f} s one page a row)")
    if plain is not None:
        run_plain = lambda: run_ours(model=plain)  # noqa: E731
        same_plain = run_plain().tokens == got.tokens
        t_ours2, t_plain = best_of(run_ours, args.repeats), best_of(run_plain, args.repeats)
        print(f"CPU kernel {'on' if ours.config.execution.cpu_kernels else 'off'} against "
              f"XLA's dot throughout: {t_plain / t_ours2:.2f}x throughput ({t_ours2:.3f} s "
              f"against {t_plain:.3f} s, best of {args.repeats} each; same tokens: "
              f"{same_plain})")

    # Roofline of one decode step: all weights read once; 2 N FLOPs per row.
    bw, rate = memory_bandwidth(), matmul_rate(args.dtype)
    # An untied embedding is only gathered (a row per token), not read whole.
    read = n_params - (config.vocab_size * config.hidden_size if args.untied else 0)
    step_bytes = (4 if args.dtype == "float32" else 2) * read
    step_flops = 2 * read * args.batch
    bound = max(step_bytes / bw, step_flops / rate)
    # A decode step alone: the prefill (and the first token) timed apart and taken out.
    run_ours(1)  # compiles the one-token program
    t_first = best_of(lambda: run_ours(1), args.repeats)
    per_step = (t_ours - t_first) / max(args.new - 1, 1)
    print(f"machine: {bw / 1e9:.1f} GB/s read bandwidth, "
          f"{rate / 1e9:.1f} GFLOP/s {args.dtype} matmul")
    print(f"prefill + first token: {t_first * 1e3:.2f} ms; "
          f"decode step: {per_step * 1e3:.2f} ms; roofline bound {bound * 1e3:.2f} ms "
          f"({'memory' if step_bytes / bw > step_flops / rate else 'compute'}-bound); "
          f"achieved {bound / per_step:.0%} of roofline")
    if args.profile:
        print("\n".join(ops))


if __name__ == "__main__":
    main()
