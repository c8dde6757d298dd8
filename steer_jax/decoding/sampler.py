"""Batched generation on device: append (prefill) then a `lax.while_loop` decode, one program.

A model's state for a row is its KV cache plus the row's last token, which is *pending*: sampled or
given, but not yet fed. Every call starts by appending tokens (a prompt, the pending token, or a
step another model wrote, ending with the newest token), which yields the next-token logits; decode
then feeds one pending token per iteration. When a row stops, its last token stays pending, so the
next call, by this model or after another model's step, starts with a plain append. This one
invariant gives the teacher-forced read for free: appending tokens t_j..t_k scores t_{j+1}..t_{k+1}.

Per-token confidence measures (max logit, max probability, negative entropy) come from the float32
logits inside the step; only [B, N, 3] measures and [B, N] tokens leave the device. Sampling keys
are folded from (seed, trace id, absolute position), so a row's text does not depend on its
batch-mates, its row index or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.decoding import paging
from steer_jax.decoding.steps import VocabMasks
from steer_jax.modeling import execution
from steer_jax.modeling.config import ModelConfig
from steer_jax.modeling.transformer import KVCache, Params, forward, logits

MEASURES = ("max_logit", "max_prob", "neg_entropy")
Measure = Literal["max_logit", "max_prob", "neg_entropy"]

# Why a row stopped.
RUNNING, DELIMITER, EOS, MAX_TOKENS, FULL = 0, 1, 2, 3, 4
REASONS = ("running", "delimiter", "eos", "max_tokens", "cache_full")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Ancestral sampling at `temperature`, restricted to the top-p nucleus when top_p < 1."""

    temperature: float = 0.7
    top_p: float = 1.0


Sampler = Greedy | Sample


def make_sampler(temperature: float = 0.0, top_p: float = 1.0) -> Sampler:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return Greedy() if temperature == 0.0 else Sample(float(temperature), float(top_p))


def token_measures(logits: jax.Array) -> jax.Array:
    """[..., V] float32 logits -> [..., 3]: max logit, max probability, negative entropy."""
    # Two passes over the logits, the max then one fused sum of e = exp(logit - max) and of
    # e * logit: the log-sum-exp is max + log(sum e), the max probability 1 / sum e, and
    # sum p log p = sum(e * logit) / sum e - lse.
    top = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - top[..., None])
    total = jnp.sum(e, axis=-1)
    lse = top + jnp.log(total)
    return jnp.stack([top, 1.0 / total, jnp.sum(e * logits, axis=-1) / total - lse], axis=-1)


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximal index; a NaN counts as maximal) as a max
    and a min over the indices reaching it: XLA's CPU backend runs argmax's (value, index)
    reduction several times slower than these two, and the max is shared with the measures."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def row_keys(seed: jax.Array, trace_ids: jax.Array, positions: jax.Array,
             stream: jax.Array | int = 0) -> jax.Array:
    """Keys from (seed, trace id, absolute position, stream); two models use two streams."""
    base = jax.random.key(seed)
    fold = jax.random.fold_in
    return jax.vmap(lambda t, p: fold(fold(fold(base, t), p), stream))(trace_ids, positions)


