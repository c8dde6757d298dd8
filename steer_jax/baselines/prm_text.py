"""RSD's process reward model when its tokenizer is not the policy models': it reads text.

The paper's RSD rows use Skywork-o1-Open-PRM (Qwen2.5-Math based) as the reward model, whose
vocabulary is not Gemma's. Such a PRM cannot share the trace's token stream, so it keeps a stream
of its own, built from the decoded text of the question and the steps, in its own tokenizer and
in Skywork's format (`prepare_input` of SkyworkAI/skywork-o1-prm-inference):

- the question: `tokenizer.encode(bos_token + question + "\\n")` (no BOS where the tokenizer has
  none);
- each step: its text split at the step token (Skywork's is "\\n"), every non-empty piece
  encoded on its own with `tokenizer.encode` and followed by the step token's id
  (`tokenizer.encode(step_token)[-1]`);
- a step's reward: sigmoid of the value head (`v_head.summary`) at its last step token.

A policy step is one unit here: its text (special tokens skipped) ends at the "\\n\\n" delimiter,
whose pieces are empty and dropped (Skywork's own loop would put two step tokens there), so it
ends with exactly one step token, whose value is the step's reward; a step with no text at all
(EOS alone) is that step token only. Lines inside a step become pieces of it, as Skywork splits
them, and only the step's last value is read.

How it reads: the PRM's paged KV cache holds its stream, and each verify appends what the PRM has
not read yet (the prefix after an eviction, the kept steps since its last verify, then the draft)
and scores the draft: linear in the trace, not quadratic as re-reading the whole text every step
would be. A rejected draft is rolled back at once. No state is added for resume: the cache's
length says how far the PRM has read, as it is always the end of the prefix or of a kept step
(those ends are recomputed from the trace's text). The host decodes and encodes step text here,
and only here: for `rsd` with a foreign tokenizer. Each step's PRM tokens are encoded once and
remembered. Every token the PRM reads is billed to it (`TraceState.read`, prefill FLOPs, 2N each),
rejected drafts and re-reads after an eviction included, as the same-tokenizer path bills its
reads. A stream longer than the PRM's cache (`slots`) cannot be read: such a step is kept unjudged
(no score), with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.call_shapes import _width
from steer_jax.calls import PRM, TraceState, _evict, _gather, _plan, _scatter
from steer_jax.decoding import paging, sampler
from steer_jax.latency import timed
from steer_jax.modeling.transformer import KVCache, forward
from steer_jax.sides import with_cache

if TYPE_CHECKING:
    from steer_jax.round_loop import RoundLoop
    from steer_jax.round_state import RoundState

log = logging.getLogger(__name__)

STEP_TOKEN = "\n"  # Skywork-o1-Open-PRM's step separator


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token to the same id (then the PRM shares the trace)."""
    return a is b or a.get_vocab() == b.get_vocab()


def prefix_ids(tokenizer: Any, question: str) -> list[int]:
    """The PRM's tokens for the question, before any step."""
    return tokenizer.encode((tokenizer.bos_token or "") + question + "\n")


def step_ids(tokenizer: Any, text: str, step_token: str = STEP_TOKEN) -> list[int]:
    """The PRM's tokens for one policy step's text; the last is the step token it is scored at."""
    sid = tokenizer.encode(step_token)[-1]
    ids: list[int] = []
    for piece in text.split(step_token):
        if piece:
            ids += tokenizer.encode(piece) + [sid]
    return ids or [sid]


