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
import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax import distributed
from steer_jax.calls import (ENDED, LARGE, PRM, SMALL, StepSpec, TraceState,
                             _advance, _assign, _discard, _drop, _end_steps, _evict, _mixture,
                             _plan, _read, _rollback, _route, _slide, _verify, _write,
                             maps_nearly_full, release_programs)
from steer_jax.decoding import sampler
from steer_jax.decoding.generate import check_prompts
from steer_jax.decoding.steps import vocab_masks
from steer_jax.modeling.transformer import KVCache, Model
from steer_jax.routing import gmm
MODEL_NAMES = ("small", "large", "prm")
CHUNK = 64  # catch-up reads go in chunks of this many tokens (see `catch_up`)
CHUNK_TOKENS = 32  # steer.chunk's default under the continuous schedule
METHODS = ("steer", "small_only", "large_only", "specreason", "rsd", "query_router")
# SpecReason's judge instruction (our wording of its criteria), asked after each small step.
JUDGE_PROMPT = ("Evaluate the last reasoning step above only for factual correctness and logical "
                "validity given the steps before it; ignore style and usefulness. Score it from 0 "
                "(wrong) to 9 (certainly correct). Reply with the single digit only.")


@dataclasses.dataclass(frozen=True)
class SteerOptions:
    """The `steer.*` and `sampling.*` config keys (see the README's config reference)."""

    method: Literal["steer", "small_only", "large_only", "specreason", "rsd",
                    "query_router"] = "steer"
    schedule: Literal["rounds", "continuous"] = "rounds"
    chunk: int | None = None  # tokens a write call decodes (None: a whole step in rounds, else 32)
    gamma: float = 0.5
    max_steps: int = 64
    max_step_tokens: int = 256
    max_new_tokens: int = 4096
    delimiter: str = "\n\n"
    confidence: sampler.Measure = "max_logit"
    aggregate: Literal["all", "math"] = "all"
    source: Literal["small", "generator"] = "small"
    groups: int = 1
    refine: Literal["first", "none", "all"] = "first"
    policy: Literal["posterior", "percentile", "threshold"] = "posterior"
    percentile: float = 0.3
    threshold: float | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    judge_threshold: int = 7  # specreason: accept a small step scored at least this (0-9)
    prm_threshold: float = 0.7  # rsd: accept a small step whose PRM value is at least this

    def __post_init__(self) -> None:
        def choice(name: str, allowed: Sequence[Any]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"steer.{name} must be one of {list(allowed)}, "
                                 f"got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("schedule", ("rounds", "continuous"))
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"steer.chunk must be a positive integer or null, got {self.chunk!r}")
        choice("confidence", sampler.MEASURES)
        choice("aggregate", ("all", "math"))
        choice("source", ("small", "generator"))
        choice("refine", ("first", "none", "all"))
        choice("policy", ("posterior", "percentile", "threshold"))
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"steer.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.percentile <= 1.0:
            raise ValueError(f"steer.percentile must be in [0, 1], got {self.percentile}")
        if not 0 <= self.judge_threshold <= 9:
            raise ValueError(f"specreason.threshold must be in 0..9, got {self.judge_threshold}")
        if not 0.0 <= self.prm_threshold <= 1.0:
            raise ValueError(f"rsd.threshold must be in [0, 1], got {self.prm_threshold}")
        if self.policy == "threshold" and self.threshold is None:
            raise ValueError("steer.policy 'threshold' needs steer.threshold")
        for name in ("max_steps", "max_step_tokens", "max_new_tokens", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"steer.{name} must be >= 1, got {getattr(self, name)}")
        if not self.delimiter:
            raise ValueError("steer.delimiter must be a non-empty string")
        sampler.make_sampler(self.temperature, self.top_p)  # validates both


@dataclasses.dataclass(frozen=True)
class Step:
    text: str
    model: str  # small | large
    tokens: int
    confidence: float
    posterior: float
    round: int  # the round it ended in (rounds: its index; continuous: its chunk boundary)
    score: float | None = None  # specreason's judge digit or rsd's PRM value for a small step


