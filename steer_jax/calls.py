"""The device programs of a STEER round: each model call on a bucket of rows, the page and
sub-batch planning between calls, the routing fits, and the round's bookkeeping.

Each is one jitted function over the trace state (`TraceState`) and a model's paged cache; the
round loop in steer.py decides which to run on which rows, and learns only the few scalars
`_plan` returns. A call gathers its rows' page tables (never KV data) into a bucket, runs, and
scatters them back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from steer_jax.decoding import paging
from steer_jax.decoding import sampler
from steer_jax.decoding.steps import VocabMasks
from steer_jax.modeling.transformer import KVCache, forward, logits
from steer_jax.routing import gmm, policy

SMALL, LARGE, PRM = 0, 1, 2  # the models' streams: sampling keys, bill columns, cache order
MODEL_NAMES = ("small", "large", "prm")
# Why a trace stopped (`TraceState.stop`), by index into STOPS.
STOPS = ("running", "eos", "max_steps", "max_new_tokens", "cache_full")
RUNNING, STOP_EOS, STOP_MAX_STEPS, STOP_MAX_NEW_TOKENS, STOP_CACHE_FULL = range(len(STOPS))
ENDED = -1  # `TraceState.author` of a trace whose step ended and waits for its boundary


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The options a model call is compiled for (routing options are not among them, so a gamma
    sweep reuses one set of compiled programs)."""

    max_step_tokens: int
    max_new_tokens: int
    confidence: str
    aggregate: str
    temperature: float
    top_p: float

    @classmethod
    def of(cls, opts: Any) -> StepSpec:
        """From a `steer.SteerOptions` (any object with these fields)."""
        return cls(opts.max_step_tokens, opts.max_new_tokens, opts.confidence, opts.aggregate,
                   opts.temperature, opts.top_p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TraceState:
    """Everything about the traces, on device; [B] per trace, [B, M] per step record."""

    tokens: jax.Array  # [B, S] prompt then kept steps
    measure: jax.Array  # [B, S] each token's confidence measure, as its writer saw it or (a step
    #   the other model read: `_read`) as its reader did
    total: jax.Array  # [B] tokens in the trace
    prompt_len: jax.Array  # [B]
    running: jax.Array  # [B]
    stop: jax.Array  # [B] 0 running, 1 eos, 2 max_steps, 3 max_new_tokens, 4 cache_full
    step: jax.Array  # [B] index of the step being written (the steps recorded so far)
    step_start: jax.Array  # [B] where the newest step begins
    author: jax.Array  # [B] who writes the step in flight; ENDED once it ended, until routed
    ended_by: jax.Array  # [B] why the newest step ended (sampler.DELIMITER, EOS, ...; 0 in flight)
    conf: jax.Array  # [B] confidence of the newest step that ended
    writer: jax.Array  # [B] who wrote the newest step that ended
    rec_model: jax.Array  # [B, M] -1 for no step
    rec_len: jax.Array  # [B, M]
    rec_conf: jax.Array  # [B, M]
    rec_post: jax.Array  # [B, M]
    rec_score: jax.Array  # [B, M] the verifier's score of a kept small step (NaN: none)
    rec_at: jax.Array  # [B, M] the round (boundary) at which the step ended
    generated: jax.Array  # [B, 2] kept tokens per model
    discarded: jax.Array  # [B]
    read: jax.Array  # [B, 3] appended tokens per model (small, large, prm)
    executed: jax.Array  # [3] rows x positions computed per model
    iterations: jax.Array  # [3] decode iterations (positions stepped) per model


# ---- one model's work on a bucket of rows -------------------------------------------------------

def _gather(cache: KVCache, rows: jax.Array, bucket: int, span: int):
    """The routed rows first, padded with unrouted ones to `bucket`; their page tables, cut to
    the first `span` slots (a slot's index is its position, so a prefix is a shorter cache).
    The pool itself is shared: a call moves page ids, never KV data."""
    idx = jnp.argsort(~rows, stable=True)[:bucket]
    active = jnp.arange(bucket) < jnp.sum(rows)
    width = span // cache.page_size
    sub = dataclasses.replace(cache, pages=cache.pages[idx, :width], length=cache.length[idx],
                              stamp=cache.stamp[idx])
    if cache.split:
        sub = dataclasses.replace(sub, pages_local=cache.pages_local[idx, :width])
    return idx, active, sub


def _scatter(cache: KVCache, idx: jax.Array, active: jax.Array, sub: KVCache) -> KVCache:
    # Padding rows are real, unrouted rows: they only wrote past their length, which is harmless.
    width = sub.pages.shape[1]
    local = {} if not sub.split else dict(
        pages_local=cache.pages_local.at[idx, :width].set(sub.pages_local))
    cache = dataclasses.replace(
        sub, pages=cache.pages.at[idx, :width].set(sub.pages),
        length=cache.length.at[idx].set(sub.length), stamp=cache.stamp, **local)
    return paging.trim(paging.touch(cache, jnp.zeros_like(cache.length, bool).at[idx].set(
        active)))


def _unseen(state: TraceState, idx: jax.Array, seen: jax.Array, width: int) -> jax.Array:
    """Trace tokens from each row's first unseen position on, [bucket, width]."""
    pos = jnp.minimum(seen[:, None] + jnp.arange(width)[None], state.tokens.shape[1] - 1)
    return jnp.take_along_axis(state.tokens[idx], pos, axis=1)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=(
    "cfg", "bucket", "span", "opts", "chunk", "stream", "stops"))
