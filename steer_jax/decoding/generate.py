"""`steer_jax.generate`: the decode engine behind a list-of-token-lists API."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from steer_jax import distributed
from steer_jax.decoding import sampler
from steer_jax.decoding.steps import vocab_masks
from steer_jax.modeling.transformer import KVCache, Model


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: list[list[int]]  # new tokens per prompt, ending after EOS when one was produced
    max_logits: list[list[float]]  # one per new token
    max_probs: list[list[float]]
    neg_entropies: list[list[float]]
    stop_reasons: list[str]  # delimiter | eos | max_tokens | cache_full
    step_confidence: list[float] | None  # step mode only


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int,
                  max_new_tokens: int) -> None:
    """Reject bad prompts before any compute, naming the culprit."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                             f"{max_new_tokens} it exceeds the model's context of {context}")


def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             trace_ids: Sequence[int] | None = None, stop_at_step: bool = False, *,
             tokenizer: Any = None, delimiter: str = "\n\n", confidence: sampler.Measure =
             "max_logit", aggregate: str = "all", page_size: int | None = None,
             stream: int = 0) -> GenerateResult:
    """Generate for a ragged batch of token-id prompts in one compiled program.

    In step mode (`stop_at_step`) each row stops at the step delimiter, EOS or `max_new_tokens`,
    and `step_confidence` is the mean `confidence` measure over the step's tokens (`aggregate`
    "math": over its math tokens, falling back to all). Step mode needs the tokenizer (loaded
    from the model's directory when not given). The KV cache holds each row in pages of
    `page_size` tokens (default: one page a row). `stream` folds into the sampling keys as a
    STEER run's model index does (1: the large model's), so a generate can draw its tokens.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    if aggregate not in ("all", "math"):
        raise ValueError(f"aggregate must be 'all' or 'math', got {aggregate!r}")
    if confidence not in sampler.MEASURES:
        raise ValueError(f"confidence must be one of {sampler.MEASURES}, got {confidence!r}")
    strategy = sampler.make_sampler(temperature, top_p)
    B = len(prompts)
    ids = np.arange(B) if trace_ids is None else np.asarray(trace_ids)
    if ids.shape != (B,):
        raise ValueError(f"trace_ids must have one id per prompt ({B}), got shape {ids.shape}")
    masks = None
    if stop_at_step or aggregate == "math":
        if tokenizer is None:
            from steer_jax.modeling.loading import load_tokenizer
            tokenizer = load_tokenizer(model.path)
        masks = vocab_masks(tokenizer, cfg.vocab_size, delimiter)

    # Padded shapes are rounded so that nearby request sizes share a compiled program.
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = _round_up(int(lengths.max()), 16)
    tokens = np.zeros((B, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    slots = _round_up(width + max_new_tokens + 1, page_size or 64)
    cache = distributed.place_cache(KVCache.init(cfg, B, slots, model.dtype,
                                                 page_size=page_size), model.params)
    state = sampler.decode(
        model.params, cfg, cache, jnp.asarray(tokens), jnp.asarray(lengths),
        jnp.ones((B,), bool), jnp.asarray(seed, jnp.int32), jnp.asarray(ids, jnp.int32), masks,
        stream=stream, sampler=strategy, max_tokens=max_new_tokens,
        stops=sampler.Stops(cfg.eos_token_ids, stop_at_step))
    step_conf = None
    if stop_at_step:
        step_conf = sampler.step_confidence(
            state.measures, state.tokens, state.n, measure=confidence,
            is_math=masks.is_math if aggregate == "math" else None)
        step_conf = np.asarray(step_conf).tolist()
    out_tokens, measures, n, reason = (np.asarray(x) for x in (
        state.tokens, state.measures, state.n, state.reason))
    rows = range(B)
    return GenerateResult(
        tokens=[out_tokens[i, : n[i]].tolist() for i in rows],
        max_logits=[measures[i, : n[i], 0].tolist() for i in rows],
        max_probs=[measures[i, : n[i], 1].tolist() for i in rows],
        neg_entropies=[measures[i, : n[i], 2].tolist() for i in rows],
        stop_reasons=[sampler.REASONS[r] for r in reason],
        step_confidence=step_conf,
    )
