"""STEER: rounds in which every running trace gets one reasoning step from one model, or
(schedule `continuous`) a trace routed as soon as its step ends.

Round 0: the small model writes step 0 for every trace; the confidence mixture is fitted over them
and the unconfident ones are thrown away and rewritten by the large model. Round i >= 1: a trace's
step comes from the small model when the posterior of its previous step's confidence is at least
gamma, else from the large model. The baselines are the same rounds with another rule for who
writes (`small_only`, `large_only`, `query_router`: fixed per query) or who may veto a small step
(`specreason`: the large model's judge score; `rsd`: a process reward model's value).

One loop runs both schedules. A write call decodes at most `chunk` tokens of each of its rows'
steps; a step in flight (its author, index and per-token measures) lives in the trace state, so it
continues in the next call and is scored, when it ends, as if written at once. Rounds put a
barrier at each boundary: a model's calls repeat until every step of the round ended, so the
chunk changes no trace. Continuous rounds are one call per trace and model: a step ends at the
first boundary after it is done, its trace is recorded and routed there, under a mixture refitted
over the newest step confidence of every running trace (warm-started from the last fit), and a
trace mid-step carries on.

Both models keep a KV cache for every trace and a `seen` length (their cache length). A model that
writes first reads what the other model wrote since it last looked; the small model also reads
each large step as soon as it is written, which scores it on the small model's scale (option
`source="small"`). Each call gathers only the rows routed to the model into a bucket (eight sizes
per power of two), runs, and scatters them back; before a model writes, its rows that are behind
(the other model wrote their last steps) read what they missed in calls of their own, so the write
feeds each row one token; executed work tracks routed work, and each call attends over the prefix
of the cache its rows reach.
Per round, the host learns a few scalars (how many rows each model serves, the longest catch-up
read and the furthest position, to pick a compiled program); routing masks, confidences and
mixtures stay on device.

Between rounds the whole loop is one `RoundState` (trace state, every cache, the mixtures so far):
`on_round` hears it after each round and `resume_from` continues from one, which is all a caller
needs to checkpoint a run (store.py writes it with orbax); this module knows nothing of files.
Inside a round, the state also carries the round's progress (`RoundProgress`: its routing, the
rows each phase has served): `on_call` hears it after every call, so a run can stop between two
calls of a long round and continue from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from steer_jax import distributed, round_loop
from steer_jax.baselines.judge import JUDGE_PROMPT, digit_tokens, judge_suffix
from steer_jax.baselines.prm_text import TextPRM, same_vocabulary
from steer_jax.call_shapes import _Shapes
from steer_jax.calls import ENDED, PRM, RUNNING, SMALL, StepSpec, TraceState
from steer_jax.decoding.generate import check_prompts
from steer_jax.decoding.steps import vocab_masks
from steer_jax.modeling.kv_cache import local_layers
from steer_jax.modeling.transformer import Model
from steer_jax.options import CHUNK_TOKENS, METHODS, SteerOptions
from steer_jax.results import STOPS, RoundMixture, Step, SteerResult, Trace, collect
from steer_jax.calls import MODEL_NAMES
from steer_jax.round_loop import RoundLoop
from steer_jax.sides import side_and_cache
from steer_jax.round_state import PHASES, Fit, RoundProgress, RoundState

__all__ = ["CHUNK_TOKENS", "JUDGE_PROMPT", "METHODS", "MODEL_NAMES", "PHASES", "STOPS", "Fit",
           "RoundMixture", "RoundProgress", "RoundState", "Step", "SteerOptions", "SteerResult",
           "Trace", "digit_tokens", "judge_suffix", "prepare", "steer"]


def steer(small: Model, large: Model, tokenizer: Any, prompts: Sequence[Sequence[int]],
          options: SteerOptions | None = None, *, trace_ids: Sequence[int] | None = None,
          prm: Model | None = None, route_queries: Sequence[bool] | None = None,
          prm_tokenizer: Any = None, prm_questions: Sequence[str] | None = None,
          progress: Callable[[int, int], None] | None = None,
          on_round: Callable[[RoundState], None] | None = None,
          on_call: Callable[[RoundState], None] | None = None,
          resume_from: RoundState | None = None, batch_size: int | None = None,
          page_size: int = 64,
          pool_pages: int | Sequence[int | tuple[int | None, int | None] | None] | None = None,
          peers: distributed.Peers | None = None, **kwargs: Any) -> SteerResult:
    """Run STEER (or a baseline, `method`) over token-id prompts: every round spans them all.

    Options come as a `SteerOptions` or as its fields by keyword, e.g. `gamma=0.7`. Trace ids
    (default 0..n-1) seed each trace's sampling, so a trace does not depend on its batch.
    `rsd` needs `prm`, a reward model with a value head. With `prm_tokenizer` of another
    vocabulary than `tokenizer`'s, the PRM reads the question (`prm_questions`, one per prompt;
    default: the prompts decoded) and the steps as text in its own tokens (baselines.prm_text);
    otherwise it reads the trace's tokens. `query_router` needs `route_queries`, one decision
    per prompt (True: the large model answers it).

    Each round fits its mixture once over every running trace; under `schedule="continuous"` a
    round is one call of `chunk` tokens per model, and a trace is routed in the round its step
    ends. A model's work in a round runs
    in calls of at most `batch_size` rows (default: all), over a paged KV cache of `page_size`
    tokens a page. `pool_pages` (one count, or one per model: small, large, PRM; a model's
    count may be a pair: its global layers' pool, its sliding layers' pool) bounds each
    model's pools; a call that needs more pages than are free takes them back from traces
    outside it, which read their tokens again when next scheduled. Without it every trace gets
    room for its whole budget up front (nothing is ever evicted). With `peers`, several
    processes run one run, each over its slice of the traces, and fit every mixture together.

    `on_round(state)` is called after every round with the loop's whole `RoundState` (a
    checkpoint hook: its caches are only valid during the call, as the next round donates them);
    `on_call(state)` likewise inside each round, after every model call and between two phases
    (`state.within` says where; with several processes only the latter come at the same point
    in every process). `resume_from`, any such state of a run with the same inputs, continues
    from it to the result an uninterrupted run gives.
    """
    loop, state = prepare(small, large, tokenizer, prompts, options, trace_ids=trace_ids,
                          prm=prm, route_queries=route_queries, prm_tokenizer=prm_tokenizer,
                          prm_questions=prm_questions, on_call=on_call,
                          resume_from=resume_from, batch_size=batch_size, page_size=page_size,
                          pool_pages=pool_pages, peers=peers, **kwargs)
    state = loop.run(state, on_round=on_round, progress=progress)
    models = [side.model for side in loop.sides]
    return collect(state.trace, state.fits, tokenizer, loop.opts, models, np.asarray(loop.ids),
                   routing_s=state.routing_s, rounds=state.round)


def prepare(small: Model, large: Model, tokenizer: Any, prompts: Sequence[Sequence[int]],
            options: SteerOptions | None = None, *, trace_ids: Sequence[int] | None = None,
            prm: Model | None = None, route_queries: Sequence[bool] | None = None,
            prm_tokenizer: Any = None, prm_questions: Sequence[str] | None = None,
            on_call: Callable[[RoundState], None] | None = None,
            resume_from: RoundState | None = None, batch_size: int | None = None,
            page_size: int = 64,
            pool_pages: int | Sequence[int | tuple[int | None, int | None] | None] | None = None,
            peers: distributed.Peers | None = None,
            **kwargs: Any) -> tuple[RoundLoop, RoundState]:
    """`steer`'s inputs checked and turned into the round loop and its first state (or the state
    to resume), without running it: what `steer` runs, and what a test runs phase by phase."""
    opts = options or SteerOptions(**kwargs)
    if opts.method == "rsd" and (prm is None or "v_head" not in prm.params):
        raise ValueError("method 'rsd' needs a process reward model with a value head (prm=)")
    if opts.method == "query_router" and (route_queries is None
                                          or len(route_queries) != len(prompts)):
        raise ValueError("method 'query_router' needs route_queries, one bool per prompt")
    B = len(prompts)
    models = [small, large] + ([prm] if opts.method == "rsd" else [])
    suffix = digits = None
    if opts.method == "specreason":
        suffix = jnp.asarray(judge_suffix(tokenizer), jnp.int32)
        digits = jnp.asarray(digit_tokens(tokenizer), jnp.int32)
    slots, local_span, pools = _layout(models, prompts, opts, page_size, pool_pages,
                                       0 if suffix is None else len(suffix))
    text_prm = _text_prm(opts, prm, tokenizer, prm_tokenizer, prm_questions, prompts, page_size)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch.size must be a positive integer or null, got {batch_size!r}")
    # A resumed run takes its caches over instead of allocating fresh ones beside them.
    caches = [None] * len(models) if resume_from is None else list(resume_from.caches)
    if len(caches) != len(models):
        raise ValueError(f"resume_from holds {len(caches)} caches; method {opts.method!r} "
                         f"keeps {len(models)}")
    # A PRM reading text holds its own stream: its own slots; vocabulary tables it never uses.
    own = [text_prm is not None and i == PRM for i in range(len(models))]
    sides, caches = zip(*(side_and_cache(
        m, i, vocab_masks(tokenizer, models[SMALL if own[i] else i].config.vocab_size,
                          opts.delimiter), B, text_prm.slots if own[i] else slots, page_size,
        pools[i], c) for i, (m, c) in enumerate(zip(models, caches))))
    peers = peers or distributed.Peers((B,), 0)
    if peers.sizes[peers.index] != B:
        raise ValueError(f"peers give this process {peers.sizes[peers.index]} traces, not {B}")
    run_size = sum(peers.sizes)
    barrier = opts.schedule == "rounds"
    loop = RoundLoop(
        sides=tuple(sides), opts=opts, spec=StepSpec.of(opts), slots=slots,
        cap=B if batch_size is None else min(batch_size, B), local_span=local_span,
        shapes=_Shapes() if barrier else _Shapes(rows=4, widths=2, spans=2),
        chunk=min(opts.chunk or (opts.max_step_tokens if barrier else CHUNK_TOKENS),
                  opts.max_step_tokens),
        barrier=barrier,
        level=jnp.float32({"posterior": opts.gamma, "percentile": opts.percentile,
                           "threshold": opts.threshold}[opts.policy]),
        # Groups over the whole run (the paper's Table 3), whichever process holds a trace.
        group=jnp.asarray(np.arange(run_size) * opts.groups // run_size, jnp.int32),
        peers=peers,
        ids=jnp.asarray(np.arange(B) if trace_ids is None else np.asarray(trace_ids), jnp.int32),
        seed=jnp.asarray(opts.seed, jnp.int32), suffix=suffix, digits=digits,
        threshold=jnp.float32(opts.judge_threshold if opts.method == "specreason"
                              else opts.prm_threshold),
        fixed_large=None if route_queries is None else jnp.asarray(np.asarray(route_queries,
                                                                              bool)),
        text_prm=text_prm, on_call=on_call)
    fresh = _fresh_traces(prompts, slots, opts.max_steps)
    if resume_from is None:
        return loop, loop.start(RoundState(0, fresh, tuple(caches), None, ()))
    _check_resumable(resume_from, fresh)
    return loop, dataclasses.replace(resume_from, caches=tuple(caches),
                                     fits=tuple(resume_from.fits))


def _text_prm(opts: SteerOptions, prm: Model | None, tokenizer: Any, prm_tokenizer: Any,
              questions: Sequence[str] | None, prompts: Sequence[Sequence[int]],
              page_size: int) -> TextPRM | None:
    """RSD's reader of text, for a PRM whose tokenizer is not the policy models'; else None."""
    if opts.method != "rsd" or prm_tokenizer is None or same_vocabulary(tokenizer,
                                                                         prm_tokenizer):
        return None
    if questions is None:
        questions = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    if len(questions) != len(prompts):
        raise ValueError(f"prm_questions holds {len(questions)} questions for {len(prompts)} "
                         "prompts")
    if local_layers(prm.config):
        raise ValueError("a process reward model with a sliding-window layers' pool cannot read "
                         "text in its own tokens (that pool slides with the trace's positions)")
    return TextPRM.build(tokenizer, prm_tokenizer, questions, prm.config.max_position_embeddings,
                         opts.max_new_tokens, opts.max_steps, page_size)


def _layout(models: Sequence[Model], prompts: Sequence[Sequence[int]], opts: SteerOptions,
            page_size: int, pool_pages: Any, judge_len: int
            ) -> tuple[int, int, list[tuple[int | None, int | None]]]:
    """Cache positions per trace, the sliding layers' span past a catch-up target, and each
    model's (global, sliding) pool size, None for one that holds every trace's whole budget.
    Refused now, not hours in: prompts over the context, a pool that cannot hold one trace."""
    small, large = models[0].config, models[1].config
    context = min(small.max_position_embeddings, large.max_position_embeddings)
    check_prompts(prompts, min(small.vocab_size, large.vocab_size), context, opts.max_new_tokens)
    # Room for the prompt, every token the trace may write, and a judge prompt read after them.
    longest = max(len(p) for p in prompts) + judge_len
    if longest + opts.max_new_tokens > context:
        raise ValueError(f"a prompt, the judge prompt and max_new_tokens={opts.max_new_tokens} "
                         f"exceed the models' context of {context}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"cache.page_size must be a positive integer, got {page_size!r}")
    slots = -(-(longest + opts.max_new_tokens + 2) // page_size) * page_size  # whole pages
    pools = list(pool_pages) if isinstance(pool_pages, (list, tuple)) else [pool_pages] * 3
    # Each model's (global pool, sliding layers' pool): one count gives both that many pages.
    pools = [p if isinstance(p, (list, tuple)) else (p, p) for p in pools]
    # Longest stretch of positions past a row's catch-up target that its sliding layers hold
    # during a call besides their window (`_plan`): a catch-up chunk, or a step read or written
    # with the judge prompt after it.
    local_span = max(round_loop.CHUNK, opts.max_step_tokens + 2 + judge_len)
    # A pool that holds every trace's whole budget is the up-front layout, which never evicts.
    whole = slots // page_size
    pools = [tuple(None if p is None or p >= len(prompts) * whole else p for p in pair)
             for pair in pools]
    for i, (m, (p, p_local)) in enumerate(zip(models, pools)):
        window = m.config.sliding_window or slots
        one = min(whole, (window + local_span + opts.max_step_tokens) // page_size + 2)
        for what, have, need in (("", p, whole), (" sliding-window", p_local, one)):
            if have is not None and have < need:
                raise ValueError(
                    f"cache.pages: the {MODEL_NAMES[i]} model's{what} pool of {have} pages of "
                    f"{page_size} tokens cannot hold one trace (the longest prompt and "
                    f"steer.max_new_tokens need {need}); raise cache.pages or lower "
                    "steer.max_new_tokens")
    return slots, local_span, pools[:len(models)]


def _fresh_traces(prompts: Sequence[Sequence[int]], slots: int, max_steps: int) -> TraceState:
    """Every trace at its prompt, no step written yet."""
    B, M = len(prompts), max_steps
    tokens = np.zeros((B, slots), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    return TraceState(
        tokens=jnp.asarray(tokens), measure=jnp.zeros((B, slots), jnp.float32), total=lengths,
        prompt_len=lengths, running=jnp.ones(B, bool), stop=jnp.full(B, RUNNING, jnp.int32),
        step=jnp.zeros(B, jnp.int32), step_start=lengths, author=jnp.full(B, ENDED, jnp.int32),
        ended_by=jnp.zeros(B, jnp.int32), conf=jnp.zeros(B, jnp.float32),
        writer=jnp.zeros(B, jnp.int32), rec_model=jnp.full((B, M), -1, jnp.int32),
        rec_len=jnp.zeros((B, M), jnp.int32), rec_conf=jnp.zeros((B, M), jnp.float32),
        rec_post=jnp.zeros((B, M), jnp.float32), rec_score=jnp.full((B, M), jnp.nan, jnp.float32),
        rec_at=jnp.zeros((B, M), jnp.int32), generated=jnp.zeros((B, 2), jnp.int32),
        discarded=jnp.zeros(B, jnp.int32), read=jnp.zeros((B, 3), jnp.int32),
        executed=jnp.zeros(3, jnp.int32), iterations=jnp.zeros(3, jnp.int32))


def _check_resumable(saved: RoundState, fresh: TraceState) -> None:
    """A state to resume from must be of these prompts and options; say what differs."""
    for f in dataclasses.fields(TraceState):
        a, b = getattr(saved.trace, f.name), getattr(fresh, f.name)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"resume_from: trace state field {f.name} is {a.dtype}"
                             f"{list(a.shape)}, this run's is {b.dtype}{list(b.shape)}")
    if not np.array_equal(np.asarray(saved.trace.prompt_len), np.asarray(fresh.prompt_len)):
        raise ValueError("resume_from: its prompts have other lengths than this run's")
    if saved.round < 0:
        raise ValueError(f"resume_from: round {saved.round} is negative")
    if saved.within is not None:
        if not 0 <= saved.within.phase <= len(PHASES):
            raise ValueError(f"resume_from: inside round {saved.round}, phase "
                             f"{saved.within.phase}: no such round or phase")
        for f in dataclasses.fields(RoundProgress):
            a = getattr(saved.within, f.name)
            if hasattr(a, "shape") and a.shape != fresh.total.shape:
                raise ValueError(f"resume_from: its round progress {f.name} is "
                                 f"{list(a.shape)}, this run has {list(fresh.total.shape)}")