@dataclasses.dataclass(frozen=True)
class Trace:
    id: int
    output: str
    tokens: list[int]  # generated tokens (the kept steps)
    steps: list[Step]
    stop: str  # eos | max_steps | max_new_tokens | cache_full
    # Per-trace bill, in tokens; FLOPs are these times 2N of the model that processed them.
    generated: dict[str, int]  # kept tokens written by each model
    discarded: int  # small-model draft tokens thrown away
    read: dict[str, int]  # tokens each model appended without writing them (prompt, catch-up,
    # judge prompts; "prm": the reward model's reads)


@dataclasses.dataclass(frozen=True)
class RoundMixture:
    round: int
    group: int
    model: str  # whose steps the mixture was fitted on ("all" with source=small)
    weights: list[float]
    means: list[float]
    variances: list[float]
    confidences: list[float]
    n: int = 0  # how many confidences it was fitted on


@dataclasses.dataclass(frozen=True)
class SteerResult:
    traces: list[Trace]
    mixtures: list[RoundMixture]
    executed_tokens: dict[str, int]  # rows actually computed x positions, padding included
    params: dict[str, int]
    iterations: dict[str, int] = dataclasses.field(default_factory=dict)  # decode positions
    # stepped by each model's write calls, one after another (their sum bounds the wall-clock
    # where a step costs the same for any number of rows)


STOPS = ("running", "eos", "max_steps", "max_new_tokens", "cache_full")


@dataclasses.dataclass(frozen=True)
class Fit:
    """One mixture fitted in a round, kept for the result's `mixtures` (rounds.jsonl)."""

    round: int
    who: str  # whose steps: "all", "small-draft", "small" or "large"
    params: gmm.GMMParams
    conf: jax.Array  # [B] the confidences it saw
    among: jax.Array  # [B] which of them took part