@functools.partial(jax.jit, static_argnames=("cfg", "bucket", "span"), donate_argnames=("cache",))
def _score(params, cfg, cache: KVCache, state: TraceState, rows: jax.Array, tokens: jax.Array,
           n: jax.Array, before: jax.Array, threshold: jax.Array, *, bucket: int, span: int):
    """The `rows` append their `n` [bucket] PRM `tokens` [bucket, width] (in the order `_gather`
    takes the rows); the value at each row's last one scores its draft. A rejected draft is cut
    off again (the row keeps `before` [bucket] tokens). Returns (cache, state, rejected [B],
    score [B], NaN where not scored)."""
    idx, active, sub = _gather(cache, rows, bucket, span)
    seen = sub.length
    n = jnp.where(active, n, 0)
    sub = paging.reserve(sub, seen + n, active)
    hidden, sub = forward(params, cfg, tokens, sub)
    last = sampler.last_valid(hidden, n).astype(jnp.float32)
    head = params["v_head"]
    score = jax.nn.sigmoid(jnp.einsum("bd,d->b", last, head["w"].astype(jnp.float32),
                                      precision=jax.lax.Precision.HIGHEST) + head["b"])
    rejected = active & (score < threshold)
    sub = dataclasses.replace(sub, length=jnp.where(
        active, jnp.where(rejected, before, seen + n), seen))
    state = dataclasses.replace(
        state, read=state.read.at[idx, PRM].add(n),
        executed=state.executed.at[PRM].add(bucket * tokens.shape[1]))
    full_rejected = jnp.zeros_like(rows).at[idx].set(rejected)
    full_score = jnp.full(rows.shape, jnp.nan).at[idx].set(jnp.where(active, score, jnp.nan))
    return _scatter(cache, idx, active, sub), state, full_rejected, full_score


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One row's PRM stream as the host sees it: every piece (prefix, kept steps), the draft."""

    pieces: list[list[int]]
    draft: list[int]

    @property
    def before(self) -> int:
        return sum(len(p) for p in self.pieces)

    @property
    def target(self) -> int:
        return self.before + len(self.draft)

    def unread(self, length: int) -> list[int]:
        """What the PRM has not read of it when its cache holds `length` tokens."""
        ends = np.cumsum([len(p) for p in self.pieces])
        if length == 0:
            start = 0
        else:
            at = np.flatnonzero(ends == length)
            if at.size == 0:
                raise RuntimeError(f"the PRM's cache holds {length} tokens, which ends neither "
                                   f"its prefix nor a kept step (ends {ends.tolist()})")
            start = int(at[0]) + 1
        return [t for p in self.pieces[start:] for t in p] + self.draft