def _write(params, cfg, cache: KVCache, state: TraceState, rows: jax.Array, masks: VocabMasks,
           seed: jax.Array, trace_ids: jax.Array, *, bucket: int, span: int, opts: StepSpec,
           chunk: int, stream: int, stops: sampler.Stops):
    """The routed `rows`, each lagging only its pending token (`catch_up` saw to the rest),
    feed it and write up to `chunk` tokens of their step each; a step that ends gets its
    confidence, from the measures its tokens were written with (over whichever calls wrote
    them: a continued step is scored as one written at once), and its author turns ENDED."""
    idx, active, sub = _gather(cache, rows, bucket, span)
    seen, total, start = sub.length, state.total[idx], state.step_start[idx]
    n_append = jnp.where(active, 1, 0)
    budget = opts.max_new_tokens - (total - state.prompt_len[idx])
    cap = jnp.minimum(budget, opts.max_step_tokens - (total - start))  # the step's tokens left
    out = sampler.decode(params, cfg, sub, _unseen(state, idx, seen, 1), n_append, active, seed,
                     trace_ids[idx], masks, cap, stream, total - start,
                     sampler=sampler.make_sampler(opts.temperature, opts.top_p), max_tokens=chunk,
                     stops=stops)
    n_new = jnp.where(active, out.n, 0)
    ended = active & ((out.reason != sampler.MAX_TOKENS) | (out.n >= cap))
    S = state.tokens.shape[1]
    slot = total[:, None] + jnp.arange(chunk)[None]
    slot = jnp.where(jnp.arange(chunk)[None] < n_new[:, None], slot, S)  # out of bounds: dropped
    tokens = state.tokens.at[idx[:, None], slot].set(out.tokens, mode="drop")
    measure = state.measure.at[idx[:, None], slot].set(
        out.measures[..., sampler.MEASURES.index(opts.confidence)], mode="drop")
    L = opts.max_step_tokens
    at = jnp.minimum(start[:, None] + jnp.arange(L)[None], S - 1)
    conf = sampler.mean_confidence(jnp.take_along_axis(measure[idx], at, axis=1),
                               jnp.take_along_axis(tokens[idx], at, axis=1),
                               total + n_new - start,
                               is_math=masks.is_math if opts.aggregate == "math" else None)
    sel = lambda x, new: x.at[idx].set(jnp.where(ended, new, x[idx]))  # noqa: E731
    state = dataclasses.replace(
        state, tokens=tokens, measure=measure, total=state.total.at[idx].add(n_new),
        conf=sel(state.conf, conf), writer=sel(state.writer, jnp.full_like(total, stream)),
        author=sel(state.author, jnp.full_like(total, ENDED)),
        ended_by=sel(state.ended_by, out.reason),
        generated=state.generated.at[idx, stream].add(n_new),
        # A continued step's pending token is its own last one, billed as generated already.
        read=state.read.at[idx, stream].add(jnp.where(total == start, n_append, 0)),
        executed=state.executed.at[stream].add(bucket * jnp.max(n_new)),
        iterations=state.iterations.at[stream].add(jnp.max(n_new)))
    return _scatter(cache, idx, active, out.cache), state


@functools.partial(jax.jit, static_argnames=("cfg", "bucket", "span", "width", "stream"),
                   donate_argnames=("cache",))