def sample(sampler: Sampler, logits: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from [B, V] float32 logits."""
    if isinstance(sampler, Greedy):
        return argmax(logits)
    scaled = logits / sampler.temperature
    if sampler.top_p < 1.0:
        # Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < sampler.top_p, ordered, jnp.inf), axis=-1)
        scaled = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def last_valid(x: jax.Array, n: jax.Array) -> jax.Array:
    """x[b, n[b] - 1] for x [B, T, ...]."""
    return jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]


def append(params: Params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, n: jax.Array,
           *, scores: bool) -> tuple[KVCache, jax.Array, jax.Array | None]:
    """Append tokens[b, :n[b]] to each row (right-padded [B, P]).

    Returns the cache, the next-token logits after each row's last appended token [B, V], and
    (when `scores`) the measures of every appended position [B, P, 3], i.e. of tokens 1..P.
    """
    start = cache.length
    cache = paging.reserve(cache, start + n, n > 0)
    hidden, cache = forward(params, cfg, tokens, cache)
    cache = dataclasses.replace(cache, length=start + n)
    next_logits = logits(params, cfg, last_valid(hidden, n))
    measures = None
    if scores:  # in chunks of positions: [B, P, V] logits would not fit for long reads
        measures = jax.lax.map(lambda h: token_measures(logits(params, cfg, h)),
                               jnp.swapaxes(hidden, 0, 1), batch_size=16)
        measures = jnp.swapaxes(measures, 0, 1)
    return cache, next_logits, measures


def rollback(cache: KVCache, length: jax.Array, window: int | None = None) -> KVCache:
    """Cut rows back to `length` tokens; the pages past it go back to the pool.

    A cache whose sliding layers gave pages back (`paging.slide`) can only go back as far as
    their window still reaches: the query at the new length must see `window` tokens (the
    model's `sliding_window`; without it, all of them). A rollback further back raises rather
    than let attention read pages that other rows have written since.
    """
    if cache.split and not isinstance(length, jax.core.Tracer):
        new = jnp.minimum(cache.length, length)
        need = jnp.zeros_like(new) if window is None else jnp.maximum(new - window + 1, 0)
        lost = (new < cache.length) & (new > 0) & (need < paging.readable_from(cache))
        if bool(jnp.any(lost)):
            rows = np.flatnonzero(np.asarray(lost)).tolist()
            raise ValueError(f"rollback: rows {rows} would go back past the pages their sliding "
                             "layers gave back (keep them, or read the rows again from 0)")
    return paging.rollback(cache, length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: KVCache
    pending: jax.Array  # [B] newest token, not yet fed
    tokens: jax.Array  # [B, N] generated tokens
    measures: jax.Array  # [B, N, 3]
    n: jax.Array  # [B] tokens generated
    done: jax.Array  # [B]
    reason: jax.Array  # [B] why the row stopped (RUNNING while it runs)


@dataclasses.dataclass(frozen=True)
class Stops:
    """When rows stop, besides EOS and the token budget (static: part of the compiled program)."""

    eos_ids: tuple[int, ...] = ()
    step_mode: bool = False


def _record(state: DecodeState, token: jax.Array, measures: jax.Array, stops: Stops,
            masks: VocabMasks | None, limit: jax.Array, offset: jax.Array) -> DecodeState:
    """Write each running row's new token; decide which rows stop."""
    B, N = state.tokens.shape
    live = ~state.done
    rows = jnp.arange(B)
    idx = jnp.where(live, state.n, N)  # N is out of bounds: dropped
    tokens = state.tokens.at[rows, idx].set(token, mode="drop")
    meas = state.measures.at[rows, idx].set(measures, mode="drop")
    n = state.n + live
    position = state.cache.length  # where this token will sit once fed
    reason = jnp.full((B,), RUNNING, jnp.int32)
    reason = jnp.where(position >= state.cache.slots - 1, FULL, reason)
    reason = jnp.where(n >= limit, MAX_TOKENS, reason)
    if stops.step_mode and masks is not None:
        prev = state.pending
        reason = jnp.where(masks.step_ends(prev, token, state.n + offset > 0), DELIMITER, reason)
    if stops.eos_ids:
        reason = jnp.where(jnp.isin(token, jnp.asarray(stops.eos_ids)), EOS, reason)
    reason = jnp.where(live, reason, state.reason)
    return DecodeState(state.cache, jnp.where(live, token, state.pending), tokens, meas, n,
                       state.done | (reason != RUNNING), reason)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "max_tokens", "stops"),
                   donate_argnames=("cache",))