# A round's work in order; every call of a round belongs to one of them. The round ends with its
# mixture fit, which makes no call.
PHASES = ("small writes", "check", "large writes", "small reads")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundProgress:
    """How far a round in flight has come: what its calls have since made impossible to
    recompute (a verifier's scores are gone once its cache rolls back), and which rows of its
    phase in flight are done. [B] arrays. Who writes which step is in the trace state."""

    running: jax.Array  # the traces the round began with
    rejected: jax.Array  # the check phase's rejections so far
    score: jax.Array  # the verifier's scores so far (NaN: none)
    done: jax.Array  # rows of phase `phase` whose calls have run
    phase: int = dataclasses.field(metadata=dict(static=True))  # index into PHASES
    calls: int = dataclasses.field(metadata=dict(static=True))  # the round's calls so far
    # True between two phases: a point every process reaches, with the same phase (each makes
    # its own number of calls, so only there can processes stop together).
    shared: bool = dataclasses.field(default=False, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class RoundState:
    """Everything the round loop carries from one round to the next, so a run can stop after any
    round, or any call inside one, and continue from it with the same result (the sampling keys
    are stateless)."""

    round: int  # rounds done: the next one to run, or the one in flight with `within`
    trace: TraceState
    caches: tuple[KVCache, ...]  # small, large (and the PRM's for rsd)
    # The mixture the newest steps were judged under, which routes the next round: one, or one
    # per writer (SMALL, LARGE) with source="generator"; None before round 0.
    routing: gmm.GMMParams | tuple[gmm.GMMParams, ...] | None
    fits: tuple[Fit, ...]
    within: RoundProgress | None = None  # set when stopped inside round `round`


def _pow2(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def _ladder(n: int, floor: int = 1, sizes: int = 8) -> int:
    """n rounded up to one of `sizes` (a power of two) sizes per power of two (padding under
    1/sizes), in steps of at least `floor`."""
    step = max(floor, 1 << max(0, int(n - 1).bit_length() - sizes.bit_length()))
    return -(-int(n) // step) * step


def _width(lag: int, sizes: int = 8) -> int:
    """Positions a call reads per row: exactly 1 for the common case (only the pending token:
    the model wrote the step before), else `_ladder` in steps of 8 (powers of two would nearly
    double a judge read). Padding positions are not free: each is a query against every cache
    slot."""
    return 1 if lag <= 1 else _ladder(lag, 8, sizes)


def _bucket(n: int, cap: int, sizes: int = 8) -> int:
    """Rows a call compiles for: powers of two up to 16, then `_ladder`.

    Padding is then under an eighth of the call's rows (powers of two alone nearly double a
    call just past one); the ladder is relative, not multiples of cap/8, because the large
    model's calls, a third of the batch, are where padding costs most. A finer ladder costs
    compiled programs, but a call's cache span moves every round anyway.
    """
    return _pow2(n, cap) if n <= 16 else min(cap, _ladder(n, 1, sizes))


def _span(end: int, slots: int, page_size: int, sizes: int | None = None) -> int:
    """Cache slots a call attends over: its furthest slot rounded up to whole 64-slot steps
    (whole pages), with `sizes`, to one of that many step counts per power of two."""
    step = -(-64 // page_size) * page_size
    units = -(-(end + 2) // step)
    return min(slots, (units if sizes is None else _ladder(units, 1, sizes)) * step)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """How finely a schedule's calls pick their compiled shapes. Rounds make one call per
    model and phase; continuous rounds are a chunk long, so the rows, spans and read widths
    change every few dozen positions, and every new combination is a compile (on a TPU,
    seconds to a minute; on a CPU, mapped code, of which a process may hold only so much:
    `calls.maps_nearly_full`). Continuous calls take fewer sizes and pay more padding."""

    rows: int = 8
    widths: int = 8
    spans: int | None = None


# ---- the round loop -----------------------------------------------------------------------------

class _Side:
    """One model inside a run: its weights, its cache over all traces, its vocabulary tables."""

    def __init__(self, model: Model, stream: int, tokenizer: Any, opts: SteerOptions, batch: int,
                 slots: int, page_size: int, pool: tuple[int | None, int | None],
                 cache: KVCache | None = None):
        self.model, self.stream = model, stream
        self.cfg = model.config
        init = functools.partial(KVCache.init, self.cfg, batch, slots, model.dtype,
                                 page_size=page_size, pool=pool[0], pool_local=pool[1])
        fresh = jax.eval_shape(init)
        if cache is None:
            # On a mesh the cache follows the weights: KV heads over 'model', rows over 'data'.
            cache = distributed.place_cache(init(), model.params)
        else:
            if cache.split != fresh.split:
                raise ValueError(f"resume_from: the {MODEL_NAMES[stream]} model's cache has "
                                 f"{1 + cache.split} pools, this run needs {1 + fresh.split}")
            for f in ("k", "pages") + (("k_local", "pages_local") if fresh.split else ()):
                a, b = getattr(cache, f), getattr(fresh, f)
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise ValueError(f"resume_from: the {MODEL_NAMES[stream]} model's cache.{f} "
                                     f"is {a.dtype}{list(a.shape)}, this run needs "
                                     f"{b.dtype}{list(b.shape)}")
        self.cache = cache
        self.masks = vocab_masks(tokenizer, self.cfg.vocab_size, opts.delimiter)
        self.stops = sampler.Stops(self.cfg.eos_token_ids, step_mode=True)

    def window(self, span: int) -> dict[str, Any]:
        """`_plan`'s static arguments for this model's sliding layers' pool."""
        return dict(window=self.cfg.sliding_window, span=span) if self.cache.split else {}


def judge_suffix(tokenizer: Any) -> list[int]:
    """Tokens that close the assistant turn, ask JUDGE_PROMPT, and open the judge's answer."""
    mark = "\ue000"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark},
         {"role": "user", "content": JUDGE_PROMPT}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]


def digit_tokens(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("specreason needs single-token digits 0-9 in the vocabulary")
    return ids


def steer(small: Model, large: Model, tokenizer: Any, prompts: Sequence[Sequence[int]],
          options: SteerOptions | None = None, *, trace_ids: Sequence[int] | None = None,
          prm: Model | None = None, route_queries: Sequence[bool] | None = None,
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
    `rsd` needs `prm`, a reward model with a value head; `query_router` needs `route_queries`,
    one decision per prompt (True: the large model answers it).

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
    opts = options or SteerOptions(**kwargs)
    if opts.method == "rsd" and (prm is None or "v_head" not in prm.params):
        raise ValueError("method 'rsd' needs a process reward model with a value head (prm=)")
    if opts.method == "query_router" and (route_queries is None
                                          or len(route_queries) != len(prompts)):
        raise ValueError("method 'query_router' needs route_queries, one bool per prompt")
    B = len(prompts)
    context = min(small.config.max_position_embeddings, large.config.max_position_embeddings)
    check_prompts(prompts, min(small.config.vocab_size, large.config.vocab_size), context,
                  opts.max_new_tokens)
    suffix = digits = None
    if opts.method == "specreason":
        suffix = jnp.asarray(judge_suffix(tokenizer), jnp.int32)
        digits = jnp.asarray(digit_tokens(tokenizer), jnp.int32)
    # Room for the prompt, every token the trace may write, and a judge prompt read after them.
    longest = max(len(p) for p in prompts) + (0 if suffix is None else len(suffix))
    if longest + opts.max_new_tokens > context:
        raise ValueError(f"a prompt, the judge prompt and max_new_tokens={opts.max_new_tokens} "
                         f"exceed the models' context of {context}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"cache.page_size must be a positive integer, got {page_size!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch.size must be a positive integer or null, got {batch_size!r}")
    cap = B if batch_size is None else min(batch_size, B)
    slots = -(-(longest + opts.max_new_tokens + 2) // page_size) * page_size  # whole pages
    models = [small, large] + ([prm] if opts.method == "rsd" else [])
    pools = list(pool_pages) if isinstance(pool_pages, (list, tuple)) else [pool_pages] * 3
    # Each model's (global pool, sliding layers' pool): one count gives both that many pages.
    pools = [p if isinstance(p, (list, tuple)) else (p, p) for p in pools]
    # Longest stretch of positions past a row's catch-up target that its sliding layers hold
    # during a call besides their window (`_plan`): a catch-up chunk, or a step read or written
    # with the judge prompt after it.
    local_span = max(CHUNK, opts.max_step_tokens + 2 + (0 if suffix is None else len(suffix)))
    # A pool that holds every trace's whole budget is the up-front layout, which never evicts.
    whole = slots // page_size
    pools = [tuple(None if p is None or p >= B * whole else p for p in pair) for pair in pools]
    # Fail now, not hours in: the pool must hold one trace at its longest.
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
    # A resumed run takes its caches over instead of allocating fresh ones beside them.
    caches = [None] * len(models) if resume_from is None else list(resume_from.caches)
    if len(caches) != len(models):
        raise ValueError(f"resume_from holds {len(caches)} caches; method {opts.method!r} "
                         f"keeps {len(models)}")
    sides = [_Side(m, i, tokenizer, opts, B, slots, page_size, pools[i], c)
             for i, (m, c) in enumerate(zip(models, caches))]
    threshold = jnp.float32(opts.judge_threshold if opts.method == "specreason"
                            else opts.prm_threshold)
    fixed_large = jnp.asarray(np.asarray(route_queries, bool)) if route_queries is not None \
        else None
    ids = jnp.asarray(np.arange(B) if trace_ids is None else np.asarray(trace_ids), jnp.int32)
    seed = jnp.asarray(opts.seed, jnp.int32)
    peers = peers or distributed.Peers((B,), 0)
    if peers.sizes[peers.index] != B:
        raise ValueError(f"peers give this process {peers.sizes[peers.index]} traces, not {B}")
    run_size = sum(peers.sizes)
    # Groups over the whole run (the paper's Table 3), whichever process holds a trace.
    group = jnp.asarray(np.arange(run_size) * opts.groups // run_size, jnp.int32)
    M = opts.max_steps
    spec = StepSpec.of(opts)
    # Rounds: every phase runs until each of its steps ended, so every running trace ends one
    # step a round. Continuous: a phase is one call of `chunk` tokens per trace.
    barrier = opts.schedule == "rounds"
    chunk = min(opts.chunk or (opts.max_step_tokens if barrier else CHUNK_TOKENS),
                opts.max_step_tokens)
    shapes = _Shapes() if barrier else _Shapes(rows=4, widths=2, spans=2)
    level = jnp.float32({"posterior": opts.gamma, "percentile": opts.percentile,
                         "threshold": opts.threshold}[opts.policy])
    def route(conf: jax.Array, among: jax.Array, group: jax.Array, params: Any) -> jax.Array:
        """The policy over every process's traces (a percentile ranks them all); ours back."""
        return peers.local(_route(peers.gather(conf), peers.gather(among), group, params, level,
                                  rule=opts.policy, groups=opts.groups))
    tokens = np.zeros((B, slots), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    state = TraceState(
        tokens=jnp.asarray(tokens), measure=jnp.zeros((B, slots), jnp.float32), total=lengths,
        prompt_len=lengths, running=jnp.ones(B, bool), stop=jnp.zeros(B, jnp.int32),
        step=jnp.zeros(B, jnp.int32), step_start=lengths, author=jnp.full(B, ENDED, jnp.int32),
        ended_by=jnp.zeros(B, jnp.int32), conf=jnp.zeros(B, jnp.float32),
        writer=jnp.zeros(B, jnp.int32), rec_model=jnp.full((B, M), -1, jnp.int32),
        rec_len=jnp.zeros((B, M), jnp.int32), rec_conf=jnp.zeros((B, M), jnp.float32),
        rec_post=jnp.zeros((B, M), jnp.float32), rec_score=jnp.full((B, M), jnp.nan, jnp.float32),
        rec_at=jnp.zeros((B, M), jnp.int32), generated=jnp.zeros((B, 2), jnp.int32),
        discarded=jnp.zeros(B, jnp.int32), read=jnp.zeros((B, 3), jnp.int32),
        executed=jnp.zeros(3, jnp.int32), iterations=jnp.zeros(3, jnp.int32))
    mixtures: list[Fit] = []
    prev_params: Any = None
    first = 0
    flight: RoundProgress | None = None  # the round in flight's progress, between its phases
    if resume_from is not None:
        _check_resumable(resume_from, state)
        first, state, prev_params = resume_from.round, resume_from.trace, resume_from.routing
        mixtures, flight = list(resume_from.fits), resume_from.within
    none = jnp.zeros(B, bool)

    def calls(side: _Side, rows: jax.Array, extra: int = 0, ahead: int = 0, normal: int = 1,
              behind: Callable[[], jax.Array] | None = None):
        """The sub-batches of a model's work on `rows`: (rows, count, width, span) per call.

        A call takes the first rows, in row order, that `batch_size` and the pool allow when
        each reads `extra` tokens past its trace and then writes up to `ahead` more; the rows
        outside it give pages back first when the pool is short (`paging.evict`). A row lagging
        more than `normal` tokens (the other model wrote its last steps, or it was evicted)
        first reads up to `behind()` [B] on its own (`catch_up`).

        The only device -> host traffic of a call: how many rows, the longest read, the
        furthest slot, the pages short. Slots: attention runs over every slot it is given, so
        a call whose rows are all short gets a prefix of the page table, in steps of 64 slots.
        """
        left = rows
        reach = jnp.minimum(state.total + max(extra, 0) + ahead, slots)  # within the table
        while True:
            take, stats = _plan(side.cache, reach, state.total + extra, left, cap=cap,
                                **side.window(local_span))
            count, widest, end, short, wanted, short_local = (int(x) for x in np.asarray(stats))
            if count == 0:
                if wanted:
                    raise ValueError(
                        f"the {MODEL_NAMES[side.stream]} model's page pool "
                        f"({side.cache.free.shape[0] - 1} pages of {side.cache.page_size}) cannot "
                        f"hold one trace's next call (up to {end} tokens): raise cache.pages or "
                        "lower steer.max_new_tokens")
                return
            if short > 0 or short_local > 0:
                side.cache = _evict(side.cache, take, jnp.asarray([short, short_local]))
            if widest > normal and behind is not None:
                catch_up(side, take, behind())
                take, stats = _plan(side.cache, reach, state.total + extra, take, cap=cap,
                                    **side.window(local_span))
                widest = int(np.asarray(stats)[1])
            yield take, count, _width(widest, shapes.widths), _span(
                end, slots, side.cache.page_size, shapes.spans)
            left = left & ~take

    def catch_up(side: _Side, rows: jax.Array, until: jax.Array) -> None:
        """Rows behind read up to `until` first, CHUNK tokens a call, on their own.

        Typically a handful of a write's rows lag (the other model wrote their last steps; a
        trace the large model first serves in round 5 has ~150 tokens to read) while the rest
        only feed their pending token: one call as wide as the furthest-behind row would pad
        every row to its lag. In chunks, each call holds only the rows still behind. The
        caller has made room in the pool for all of it.
        """
        nonlocal state
        while True:
            take, stats = _plan(side.cache, state.total, until, rows & (until > side.cache.length),
                                cap=cap, **side.window(local_span))
            count, widest, end = (int(x) for x in np.asarray(stats)[:3])
            if count == 0:
                return
            # Widths 16, 32 or CHUNK: these calls are small, and every width is a program.
            side.cache, state = _advance(side.model.params, side.cfg, side.cache, state, take,
                                         until, bucket=_bucket(count, cap, shapes.rows),
                                         span=_span(end, slots, side.cache.page_size,
                                                    shapes.spans),
                                         width=_pow2(max(widest, 16), CHUNK), stream=side.stream)

    def snapshot(rnd: int) -> RoundState:
        return RoundState(rnd, state, tuple(side.cache for side in sides), prev_params,
                          tuple(mixtures), flight)

    def phase_calls(side: _Side, rows: jax.Array, rnd: int, **kw: Any):
        """`calls` over the rows of the phase in flight that no call has served yet; after each
        call (the caller's loop body), its rows count as done and `on_call` hears the state."""
        nonlocal flight
        for call in calls(side, rows & ~flight.done, **kw):
            yield call
            flight = dataclasses.replace(flight, done=flight.done | call[0],
                                         calls=flight.calls + 1, shared=False)
            if on_call:
                on_call(snapshot(rnd))

    def write(side: _Side, rnd: int) -> None:
        """The model's steps in flight, `chunk` tokens a call; under a barrier (rounds), again
        until each of them ended."""
        nonlocal state, flight
        while True:
            for take, count, _, span in phase_calls(
                    side, flight.running & (state.author == side.stream), rnd, ahead=chunk,
                    behind=lambda: state.total - 1):
                side.cache, state = _write(
                    side.model.params, side.cfg, side.cache, state, take, side.masks, seed, ids,
                    bucket=_bucket(count, cap, shapes.rows), span=span, opts=spec, chunk=chunk,
                    stream=side.stream, stops=side.stops)
            if not (barrier and bool(jnp.any(flight.running & (state.author == side.stream)))):
                return
            flight = dataclasses.replace(flight, done=none)

    def read(side: _Side, rows: jax.Array, rnd: int) -> None:
        nonlocal state
        # The newest token stays pending; a row reads from the token before the step on.
        for take, count, width, span in phase_calls(side, rows, rnd, extra=-1,
                                                    normal=opts.max_step_tokens,
                                                    behind=lambda: state.step_start - 1):
            side.cache, state = _read(side.model.params, side.cfg, side.cache, state, take,
                                      side.masks, bucket=_bucket(count, cap, shapes.rows),
                                      span=span, width=width, opts=spec, stream=side.stream)

    def verify(side: _Side, rows: jax.Array, rnd: int) -> None:
        nonlocal state, flight
        extra = 0 if suffix is None else len(suffix)
        for take, count, width, span in phase_calls(side, rows, rnd, extra=extra,
                                                    normal=opts.max_step_tokens + 1 + extra,
                                                    behind=lambda: state.step_start - 1):
            side.cache, state, r, sc = _verify(
                side.model.params, side.cfg, side.cache, state, take, suffix, digits, threshold,
                bucket=_bucket(count, cap, shapes.rows), span=span, width=width, stream=side.stream)
            flight = dataclasses.replace(flight, rejected=flight.rejected | r,
                                         score=jnp.where(take, sc, flight.score))

    def discard(rejected: jax.Array) -> None:
        """Throw the rejected small steps away; each cache that read them rolls back."""
        nonlocal state
        state = _discard(state, rejected)
        # Small and judge keep the token before the step pending; the PRM keeps it read.
        for side in sides:
            keep = state.total if side.stream == PRM else state.total - 1
            # No further back than the round's start: the sliding layers still see it.
            side.cache = _rollback(side.cache, jnp.where(rejected, keep, slots))

    def fit(among: jax.Array, rnd: int, who: str, init: Any = None):
        conf, among = peers.gather(state.conf), peers.gather(among)
        params, post = _mixture(conf, among, group, None if barrier else init,
                                groups=opts.groups)
        mixtures.append(Fit(rnd, who, params, conf, among))
        return params, peers.local(post)

    def to_large() -> jax.Array:
        """Which running traces' next step the large model writes: by the method's rule, or
        (steer) by the policy on their newest step's confidence, under the mixture that step
        was judged by. Ranked among every running trace with a step (a percentile sees all)."""
        running = state.running
        if opts.method == "large_only":
            return running
        if opts.method == "query_router":
            return running & fixed_large
        if opts.method != "steer" or prev_params is None:
            return none
        scored = running & (state.step > 0)
        if opts.source == "small":
            return route(state.conf, scored, group, prev_params)
        out = none  # each newest step judged under its writer's mixture
        for who in (SMALL, LARGE):
            out |= route(state.conf, scored & (state.writer == who), group, prev_params[who])
        return out

    def check(rnd: int) -> None:
        """Small steps the mixture (refine) or a verifier rejects go to the large model."""
        nonlocal flight
        refine = opts.method == "steer" and opts.refine != "none"
        if not (refine or opts.method in ("specreason", "rsd")):
            return
        drafts = flight.running & (state.author == ENDED) & (state.writer == SMALL)
        if refine and opts.refine == "first":
            drafts &= state.step == 0
        if not peers.any(bool(jnp.any(drafts))):
            return
        if refine:
            # Continuous: the drafts that ended at one boundary are few, and the short ones
            # first; they are judged among the newest step of every running trace.
            pool = drafts if barrier else drafts | (flight.running & (state.step > 0))
            params, _ = fit(pool, rnd, "small-draft", prev_params if opts.source == "small"
                            else None)
            flight = dataclasses.replace(flight, rejected=route(state.conf, pool, group, params)
                                         & drafts)
        else:
            verify(sides[LARGE] if opts.method == "specreason" else sides[PRM], drafts, rnd)
            flight = dataclasses.replace(flight, score=jnp.where(flight.rejected, jnp.nan,
                                                                 flight.score))
        discard(flight.rejected)

    def small_reads(rnd: int) -> None:
        if opts.source == "small" and opts.method == "steer":  # large steps on the small scale
            read(sides[SMALL], flight.running & (state.author == ENDED)
                 & (state.writer == LARGE), rnd)

    def finish(rnd: int) -> None:
        """The round's end: one mixture over the newest step of every running trace; the steps
        that ended are recorded under it, and their traces routed to their next step."""
        nonlocal state, prev_params
        ended = flight.running & (state.author == ENDED)
        pool = flight.running & (ended | (state.step > 0))
        if opts.source == "generator":
            per_writer, post = [], jnp.zeros(B)
            for who in (SMALL, LARGE):
                among = pool & (state.writer == who)
                params, p = fit(among, rnd, MODEL_NAMES[who],
                                None if prev_params is None else prev_params[who])
                per_writer.append(params)
                post = jnp.where(among, p, post)
            prev_params = tuple(per_writer)
        else:
            prev_params, post = fit(pool, rnd, "all", prev_params)
        state = _end_steps(state, ended, post, flight.score, jnp.int32(rnd), max_steps=M,
                           max_new_tokens=opts.max_new_tokens, slots=slots)
        state = _assign(state, ended & state.running, to_large())
        for side in sides:  # a trace that ended gives its pages back
            side.cache = _drop(side.cache, ended & ~state.running)
            if side.cache.split:  # later rounds go back no further than their newest token
                side.cache = _slide(side.cache, state.total - 1, window=side.cfg.sliding_window)

    # PHASES, in order. Each runs its calls over the rows of `flight` it has not served yet; a
    # round resumed inside a phase skips the phases before it.
    phases = (lambda rnd: write(sides[SMALL], rnd), check,
              lambda rnd: write(sides[LARGE], rnd), small_reads)
    if resume_from is None:
        state = _assign(state, state.running, to_large())
    rnd = first
    while True:
        if flight is None:  # a round resumed in flight runs to its end whatever else holds
            if not peers.any(bool(jnp.any(state.running))):
                break
            flight = RoundProgress(state.running, none, jnp.full(B, jnp.nan), none, 0, 0)
        for i, phase in enumerate(phases):
            if i < flight.phase:
                continue
            phase(rnd)
            flight = dataclasses.replace(flight, phase=i + 1, done=none, shared=True)
            if on_call:
                on_call(snapshot(rnd))
        finish(rnd)
        flight = None
        rnd += 1
        if jax.default_backend() == "cpu" and maps_nearly_full():
            release_programs()
        if on_round:
            on_round(RoundState(rnd, state, tuple(side.cache for side in sides), prev_params,
                                tuple(mixtures)))
        if progress:
            progress(rnd, int(jnp.sum(state.running)))
    return _collect(state, mixtures, tokenizer, opts, sides, np.asarray(ids))


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


def _collect(state: TraceState, mixtures: list[Fit], tokenizer: Any, opts: SteerOptions,
             sides: list[_Side], ids: np.ndarray) -> SteerResult:
    s = jax.tree.map(np.asarray, state)
    traces = []
    for b in range(s.total.shape[0]):
        start, steps = int(s.prompt_len[b]), []
        for m in range(opts.max_steps):
            if s.rec_model[b, m] < 0:
                break
            n = int(s.rec_len[b, m])
            steps.append(Step(text=tokenizer.decode(s.tokens[b, start:start + n].tolist()),
                              model=MODEL_NAMES[s.rec_model[b, m]], tokens=n,
                              confidence=float(s.rec_conf[b, m]),
                              posterior=float(s.rec_post[b, m]), round=int(s.rec_at[b, m]),
                              score=None if np.isnan(s.rec_score[b, m])
                              else float(s.rec_score[b, m])))
            start += n
        gen = s.tokens[b, s.prompt_len[b]:s.total[b]].tolist()
        traces.append(Trace(
            id=int(ids[b]), output=tokenizer.decode(gen, skip_special_tokens=True), tokens=gen,
            steps=steps, stop=STOPS[s.stop[b]],
            generated={MODEL_NAMES[i]: int(s.generated[b, i]) for i in (0, 1)},
            discarded=int(s.discarded[b]),
            read={MODEL_NAMES[i]: int(s.read[b, i]) for i in range(len(sides))}))
    mix = []
    for m in mixtures:
        p = jax.tree.map(np.asarray, m.params)
        conf, among = np.asarray(m.conf), np.asarray(m.among)
        for g in range(opts.groups):
            members = among & (np.arange(len(conf)) * opts.groups // len(conf) == g)
            mix.append(RoundMixture(m.round, g, m.who, p.weights[g].tolist(),
                                    p.means[g].tolist(), p.variances[g].tolist(),
                                    conf[members].tolist(), int(members.sum())))
    names = [MODEL_NAMES[i] for i in range(len(sides))]
    return SteerResult(traces, mix, {n: int(s.executed[i]) for i, n in enumerate(names)},
                       {n: sides[i].model.num_params for i, n in enumerate(names)},
                       {n: int(s.iterations[i]) for i, n in enumerate(names)})