def _advance(params, cfg, cache: KVCache, state: TraceState, rows: jax.Array, until: jax.Array,
             *, bucket: int, span: int, width: int, stream: int):
    """Catch-up in chunks: each routed row reads up to `width` unseen tokens, up to `until` [B].

    No logits: nothing is scored, the cache only moves forward.
    """
    idx, active, sub = _gather(cache, rows, bucket, span)
    seen = sub.length
    n = jnp.where(active, jnp.clip(until[idx] - seen, 0, width), 0)
    sub = paging.reserve(sub, seen + n, active)
    _, sub = forward(params, cfg, _unseen(state, idx, seen, width), sub)
    # Frees as it goes: a catch-up (a re-read from 0 included) ends no later than the position
    # this round's discard may roll back to, so nothing reads below its new length again.
    sub = paging.slide(dataclasses.replace(sub, length=seen + n), seen + n, cfg.sliding_window)
    state = dataclasses.replace(state, read=state.read.at[idx, stream].add(n),
                                executed=state.executed.at[stream].add(bucket * width))
    return _scatter(cache, idx, active, sub), state


@functools.partial(jax.jit, static_argnames=("cfg", "bucket", "span", "width", "opts", "stream"),
                   donate_argnames=("cache",))
def _read(params, cfg, cache: KVCache, state: TraceState, rows: jax.Array, masks: VocabMasks, *,
          bucket: int, span: int, width: int, opts: StepSpec, stream: int):
    """The routed rows read what the other model wrote of their newest step, each token's
    measure kept in `measure` (on this model's scale, in place of the writer's); a step that
    ended is scored from all of them, so a step read as it is written (continuous) scores as
    one read at its end."""
    idx, active, sub = _gather(cache, rows, bucket, span)
    seen, total, start = sub.length, state.total[idx], state.step_start[idx]
    # Leave the newest token pending: appending t_seen..t_{total-2} scores t_{seen+1}..t_{total-1}.
    n_append = jnp.where(active, total - 1 - seen, 0)
    sub, measures = sampler.read(params, cfg, sub, _unseen(state, idx, seen, width), n_append)
    S = state.tokens.shape[1]
    slot = seen[:, None] + 1 + jnp.arange(width)[None]
    slot = jnp.where((jnp.arange(width)[None] < n_append[:, None]) & (slot >= start[:, None]),
                     slot, S)  # before the step or past the read: dropped
    measure = state.measure.at[idx[:, None], slot].set(
        measures[..., sampler.MEASURES.index(opts.confidence)], mode="drop")
    L = opts.max_step_tokens
    at = jnp.minimum(start[:, None] + jnp.arange(L)[None], S - 1)
    conf = sampler.mean_confidence(jnp.take_along_axis(measure[idx], at, axis=1),
                                   jnp.take_along_axis(state.tokens[idx], at, axis=1),
                                   total - start,
                                   is_math=masks.is_math if opts.aggregate == "math" else None)
    ended = active & (state.author[idx] == ENDED)
    state = dataclasses.replace(
        state, measure=measure,
        conf=state.conf.at[idx].set(jnp.where(ended, conf, state.conf[idx])),
        read=state.read.at[idx, stream].add(n_append),
        executed=state.executed.at[stream].add(bucket * width))
    return _scatter(cache, idx, active, sub), state


@functools.partial(jax.jit, static_argnames=("cfg", "bucket", "span", "width", "stream"),
                   donate_argnames=("cache",))
