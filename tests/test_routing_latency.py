"""Routing latency (issue #23, Fig. 4): the device time spent deciding who writes, measured in
the run. The clock is checked against what JAX reports and against the device's own work; the
loop's bookkeeping with a clock that says 1 second per piece, against the pieces counted by hand;
and the issue's figure on the shipped demo pair, SpecReason's judge against STEER's mixture."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from steer_jax import latency, load_model, round_loop
from steer_jax.calls import PRM
from steer_jax.runner import _merge, summarize
from steer_jax.steer import SteerOptions
from steer_jax.parts import _part_from_json, _part_to_json
from steer_jax.store import RoundCheckpoint

ROOT = Path(__file__).resolve().parents[1]
SHORT = tiny.SHORT


# ---- the clock -------------------------------------------------------------------------------

def test_compile_spans_are_counted_once_and_only_inside_the_piece():
    spans = [(1.0, 3.0), (2.0, 4.0), (2.5, 2.7), (5.0, 6.0)]  # a trace nested in another
    assert latency._covered(spans, 0.0, 10.0) == pytest.approx(4.0)
    assert latency._covered(spans, 2.5, 5.5) == pytest.approx(1.5 + 0.5)
    assert latency._covered([], 0.0, 1.0) == 0.0


def _chain(depth: int):
    """A fresh jitted program (compiled on its first call) of `depth` matmuls."""
    @jax.jit
    def f(x):
        for _ in range(depth):
            x = jnp.tanh(x @ x) * 0.5
        return x
    return f


def test_compiling_is_left_out_as_jax_reports_it():
    compiled = []

    def listen(event, took, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(took)

    x, f = jax.block_until_ready(jnp.full((32, 32), 0.01)), _chain(60)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        start = time.perf_counter()
        out, took = latency.seconds(f, x)
        raw = time.perf_counter() - start
        assert len(compiled) == 1 and compiled[0] > 0.01  # the call compiled, as JAX says
        assert 0.0 <= took <= raw - compiled[0] + 1e-3
        np.testing.assert_allclose(np.asarray(out), np.asarray(f(x)), rtol=0)
        _, again = latency.seconds(f, x)
        assert again > 0.0 and len(compiled) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _fastest_of_three(f, x):
    """The fastest of three blocked runs of a warm program: a lower bound of its device time."""
    jax.block_until_ready(f(x))
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - start)
    return best


def test_the_clock_waits_for_the_inputs_before_and_the_outputs_after():
    x = jnp.ones((384, 384)) * 0.01
    heavy = _chain(12)
    device = _fastest_of_three(heavy, x)
    _, took = latency.seconds(heavy, x)
    assert took >= 0.5 * device  # not just the dispatch: the result was waited for
    cheap = jax.jit(lambda y: y[0, 0] + 1)
    jax.block_until_ready(cheap(x))
    pending = heavy(x)  # dispatched, still running
    _, took = latency.seconds(cheap, pending)
    assert took < 0.5 * device  # the input's own computation was not counted


# ---- the loop's bookkeeping --------------------------------------------------------------------

@pytest.fixture
def one_second(monkeypatch):
    """A clock that says every piece of routing work took 1 s: routing_s counts the pieces."""
    monkeypatch.setattr(latency, "seconds", lambda fn, *a, **k: (fn(*a, **k), 1.0))


def _counting(monkeypatch, name: str, when=lambda kw: True) -> list[int]:
    """Count the round loop's calls of the device function `name` (matching `when`)."""
    calls, inner = [], getattr(round_loop, name)

    @functools.wraps(inner)
    def wrapped(*args, **kw):
        if when(kw):
            calls.append(1)
        return inner(*args, **kw)

    monkeypatch.setattr(round_loop, name, wrapped)
    return calls


def test_steer_counts_one_fit_and_one_policy_a_round(pair, one_second):
    res = tiny.run(pair, gamma=0.5, refine="none")
    rounds = {m.round for m in res.mixtures}
    assert res.rounds == len(rounds) == max(rounds) + 1 >= 3
    assert res.routing_s == 2.0 * res.rounds
    summary = summarize(res, [True] * len(res.traces), SteerOptions(**SHORT), "x", 1.0)
    assert summary.routing_s_per_round == 2.0
    assert summary.routing_s_per_query == res.routing_s / len(tiny.QUESTIONS)


