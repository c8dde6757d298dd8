"""The round loop: STEER's rounds (or continuous chunk boundaries) as explicit state.

`RoundState` is everything the loop carries: the trace state, every model's cache, the mixture
the newest steps were judged under, the fits so far, and a round in flight's progress. Each of
`RoundLoop`'s methods takes one and returns the next, so a phase (`write`, `read`, `verify`,
`check`, `finish`) can be run and tested alone, and `on_call` / `on_round` hear the state after
every call and round (a checkpoint hook). The device programs a method calls are calls.py's;
the host learns a few scalars per call, to pick a compiled shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax import distributed
from steer_jax.call_shapes import _bucket, _pow2, _Shapes, _span, _width
from steer_jax.calls import (ENDED, LARGE, MODEL_NAMES, PRM, SMALL, StepSpec,
                             _advance, _assign, _discard, _drop, _end_steps, _evict, _mixture,
                             _plan, _read, _rollback, _route, _slide, _verify, _write)
from steer_jax.latency import timed
from steer_jax.modeling import execution
from steer_jax.modeling.transformer import KVCache
from steer_jax.mixture_pool import few_survivors, fit_pool
from steer_jax.options import SteerOptions
from steer_jax.programs import maps_nearly_full, release_programs
from steer_jax.round_state import Fit, RoundProgress, RoundState
from steer_jax.sides import Side, with_cache
from steer_jax.routing import gmm

CHUNK = 64  # catch-up reads go in chunks of this many tokens (see `RoundLoop.catch_up`)


@dataclasses.dataclass(frozen=True)
class RoundLoop:
    """A run's constants; its methods move a `RoundState` through the rounds.

    Rounds (`barrier`): every phase runs until each of its steps ended, so every running trace
    ends one step a round. Continuous: a phase is one call of `chunk` tokens per trace, and a
    trace is recorded and routed at the first boundary after its step ended.
    """

    sides: tuple[Side, ...]
    opts: SteerOptions
    spec: StepSpec
    slots: int  # cache positions per trace
    cap: int  # rows a call may hold (batch.size)
    local_span: int  # positions past a catch-up target a call's sliding layers hold
    shapes: _Shapes
    chunk: int
    barrier: bool
    level: jax.Array  # the policy's gamma, percentile or threshold
    group: jax.Array  # [run size] each trace's mixture group, over every process's traces
    peers: distributed.Peers
    ids: jax.Array  # [B] trace ids: each trace's sampling seed
    seed: jax.Array
    suffix: jax.Array | None = None  # specreason: the judge prompt
    digits: jax.Array | None = None  # specreason: the digit tokens 0-9
    threshold: jax.Array | None = None  # specreason's or rsd's acceptance threshold
    fixed_large: jax.Array | None = None  # query_router: [B] the large model answers
    text_prm: Any = None  # rsd, a PRM of another tokenizer: baselines.prm_text.TextPRM reads text
    on_call: Callable[[RoundState], None] | None = None

    @property
    def none(self) -> jax.Array:
        return jnp.zeros(self.ids.shape[0], bool)

    # ---- calls -----------------------------------------------------------------------------

    def serve(self, s: RoundState, side: Side, rows: jax.Array,
              op: Callable[..., RoundState], *, extra: int = 0, ahead: int = 0,
              normal: int = 1, behind: Callable[[RoundState], jax.Array] | None = None
              ) -> RoundState:
        """A phase's calls of one model over `rows` not yet served: `op(s, take, count, width,
        span)` per call, after which its rows count as done and `on_call` hears the state.

        A call takes the first rows, in row order, that `batch_size` and the pool allow when
        each reads `extra` tokens past its trace and then writes up to `ahead` more; the rows
        outside it give pages back first when the pool is short (`paging.evict`). A row lagging
        more than `normal` tokens (the other model wrote its last steps, or it was evicted)
        first reads up to `behind(s)` [B] on its own (`catch_up`).

        The only device -> host traffic of a call: how many rows, the longest read, the
        furthest slot, the pages short. Slots: XLA's attention runs over every slot it is
        given, so a call whose rows are all short gets a prefix of the page table, in steps of
        64 slots; the CPU kernel reads only the valid ones and gets it whole (`span`).
        """
        left = rows & ~s.within.done
        reach = jnp.minimum(s.trace.total + max(extra, 0) + ahead, self.slots)  # within the table
        while True:
            cache = s.caches[side.stream]
            window = side.window(cache, self.local_span)
            take, stats = _plan(cache, reach, s.trace.total + extra, left, cap=self.cap, **window)
            count, widest, end, short, wanted, short_local = (int(x) for x in np.asarray(stats))
            if count == 0:
                if wanted:
                    raise ValueError(
                        f"the {MODEL_NAMES[side.stream]} model's page pool "
                        f"({cache.free.shape[0] - 1} pages of {cache.page_size}) cannot hold "
                        f"one trace's next call (up to {end} tokens): raise cache.pages or "
                        "lower steer.max_new_tokens")
                return s
            if short > 0 or short_local > 0:
                s = with_cache(s, side, _evict(cache, take, jnp.asarray([short, short_local])))
            if widest > normal and behind is not None:
                s = self.catch_up(s, side, take, behind(s))
                take, stats = _plan(s.caches[side.stream], reach, s.trace.total + extra, take,
                                    cap=self.cap, **window)
                widest = int(np.asarray(stats)[1])
            s = op(s, take, count, _width(widest, self.shapes.widths),
                   self.span(side, end, cache))
            left = left & ~take
            s = dataclasses.replace(s, within=dataclasses.replace(
                s.within, done=s.within.done | take, calls=s.within.calls + 1, shared=False))
            if self.on_call:
                self.on_call(s)

    def catch_up(self, s: RoundState, side: Side, rows: jax.Array,
                 until: jax.Array) -> RoundState:
        """Rows behind read up to `until` first, CHUNK tokens a call, on their own.

        Typically a handful of a write's rows lag (the other model wrote their last steps) while
        the rest only feed their pending token: one call as wide as the furthest-behind row
        would pad every row to its lag. In chunks, each call holds only the rows still behind.
        The caller has made room in the pool for all of it.
        """
        while True:
            cache = s.caches[side.stream]
            take, stats = _plan(cache, s.trace.total, until, rows & (until > cache.length),
                                cap=self.cap, **side.window(cache, self.local_span))
            count, widest, end = (int(x) for x in np.asarray(stats)[:3])
            if count == 0:
                return s
            # Widths 16, 32 or CHUNK: these calls are small, and every width is a program.
            s, (cache, trace) = timed(
                s, _advance, side.model.params, side.cfg, cache, s.trace, take, until,
                bucket=self._bucket(count), span=self.span(side, end, cache),
                width=_pow2(max(widest, 16), CHUNK), stream=side.stream, when=side.stream == PRM)
            s = with_cache(s, side, cache, trace)

    def _bucket(self, count: int) -> int:
        return _bucket(count, self.cap, self.shapes.rows)

    def span(self, side: Side, end: int, cache: KVCache) -> int:
        """The slots of its `cache` a call of `side` reaching slot `end` attends over: the
        whole table where attention reads only the valid slots anyway (one compiled shape),
        else `_span`."""
        if execution.whole_table(side.cfg):
            return cache.slots
        return _span(end, cache.slots, cache.page_size, self.shapes.spans)

    # ---- the phases ------------------------------------------------------------------------

    def write(self, s: RoundState, side: Side) -> RoundState:
        """The model's steps in flight, `chunk` tokens a call; under a barrier (rounds), again
        until each of them ended."""
        def op(s: RoundState, take: jax.Array, count: int, width: int, span: int) -> RoundState:
            cache, trace = _write(side.model.params, side.cfg, s.caches[side.stream], s.trace,
                                  take, side.masks, self.seed, self.ids, bucket=self._bucket(count),
                                  span=span, opts=self.spec, chunk=self.chunk, stream=side.stream,
                                  stops=side.stops)
            return with_cache(s, side, cache, trace)

        while True:
            mine = s.within.running & (s.trace.author == side.stream)
            s = self.serve(s, side, mine, op, ahead=self.chunk,
                           behind=lambda s: s.trace.total - 1)
            if not (self.barrier
                    and bool(jnp.any(s.within.running & (s.trace.author == side.stream)))):
                return s
            s = dataclasses.replace(s, within=dataclasses.replace(s.within, done=self.none))

    def read(self, s: RoundState, side: Side, rows: jax.Array) -> RoundState:
        """`rows` read their newest step (the other model's) and score it on this model's scale."""
        def op(s: RoundState, take: jax.Array, count: int, width: int, span: int) -> RoundState:
            cache, trace = _read(side.model.params, side.cfg, s.caches[side.stream], s.trace,
                                 take, side.masks, bucket=self._bucket(count), span=span,
                                 width=width, opts=self.spec, stream=side.stream)
            return with_cache(s, side, cache, trace)

        # The newest token stays pending; a row reads from the token before the step on.
        return self.serve(s, side, rows, op, extra=-1, normal=self.opts.max_step_tokens,
                          behind=lambda s: s.trace.step_start - 1)

    def verify(self, s: RoundState, side: Side, rows: jax.Array) -> RoundState:
        """A verifier (SpecReason's judge, RSD's PRM) scores `rows`' newest step; the ones it
        rejects join the round's rejections."""
        if side.stream == PRM and self.text_prm is not None:
            return self.text_prm.verify(self, s, rows)
        extra = 0 if self.suffix is None else len(self.suffix)

        def op(s: RoundState, take: jax.Array, count: int, width: int, span: int) -> RoundState:
            s, (cache, trace, rejected, score) = timed(
                s, _verify, side.model.params, side.cfg, s.caches[side.stream], s.trace, take,
                self.suffix, self.digits, self.threshold, bucket=self._bucket(count), span=span,
                width=width, stream=side.stream)
            s = with_cache(s, side, cache, trace)
            return dataclasses.replace(s, within=dataclasses.replace(
                s.within, rejected=s.within.rejected | rejected,
                score=jnp.where(take, score, s.within.score)))

        return self.serve(s, side, rows, op, extra=extra,
                          normal=self.opts.max_step_tokens + 1 + extra,
                          behind=lambda s: s.trace.step_start - 1)

    def discard(self, s: RoundState, rejected: jax.Array) -> RoundState:
        """Throw the rejected small steps away; each cache that read them rolls back."""
        trace = _discard(s.trace, rejected)
        caches = []
        for side, cache in zip(self.sides, s.caches):
            # Small and judge keep the token before the step pending; the PRM keeps it read.
            keep = trace.total if side.stream == PRM else trace.total - 1
            # No further back than the round's start: the sliding layers still see it. A PRM
            # reading text has its own positions, and cut its rejected drafts itself.
            caches.append(cache if side.stream == PRM and self.text_prm is not None
                          else _rollback(cache, jnp.where(rejected, keep, self.slots)))
        return dataclasses.replace(s, trace=trace, caches=tuple(caches))

    def fit(self, s: RoundState, among: jax.Array, who: str,
            init: gmm.GMMParams | None = None) -> tuple[RoundState, gmm.GMMParams, jax.Array]:
        """One mixture per group over `among` of every process's traces (continuous: warm-started
        from `init`); the state keeps it, and this process's posteriors come back."""
        conf, among = self.peers.gather(s.trace.conf), self.peers.gather(among)

        def mixture(conf: jax.Array, among: jax.Array) -> tuple:
            params, post = _mixture(conf, among, self.group, None if self.barrier else init,
                                    groups=self.opts.groups)
            return few_survivors(params, post, conf, self.group, s.fits, who, self.opts)

        s, (params, post, kept) = timed(s, mixture, conf, among,
                                        when=self.opts.method == "steer")  # else it only records
        s = dataclasses.replace(s, fits=s.fits + (Fit(s.round, who, params, conf, among, kept),))
        return s, params, self.peers.local(post)

    def route(self, conf: jax.Array, among: jax.Array, params: gmm.GMMParams) -> jax.Array:
        """The policy over every process's traces (a percentile ranks them all); ours back."""
        return self.peers.local(_route(self.peers.gather(conf), self.peers.gather(among),
                                       self.group, params, self.level, rule=self.opts.policy,
                                       groups=self.opts.groups))

    def to_large(self, s: RoundState) -> jax.Array:
        """Which running traces' next step the large model writes: by the method's rule, or
        (steer) by the policy on their newest step's confidence, under the mixture that step
        was judged by. Ranked among every running trace with a step (a percentile sees all)."""
        running, opts = s.trace.running, self.opts
        if opts.method == "large_only":
            return running
        if opts.method == "query_router":
            return running & self.fixed_large
        if opts.method != "steer" or s.routing is None:
            return self.none
        scored = running & (s.trace.step > 0)
        if opts.source == "small":
            return self.route(s.trace.conf, scored, s.routing)
        out = self.none  # each newest step judged under its writer's mixture
        for who in (SMALL, LARGE):
            out |= self.route(s.trace.conf, scored & (s.trace.writer == who), s.routing[who])
        return out

    def check(self, s: RoundState) -> RoundState:
        """Small steps the mixture (refine) or a verifier rejects go to the large model."""
        opts = self.opts
        refine = opts.method == "steer" and opts.refine != "none"
        if not (refine or opts.method in ("specreason", "rsd")):
            return s
        drafts = s.within.running & (s.trace.author == ENDED) & (s.trace.writer == SMALL)
        if refine and opts.refine == "first":
            drafts &= s.trace.step == 0
        if not self.peers.any(bool(jnp.any(drafts))):
            return s
        if refine:
            # Continuous: the drafts that ended at one boundary are few, and the short ones
            # first; they are judged among the newest step of every running trace.
            pool = drafts if self.barrier else drafts | fit_pool(
                s.within.running & (s.trace.step > 0), s, self.opts, self.slots)
            s, params, _ = self.fit(s, pool, "small-draft",
                                    s.routing if opts.source == "small" else None)
            s, rejected = timed(s, self.route, s.trace.conf, pool, params)
            rejected &= drafts
            s = dataclasses.replace(s, within=dataclasses.replace(s.within, rejected=rejected))
        else:
            s = self.verify(s, self.sides[LARGE if opts.method == "specreason" else PRM], drafts)
            s = dataclasses.replace(s, within=dataclasses.replace(s.within, score=jnp.where(
                s.within.rejected, jnp.nan, s.within.score)))
        return self.discard(s, s.within.rejected)

    def small_reads(self, s: RoundState) -> RoundState:
        """The small model reads the large steps of the round: they are scored on its scale.
        Continuous: it reads what the large model wrote at every boundary, a chunk a row, so
        a step's read is as wide as the chunk and not as the longest step that ended."""
        if self.opts.source != "small" or self.opts.method != "steer":
            return s
        trace = s.trace
        ended = (trace.author == ENDED) & (trace.writer == LARGE)
        if self.barrier:
            return self.read(s, self.sides[SMALL], s.within.running & ended)
        unread = trace.total - 1 > s.caches[SMALL].length
        return self.read(s, self.sides[SMALL],
                         s.within.running & (ended | (trace.author == LARGE) & unread))

    def finish(self, s: RoundState) -> RoundState:
        """The round's end: one mixture over the newest step of every running trace; the steps
        that ended are recorded under it, and their traces routed to their next step."""
        opts = self.opts
        ended = s.within.running & (s.trace.author == ENDED)
        pool = fit_pool(s.within.running & (ended | (s.trace.step > 0)), s, self.opts, self.slots)
        if opts.source == "generator":
            per_writer, post = [], jnp.zeros(self.ids.shape[0])
            for who in (SMALL, LARGE):
                among = pool & (s.trace.writer == who)
                s, params, p = self.fit(s, among, MODEL_NAMES[who],
                                        None if s.routing is None else s.routing[who])
                per_writer.append(params)
                post = jnp.where(among, p, post)
            routing: Any = tuple(per_writer)
        else:
            s, routing, post = self.fit(s, pool, "all", s.routing)
        trace = _end_steps(s.trace, ended, post, s.within.score, jnp.int32(s.round),
                           max_steps=opts.max_steps, max_new_tokens=opts.max_new_tokens,
                           slots=self.slots)
        s = dataclasses.replace(s, trace=trace, routing=routing)
        s, large = timed(s, self.to_large, s, when=opts.method == "steer")
        trace = _assign(trace, ended & trace.running, large)
        caches = []
        for side, cache in zip(self.sides, s.caches):
            cache = _drop(cache, ended & ~trace.running)  # a trace that ended gives pages back
            if cache.split:  # later rounds go back no further than their newest token
                cache = _slide(cache, trace.total - 1, window=side.cfg.sliding_window)
            caches.append(cache)
        return dataclasses.replace(s, round=s.round + 1, trace=trace, caches=tuple(caches),
                                   within=None)

    # ---- the loop --------------------------------------------------------------------------

    def start(self, s: RoundState) -> RoundState:
        """A fresh run's first routing (round 0: the small model, or the method's rule)."""
        return dataclasses.replace(s, trace=_assign(s.trace, s.trace.running, self.to_large(s)))

    def begin(self, s: RoundState) -> RoundState:
        """A round over the traces running now, no phase done."""
        return dataclasses.replace(s, within=RoundProgress(
            s.trace.running, self.none, jnp.full(self.ids.shape[0], jnp.nan), self.none, 0, 0))

    def phases(self) -> tuple[Callable[[RoundState], RoundState], ...]:
        """PHASES, in order."""
        return (lambda s: self.write(s, self.sides[SMALL]), self.check,
                lambda s: self.write(s, self.sides[LARGE]), self.small_reads)

    def run(self, s: RoundState, on_round: Callable[[RoundState], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> RoundState:
        """Rounds until no trace runs. A round resumed in flight skips the phases it did and
        runs to its end whatever else holds."""
        phases = self.phases()
        while True:
            if s.within is None:
                if not self.peers.any(bool(jnp.any(s.trace.running))):
                    return s
                s = self.begin(s)
            for i, phase in enumerate(phases):
                if i < s.within.phase:
                    continue
                s = phase(s)
                s = dataclasses.replace(s, within=dataclasses.replace(
                    s.within, phase=i + 1, done=self.none, shared=True))
                if self.on_call:
                    self.on_call(s)
            s = self.finish(s)
            if jax.default_backend() == "cpu" and maps_nearly_full():
                release_programs()
            if on_round:
                on_round(s)
            if progress:
                progress(s.round, int(jnp.sum(s.trace.running)))

