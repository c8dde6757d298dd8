"""What the round loop carries between its calls and rounds: the whole state a run can stop at
and resume from, a round in flight's progress, and the mixtures fitted so far."""

from __future__ import annotations

import dataclasses

import jax

from steer_jax.calls import TraceState
from steer_jax.modeling.transformer import KVCache
from steer_jax.routing import gmm


@dataclasses.dataclass(frozen=True)
class Fit:
    """One mixture fitted in a round, kept for the result's `mixtures` (rounds.jsonl)."""

    round: int
    who: str  # whose steps: "all", "small-draft", "small" or "large"
    params: gmm.GMMParams
    conf: jax.Array  # [B] the confidences it saw
    among: jax.Array  # [B] which of them took part
    # [groups] the round whose fit a group kept (steer.min_fit_traces), -1 where fitted now;
    # None in checkpoints saved before the rule.
    kept_from: jax.Array | None = None


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
    routing_s: float = 0.0  # device seconds spent deciding who writes so far (latency.py)