def test_verifiers_count_their_passes_and_baselines_nothing(pair, one_second, monkeypatch,
                                                            tmp_path):
    for method in ("small_only", "large_only"):  # they fit mixtures too, only to record them
        res = tiny.run(pair, method=method)
        assert res.routing_s == 0.0 and res.mixtures and res.rounds >= 3
        summary = summarize(res, [True] * len(res.traces), SteerOptions(method=method), "x", 1.0)
        assert summary.routing_s_per_query == summary.routing_s_per_round == 0.0
    judged = _counting(monkeypatch, "_verify")
    res = tiny.run(pair, method="specreason")
    assert len(judged) > 0 and res.routing_s == len(judged)
    # RSD: the PRM's scoring passes, and its catch-up reads of the large model's steps.
    tiny.prm(tmp_path / "prm")
    prm = load_model(tmp_path / "prm", "float32", value_head=True)
    judged.clear()
    reads = _counting(monkeypatch, "_advance", lambda kw: kw["stream"] == PRM)
    res = tiny.run(pair, method="rsd", prm=prm)
    assert len(judged) > 0 and res.routing_s == len(judged) + len(reads)


def test_a_resumed_run_keeps_the_latency_before_the_stop(pair, one_second, tmp_path):
    states = []
    whole = tiny.run(pair, gamma=0.5, batch_size=3,
                     on_call=lambda state: states.append(tiny.copied(state)))
    inside = next(s for s in states if s.round == 2 and s.within.phase == 1)
    assert 0 < inside.routing_s < whole.routing_s
    resumed = tiny.run(pair, gamma=0.5, batch_size=3, resume_from=inside)
    assert resumed.traces == whole.traces
    assert (resumed.routing_s, resumed.rounds) == (whole.routing_s, whole.rounds)
    # On disk: a round checkpoint and a finished part carry it.
    saved = []
    store = RoundCheckpoint(tmp_path / "parts", 0, range(len(tiny.QUESTIONS)), 1, {"c": 1}, None)

    def save(state):
        saved.append(state.routing_s)
        store(state)

    tiny.run(pair, gamma=0.5, on_round=save)
    assert store.latest().routing_s == saved[-1] > 0
    back, wall = _part_from_json(_part_to_json(whole, 2.5))
    assert (back.routing_s, back.rounds, wall) == (whole.routing_s, whole.rounds, 2.5)


def test_processes_decide_side_by_side(pair, one_second):
    res = tiny.run(pair, method="small_only")
    parts = [dataclasses.replace(res, routing_s=s) for s in (3.0, 5.0, 4.0)]
    merged = _merge(parts)
    assert merged.routing_s == 5.0 and merged.rounds == res.rounds
    assert len(merged.traces) == 3 * len(res.traces)


# ---- the real clock in the run -----------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["rounds", "continuous"])
def test_timing_changes_no_trace(pair, monkeypatch, schedule):
    chunk = 4 if schedule == "continuous" else None
    kw = dict(gamma=0.5, refine="all", schedule=schedule, chunk=chunk)
    timed = tiny.run(pair, **kw)
    assert timed.routing_s > 0.0 and timed.rounds > 0
    monkeypatch.setattr(round_loop, "timed", lambda s, fn, *a, when=True, **k: (s, fn(*a, **k)))
    untimed = tiny.run(pair, **kw)
    assert untimed.routing_s == 0.0
    assert timed.traces == untimed.traces and timed.mixtures == untimed.mixtures
    assert timed.executed_tokens == untimed.executed_tokens


def test_the_query_router_times_its_pass(pair, shared_data, tmp_path):
    from steer_jax.baselines.query_router import (RouterConfig, prompt_features, route,
                                                  route_prompts, save_router, train_router)
    from steer_jax.runner import run

    feats = np.random.RandomState(0).randn(32, pair["small"].config.hidden_size)
    router = train_router(feats.astype(np.float32), feats[:, 0] > 0, RouterConfig(epochs=5))
    decided, took = route_prompts(router, pair["small"], pair["prompts"])
    np.testing.assert_array_equal(decided, route(router, prompt_features(pair["small"],
                                                                         pair["prompts"])))
    assert took > 0.0
    save_router(router, tmp_path / "router")
    cfg = {"small": str(pair["small_dir"]), "large": str(pair["large_dir"]), "dtype": "float32",
           "method": "query_router", "router": {"path": str(tmp_path / "router")},
           "benchmark": {"name": "musique", "path": str(shared_data / "musique"), "limit": 2},
           "steer": {k: v for k, v in SHORT.items() if k not in ("temperature", "seed")}}
    run(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["routing_s_per_query"] > 0.0 and summary["routing_s_per_round"] > 0.0
