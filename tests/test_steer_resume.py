"""A run resumed from any state the loop hands its hooks ends as the whole run: after a round,
after any call inside one (its phases cut into calls of 3 rows), and inside a verifier's calls,
under both schedules. (Their own file: in one process with test_steer.py's, the compiled
programs pile up until XLA's CPU client crashes writing the persistent cache.)"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

import tiny
from steer_jax import steer

SHORT = tiny.SHORT
CONT = dict(schedule="continuous", chunk=4)
_run = tiny.run


def test_a_run_resumed_from_a_round_state_ends_as_the_whole_run(pair):
    states = []

    def keep(state):
        states.append(tiny.copied(state))

    whole = _run(pair, gamma=0.5, on_round=keep)
    assert [s.round for s in states] == list(range(1, len(states) + 1))
    assert len(states) >= 3 and any(s.model == "large" for t in whole.traces for s in t.steps)
    resumed = _run(pair, gamma=0.5, resume_from=states[1])
    assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures
    assert resumed.executed_tokens == whole.executed_tokens
    with pytest.raises(ValueError, match="resume_from: the small model's cache"):
        steer(pair["small"], pair["large"], pair["tok"], pair["prompts"][:4],
              resume_from=states[1], gamma=0.5, **SHORT)


def test_a_run_resumed_inside_a_round_ends_as_the_whole_run(pair):
    """Calls of 3 rows: a round's phases each run in several calls. A run resumed from a state
    after any call (here one inside the small writes of round 1, one inside the large writes of
    round 2, one between two phases) makes only the calls left and ends as the whole run."""
    states = []

    def keep(state):
        states.append(tiny.copied(state))

    whole = _run(pair, gamma=0.5, batch_size=3, on_call=keep)
    where = [(s.round, s.within.phase, s.within.calls, s.within.shared) for s in states]
    picks = [where.index((1, 0, 1, False)), where.index(next(w for w in where if w[:2] == (2, 1))),
             next(i for i, w in enumerate(where) if w[:2] == (2, 2) and not w[3])]
    assert where[picks[1]][3] and where[picks[2]][2] > where[picks[1]][2], where
    for i in picks:
        resumed = _run(pair, gamma=0.5, batch_size=3, resume_from=states[i])
        assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures, where[i]
        assert resumed.executed_tokens == whole.executed_tokens, where[i]


def test_specreason_resumed_inside_its_judge_calls_ends_as_the_whole_run(pair):
    """The judge's scores and rejections so far travel in the state; the rejected steps are
    thrown away once, after the phase's last call."""
    states = []

    def keep(state):
        states.append(tiny.copied(state))

    whole = _run(pair, method="specreason", batch_size=3, on_call=keep)
    i = next(i for i, s in enumerate(states)
             if s.round == 1 and s.within.phase == 1 and not s.within.shared)
    assert bool(jnp.any(states[i].within.done)) and not np.isnan(
        np.asarray(states[i].within.score)[np.asarray(states[i].within.done)]).any()
    resumed = _run(pair, method="specreason", batch_size=3, resume_from=states[i])
    assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures
    assert resumed.executed_tokens == whole.executed_tokens


def test_continuous_resumed_at_a_boundary_or_inside_one_ends_as_the_whole_run(pair):
    rounds, calls = [], []
    whole = _run(pair, batch_size=3, on_round=lambda s: rounds.append(tiny.copied(s)),
                 on_call=lambda s: calls.append(tiny.copied(s)), **CONT)
    inside = next(s for s in calls if s.round == 3 and s.within.phase == 0 and s.within.calls)
    for state in (rounds[2], inside):
        resumed = _run(pair, batch_size=3, resume_from=state, **CONT)
        assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures
        assert resumed.executed_tokens == whole.executed_tokens