def _verify(params, cfg, cache: KVCache, state: TraceState, rows: jax.Array,
            suffix: jax.Array, digits: jax.Array, threshold: jax.Array, *, bucket: int, span: int,
            width: int, stream: int):
    """A verifier reads the routed rows through their newest step and accepts it or not.

    With `digits` (SpecReason) the large model also reads a judge prompt (`suffix`) and the score
    is its most likely next digit; without (RSD) the process reward model's value head reads
    the step's last token. Returns (cache, state, rejected [B], score [B]). The judge's cache
    drops the prompt again and keeps the newest token pending; the PRM keeps all it read.
    """
    idx, active, sub = _gather(cache, rows, bucket, span)
    seen, total = sub.length, state.total[idx]
    lag = total - seen
    j = jnp.arange(width)[None]
    tokens = _unseen(state, idx, seen, width)
    if digits is not None:
        tokens = jnp.where(j < lag[:, None], tokens,
                           suffix[jnp.clip(j - lag[:, None], 0, suffix.shape[0] - 1)])
        lag = lag + suffix.shape[0]
    n_append = jnp.where(active, lag, 0)
    sub = paging.reserve(sub, seen + n_append, active)
    hidden, sub = forward(params, cfg, tokens, sub)
    last = sampler.last_valid(hidden, n_append)
    if digits is not None:
        score = jnp.argmax(logits(params, cfg, last)[:, digits], axis=-1).astype(jnp.float32)
        keep = total - 1
    else:
        head = params["v_head"]
        score = jax.nn.sigmoid(jnp.einsum("bd,d->b", last.astype(jnp.float32),
                                          head["w"].astype(jnp.float32),
                                          precision=jax.lax.Precision.HIGHEST) + head["b"])
        keep = total
    sub = dataclasses.replace(sub, length=jnp.where(active, keep, seen))
    rejected = jnp.zeros_like(rows).at[idx].set(active & (score < threshold))
    full_score = jnp.full(rows.shape, jnp.nan).at[idx].set(jnp.where(active, score, jnp.nan))
    state = dataclasses.replace(state, read=state.read.at[idx, stream].add(n_append),
                                executed=state.executed.at[stream].add(bucket * width))
    return _scatter(cache, idx, active, sub), state, rejected, full_score


# ---- sub-batches and pages, on device ------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cap", "window", "span"))
def _plan(cache: KVCache, reach: jax.Array, until: jax.Array, rows: jax.Array, *, cap: int,
          window: int | None = None, span: int = 0):
    """The next call's rows, the first of `rows` in row order, at most `cap`, each holding the
    pages for `reach` [B] slots during the call. Returns them and [count, longest lag to
    `until`, furthest reach, pages short of free (global pool), rows asked for, pages short of
    free (local pool)].

    Rows are taken while their new pages fit the free ones (nothing is evicted, the round is
    only cut into more calls) as long as that gives a call an eighth of the full one or more;
    else while all their pages fit the pool, the traces outside the call giving theirs back.
    The sliding layers' pool counts at most the pages a row's window and `span` positions
    past `until` (the catch-up chunk or the step) touch: catch-up reads give pages back as
    they go.
    """
    size = cache.page_size
    first = rows & (jnp.cumsum(rows) - 1 < cap)
    fit_pool, fit_free, new = first, first, []
    for local, (table, mask) in zip((False, True), paging._pools(cache)):
        have = paging.held(cache, local)
        add = jnp.sum(paging.new_pages(getattr(cache, table), cache.length, reach, rows, size),
                      axis=1)
        if local:
            bound = (window - 1 + span + jnp.maximum(reach - until, 0)) // size + 2
            add = jnp.minimum(add, jnp.maximum(bound - have, 0))
        pool = getattr(cache, mask)
        fit_pool &= jnp.cumsum(jnp.where(rows, have + add, 0)) <= pool.shape[0] - 1
        fit_free &= jnp.cumsum(jnp.where(rows, add, 0)) <= jnp.sum(pool)
        new.append((add, pool))
    take = jnp.where(8 * jnp.sum(fit_free) >= jnp.sum(fit_pool), fit_free, fit_pool)
    lag = until - cache.length
    # The furthest slot of the call; with no row taken, of the rows asked for (for the error).
    end = jnp.max(jnp.where(jnp.where(jnp.any(take), take, rows), reach, 0))
    short = [jnp.sum(jnp.where(take, add, 0)) - jnp.sum(pool) for add, pool in new]
    return take, jnp.stack([jnp.sum(take), jnp.max(jnp.where(take, lag, 0)), end, short[0],
                            jnp.sum(rows), short[-1] if cache.split else jnp.int32(0)])


@functools.partial(jax.jit, donate_argnames=("cache",))
def _evict(cache: KVCache, keep: jax.Array, short: jax.Array) -> KVCache:
    return paging.evict(cache, keep, short)[0]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _drop(cache: KVCache, rows: jax.Array) -> KVCache:
    return paging.drop_rows(cache, rows)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _rollback(cache: KVCache, length: jax.Array) -> KVCache:
    return paging.rollback(cache, length)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=("window",))
def _slide(cache: KVCache, floor: jax.Array, *, window: int | None) -> KVCache:
    return paging.slide(cache, floor, window)