def decode(params: Params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, n: jax.Array,
           active: jax.Array, seed: jax.Array, trace_ids: jax.Array, masks: VocabMasks | None,
           limit: jax.Array | None = None, stream: jax.Array | int = 0,
           offset: jax.Array | None = None,
           *, sampler: Sampler, max_tokens: int, stops: Stops) -> DecodeState:
    """Append tokens[b, :n[b]], then generate up to `max_tokens` for the `active` rows.

    Inactive rows append nothing and generate nothing; `limit` [B] caps each row's new tokens
    below `max_tokens`. Each active row needs n >= 1 (at least its pending token). The returned
    cache holds every token but each row's last, which stays pending. `offset` [B]: tokens the
    row's step already has (a step continued from an earlier call), the last of them the
    pending token; a delimiter split over two tokens is then seen across the calls.
    """
    B = tokens.shape[0]
    offset = jnp.zeros((B,), jnp.int32) if offset is None else offset
    limit = jnp.full((B,), max_tokens, jnp.int32) if limit is None else jnp.minimum(
        limit, max_tokens)
    n = jnp.where(active, n, 0)
    # Pages for everything the call may write; those it does not use go back at the end.
    cache = paging.reserve(cache, cache.length + n + limit, active)
    cache = execution.loop_cache(cfg, cache)
    cache, next_logits, _ = append(params, cfg, cache, tokens, n, scores=False)
    # The pending token starts as the last one appended: a continued step's previous token.
    state = DecodeState(cache, last_valid(tokens[:, :, None], n)[:, 0],
                        jnp.zeros((B, max_tokens), jnp.int32),
                        jnp.zeros((B, max_tokens, len(MEASURES)), jnp.float32),
                        jnp.zeros((B,), jnp.int32), ~active, jnp.full((B,), RUNNING, jnp.int32))

    def pick(state: DecodeState, lg: jax.Array) -> DecodeState:
        token = sample(sampler, lg, row_keys(seed, trace_ids, state.cache.length, stream))
        return _record(state, token, token_measures(lg), stops, masks, limit, offset)

    def cond(state: DecodeState) -> jax.Array:
        return ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        old = state.cache.length
        hidden, cache = forward(params, cfg, state.pending[:, None], state.cache)
        cache = dataclasses.replace(cache, length=jnp.where(state.done, old, cache.length))
        return pick(dataclasses.replace(state, cache=cache), logits(params, cfg, hidden[:, 0]))

    state = jax.lax.while_loop(cond, body, pick(state, next_logits))
    return dataclasses.replace(state, cache=paging.trim(state.cache.stacked()))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def read(params: Params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
         n: jax.Array) -> tuple[KVCache, jax.Array]:
    """Teacher-forced read: append tokens[b, :n[b]]; measures [B, P, 3] of the tokens they predict.

    measures[b, j] scores the token after tokens[b, j] (tokens[b, j + 1] when it is appended too).
    """
    cache, _, measures = append(params, cfg, cache, tokens, n, scores=True)
    return paging.trim(cache), measures


def step_confidence(measures: jax.Array, tokens: jax.Array, n: jax.Array, *, measure: Measure,
                    is_math: jax.Array | None = None) -> jax.Array:
    """Mean of one measure over each row's first n tokens; over its math tokens when `is_math` is
    given and the row has any, else over all of them. Rows with n = 0 get NaN."""
    return mean_confidence(measures[..., MEASURES.index(measure)], tokens, n, is_math)


def mean_confidence(values: jax.Array, tokens: jax.Array, n: jax.Array,
                    is_math: jax.Array | None = None) -> jax.Array:
    """`step_confidence` over one measure's values [..., N]."""
    valid = jnp.arange(tokens.shape[-1]) < n[..., None]
    if is_math is not None:
        math = valid & is_math[tokens]
        valid = jnp.where(jnp.any(math, axis=-1, keepdims=True), math, valid)
    count = jnp.sum(valid, axis=-1)
    total = jnp.sum(jnp.where(valid, values, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