@dataclasses.dataclass(frozen=True)
class TextPRM:
    """A reward model reading the trace as text in its own tokenizer (see the module docstring).

    `prefixes`: each trace's question in PRM tokens; `slots`: tokens its cache holds per trace.
    """

    tokenizer: Any  # the policy models'
    prm_tokenizer: Any
    prefixes: tuple[tuple[int, ...], ...]
    slots: int
    step_token: str = STEP_TOKEN
    memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, tokenizer: Any, prm_tokenizer: Any, questions: Sequence[str], context: int,
              max_new_tokens: int, max_steps: int, page_size: int) -> TextPRM:
        """The reader for these questions. Its cache holds the longest question and twice the
        token budget (the PRM's tokenizer may be the less compact), a step token per step, up to
        the PRM's `context`; a question that does not fit is refused now."""
        prefixes = tuple(tuple(prefix_ids(prm_tokenizer, q)) for q in questions)
        longest = max(len(p) for p in prefixes)
        want = -(-(longest + 2 * max_new_tokens + max_steps + 2) // page_size) * page_size
        slots = min(want, context // page_size * page_size)
        if longest + 2 > slots:
            raise ValueError(f"a question takes {longest} tokens of the process reward model, "
                             f"whose cache holds {slots} (its context: {context})")
        return cls(tokenizer, prm_tokenizer, prefixes, slots)

    def _ids(self, tokens: np.ndarray) -> list[int]:
        key = tokens.tobytes()
        if key not in self.memo:
            text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
            self.memo[key] = step_ids(self.prm_tokenizer, text, self.step_token)
        return self.memo[key]

    def streams(self, trace: TraceState, rows: np.ndarray) -> dict[int, _Stream]:
        """The PRM streams of `rows` (indices), their kept steps and newest step as text."""
        picked = jax.device_get({k: getattr(trace, k)[rows] for k in (
            "tokens", "prompt_len", "rec_len", "step", "step_start", "total")})
        out = {}
        for i, b in enumerate(rows):
            tokens, pos = picked["tokens"][i], int(picked["prompt_len"][i])
            pieces = [list(self.prefixes[b])]
            for n in picked["rec_len"][i, :picked["step"][i]]:
                pieces.append(self._ids(tokens[pos:pos + n]))
                pos += int(n)
            draft = self._ids(tokens[pos:picked["total"][i]])
            out[int(b)] = _Stream(pieces, draft)
        return out

    def verify(self, loop: RoundLoop, s: RoundState, rows: jax.Array) -> RoundState:
        """RSD's check of `rows`' newest (small) step, in calls of at most `loop.cap` rows: the
        rows it rejects join the round's rejections, the scores of all join its scores."""
        side = loop.sides[PRM]
        todo = np.array(rows & ~s.within.done)  # a copy: rows are crossed off as served
        streams = self.streams(s.trace, np.flatnonzero(todo))
        over = [b for b, st in streams.items() if st.target > self.slots]
        if over:
            log.warning("%d traces' text is longer than the process reward model's cache of %d "
                        "tokens: their newest steps are kept unjudged", len(over), self.slots)
            todo[over] = False
            s = _progress(s, jnp.asarray(np.isin(np.arange(todo.size), over)), None, None)
        target = np.zeros(todo.size, np.int32)
        for b, st in streams.items():
            target[b] = st.target
        reach = jnp.asarray(target)
        while todo.any():
            cache = s.caches[PRM]
            take, stats = _plan(cache, reach, reach, jnp.asarray(todo), cap=loop.cap)
            count, widest, end, short, wanted, _ = (int(x) for x in np.asarray(stats))
            if count == 0:
                raise ValueError(
                    f"the prm model's page pool ({cache.free.shape[0] - 1} pages of "
                    f"{cache.page_size}) cannot hold one trace's text (up to {end} tokens): "
                    "raise cache.pages or lower steer.max_new_tokens")
            if short > 0:  # the old cache is donated: the state holds the new one
                cache = _evict(cache, take, jnp.asarray([short, 0]))
                s = with_cache(s, side, cache)
            taken = np.flatnonzero(np.asarray(take))
            bucket, length = loop._bucket(count), np.asarray(cache.length)
            unread = [streams[b].unread(int(length[b])) for b in taken]
            width = _width(max(len(u) for u in unread), loop.shapes.widths)
            tokens = np.zeros((bucket, width), np.int32)
            n, before = np.zeros(bucket, np.int32), np.zeros(bucket, np.int32)
            for i, (b, u) in enumerate(zip(taken, unread)):
                tokens[i, :len(u)], n[i], before[i] = u, len(u), streams[b].before
            # The PRM's pass is routing work (routing latency), as on the same-tokenizer path.
            s, (cache, trace, rejected, score) = timed(
                s, _score, side.model.params, side.cfg, cache, s.trace, take,
                jnp.asarray(tokens), jnp.asarray(n), jnp.asarray(before), loop.threshold,
                bucket=bucket, span=loop.span(side, end, cache))
            s = with_cache(s, side, cache, trace)
            s = _progress(s, take, rejected, score)
            todo[taken] = False
            if loop.on_call:
                loop.on_call(s)
        return s


def _progress(s: RoundState, done: jax.Array, rejected: jax.Array | None,
              score: jax.Array | None) -> RoundState:
    """`done` rows of the check phase are served (one call more where they were scored)."""
    w = s.within
    if rejected is None:
        return dataclasses.replace(s, within=dataclasses.replace(w, done=w.done | done))
    return dataclasses.replace(s, within=dataclasses.replace(
        w, done=w.done | done, rejected=w.rejected | rejected,
        score=jnp.where(done, score, w.score), calls=w.calls + 1, shared=False))