# ---- routing, on device -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("groups",))
def _mixture(conf: jax.Array, among: jax.Array, group: jax.Array,
             init: gmm.GMMParams | None = None, *, groups: int):
    """Fit one mixture per group over `among` (`init`: the fit it refits, a start); each
    trace's posterior under its group's fit."""
    member = (group[None, :] == jnp.arange(groups)[:, None]) & among[None, :]  # [K, B]
    scores = jnp.broadcast_to(conf, member.shape)
    params = gmm.fit(scores, member, init=init)
    post = gmm.posterior_confident(params, scores)
    return params, jnp.take_along_axis(post, group[None, :], axis=0)[0]


@functools.partial(jax.jit, static_argnames=("rule", "groups"))
def _route(conf: jax.Array, among: jax.Array, group: jax.Array, params: gmm.GMMParams,
           level: jax.Array, *, rule: str, groups: int) -> jax.Array:
    """Which of `among` the policy sends to the large model (each group on its own); `level` is
    gamma, the percentile or the threshold, by `rule`."""
    member = (group[None, :] == jnp.arange(groups)[:, None]) & among[None, :]
    scores = jnp.broadcast_to(conf, member.shape)
    if rule == "posterior":
        route = policy.route_by_posterior(params, scores, level, member)
    elif rule == "percentile":
        route = policy.route_by_percentile(scores, level, member)
    else:
        route = policy.route_by_threshold(scores, level, member)
    return jnp.any(route, axis=0)


@jax.jit
def _discard(state: TraceState, rejected: jax.Array) -> TraceState:
    """Throw away the newest (small) step of the rejected rows; they keep their pending token,
    and the large model writes that step again."""
    n = jnp.where(rejected, state.total - state.step_start, 0)
    return dataclasses.replace(
        state, total=state.total - n, generated=state.generated.at[:, SMALL].add(-n),
        discarded=state.discarded + n, author=jnp.where(rejected, LARGE, state.author),
        ended_by=jnp.where(rejected, 0, state.ended_by))


def stop_after_step(state: TraceState, max_steps: int, max_new_tokens: int,
                    slots: int) -> jax.Array:
    """[B] why each trace stops once its newest step is kept (RUNNING: it goes on)."""
    stop = jnp.where(state.ended_by == sampler.EOS, STOP_EOS, RUNNING)
    stop = jnp.where((stop == RUNNING) & (state.step + 1 >= max_steps), STOP_MAX_STEPS, stop)
    stop = jnp.where((stop == RUNNING) & (state.total - state.prompt_len >= max_new_tokens),
                     STOP_MAX_NEW_TOKENS, stop)
    return jnp.where((stop == RUNNING) & ((state.ended_by == sampler.FULL)
                                          | (state.total >= slots - 2)), STOP_CACHE_FULL, stop)


@functools.partial(jax.jit, static_argnames=("max_steps", "max_new_tokens", "slots"))
def _end_steps(state: TraceState, ended: jax.Array, post: jax.Array, score: jax.Array,
               at: jax.Array, *, max_steps: int, max_new_tokens: int, slots: int) -> TraceState:
    """Record the `ended` rows' steps (each at its own step index, in round `at`); end traces
    at EOS, max_steps, max_new_tokens or a full cache."""
    n = state.total - state.step_start
    col = jnp.where(ended, state.step, max_steps)  # out of bounds: dropped
    rows = jnp.arange(n.shape[0])
    rec = lambda arr, v: arr.at[rows, col].set(v, mode="drop")  # noqa: E731
    stop = jnp.where(ended, stop_after_step(state, max_steps, max_new_tokens, slots), state.stop)
    return dataclasses.replace(
        state, rec_model=rec(state.rec_model, state.writer), rec_len=rec(state.rec_len, n),
        rec_conf=rec(state.rec_conf, state.conf), rec_post=rec(state.rec_post, post),
        rec_score=rec(state.rec_score, score), rec_at=rec(state.rec_at, jnp.full_like(n, at)),
        stop=stop, running=state.running & (stop == RUNNING), step=state.step + ended)


@jax.jit
def _assign(state: TraceState, rows: jax.Array, to_large: jax.Array) -> TraceState:
    """`rows` begin a new step, written by the large model where `to_large`, else the small."""
    return dataclasses.replace(
        state, author=jnp.where(rows, jnp.where(to_large, LARGE, SMALL), state.author),
        step_start=jnp.where(rows, state.total, state.step_start),
        ended_by=jnp.where(rows, 0, state.ended_by))
