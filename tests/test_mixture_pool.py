"""Which traces a round's mixture is fitted over (`steer.fit_over`), and the few-survivors rule
(`steer.min_fit_traces`): phases run alone on the tiny pair, fits compared with the EM called
directly on the pool the rule names, and the whole run's rounds.jsonl."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from steer_jax.calls import SMALL, STOPS
from steer_jax.decoding import sampler
from steer_jax.options import SteerOptions
from steer_jax.routing import gmm
from steer_jax.run_config import RunConfigError, validate
from steer_jax.runner import run
from steer_jax.steer import prepare

B = len(tiny.QUESTIONS)


def _written(pair, eos=(), **kw):
    """The loop and its state after round 0's small writes, rows `eos` made to end at EOS."""
    loop, s = prepare(pair["small"], pair["large"], pair["tok"], pair["prompts"],
                      **{**tiny.SHORT, **kw})
    s = loop.write(loop.begin(s), loop.sides[SMALL])
    at = np.isin(np.arange(B), eos)
    trace = dataclasses.replace(s.trace, ended_by=jnp.where(at, sampler.EOS, s.trace.ended_by))
    return loop, dataclasses.replace(s, trace=trace)


def _direct(conf, among):
    """The EM on exactly `among`'s confidences (test_gmm checks it against scikit-learn)."""
    return gmm.fit(jnp.asarray(conf)[None], jnp.asarray(among)[None])


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


@pytest.mark.parametrize("rule", ["running", "running_and_ended"])
def test_finish_fits_over_the_traces_that_go_on_unless_asked_to_keep_the_ended(pair, rule):
    loop, s = _written(pair, eos=(0, 3), refine="none", fit_over=rule, min_fit_traces=1)
    conf = np.asarray(s.trace.conf)
    done = loop.finish(s)
    going_on = np.asarray(done.trace.running)
    assert not going_on[[0, 3]].any() and going_on.sum() >= 2
    assert [STOPS[i] for i in np.asarray(done.trace.stop)[[0, 3]]] == ["eos", "eos"]
    pool = going_on if rule == "running" else np.ones(B, bool)
    fit = done.fits[-1]
    np.testing.assert_array_equal(np.asarray(fit.among), pool)
    direct = _direct(conf, pool)
    _same(fit.params, direct)
    # The ended steps are still scored: under the fit, whether or not they took part in it.
    # A posterior far in a tail (6.6e-5: a log-odds near -9.6) is the exp of a float32 whose
    # last bit is ~1e-6 of it, and XLA's exp differs by an ulp between two programs: so an
    # absolute floor of 1e-9 on a probability besides the relative 1e-6.
    np.testing.assert_allclose(np.asarray(done.trace.rec_post[:, 0]),
                               np.asarray(gmm.posterior_confident(direct, conf[None]))[0],
                               rtol=1e-6, atol=1e-9)


def test_a_draft_that_would_end_its_trace_is_judged_among_the_drafts(pair):
    """Under check nothing has ended yet: the mixture judges whether each draft is kept."""
    loop, s = _written(pair, eos=(0, 3), refine="first")
    checked = loop.check(s)
    fit = checked.fits[-1]
    assert fit.who == "small-draft"
    np.testing.assert_array_equal(np.asarray(fit.among), np.ones(B, bool))
    _same(fit.params, _direct(s.trace.conf, np.ones(B, bool)))


def test_few_survivors_keep_the_last_fit_made_on_enough(pair):
    loop, s = _written(pair, refine="none", min_fit_traces=5)
    conf = np.asarray(s.trace.conf)
    few, six = np.arange(B) < 3, np.arange(B) < 6
    s, first, _ = loop.fit(s, s.trace.running, "all")
    assert np.asarray(s.fits[-1].kept_from).tolist() == [-1]
    # Three traces, fewer than 5: round 1 routes under round 0's fit, posteriors included.
    s, kept, post = loop.fit(dataclasses.replace(s, round=1), jnp.asarray(few), "all")
    _same(kept, first)
    np.testing.assert_allclose(np.asarray(post),
                               np.asarray(gmm.posterior_confident(first, conf[None]))[0],
                               rtol=1e-6)
    assert np.asarray(s.fits[-1].kept_from).tolist() == [0]
    # Kept again in round 2, it still names the round it was fitted in.
    s, again, _ = loop.fit(dataclasses.replace(s, round=2), jnp.asarray(few), "all")
    _same(again, first)
    assert np.asarray(s.fits[-1].kept_from).tolist() == [0]
    # Six traces are enough: refitted on them.
    s, fresh, _ = loop.fit(s, jnp.asarray(six), "all")
    _same(fresh, _direct(conf, six))
    assert np.asarray(s.fits[-1].kept_from).tolist() == [-1]
    # Another kind of fit has no earlier fit of its own: it is fitted on the three it has.
    s, draft, _ = loop.fit(s, jnp.asarray(few), "small-draft")
    _same(draft, _direct(conf, few))
    assert np.asarray(s.fits[-1].kept_from).tolist() == [-1]


def test_a_round_checkpoint_keeps_which_fits_were_kept(pair, tmp_path):
    from steer_jax import store

    loop, s = _written(pair, refine="none", min_fit_traces=5)
    s, _, _ = loop.fit(s, s.trace.running, "all")
    s, _, _ = loop.fit(dataclasses.replace(s, round=1), jnp.asarray(np.arange(B) < 3), "all")
    s = dataclasses.replace(s, round=2, within=None)
    cfg, _ = validate({"small": str(pair["small_dir"]), "large": str(pair["large_dir"]),
                       "benchmark": {"name": "math500"}})
    rounds = store.RoundCheckpoint(tmp_path, 0, range(0, B), 1, cfg, None)
    rounds(s)
    back = rounds._restore(rounds.dir / "round_00002")
    assert [np.asarray(f.kept_from).tolist() for f in back.fits] == [[-1], [0]]
    for a, b in zip(s.fits, back.fits):
        _same(a.params, b.params)


def test_min_fit_traces_one_refits_every_pool(pair):
    loop, s = _written(pair, refine="none", min_fit_traces=1)
    few = jnp.asarray(np.arange(B) < 3)
    s, _, _ = loop.fit(s, s.trace.running, "all")
    s, refit, _ = loop.fit(dataclasses.replace(s, round=1), few, "all")
    _same(refit, _direct(s.trace.conf, few))


def test_each_group_keeps_or_refits_on_its_own(pair):
    loop, s = _written(pair, refine="none", groups=2, min_fit_traces=3)
    conf, group = np.asarray(s.trace.conf), np.asarray(loop.group)
    s, first, _ = loop.fit(s, s.trace.running, "all")
    pool = np.isin(np.arange(B), [0, 1, 4, 5, 6])
    assert [int((pool & (group == g)).sum()) for g in (0, 1)] == [2, 3]
    s, mixed, post = loop.fit(dataclasses.replace(s, round=1), jnp.asarray(pool), "all")
    assert np.asarray(s.fits[-1].kept_from).tolist() == [0, -1]
    _same(jax.tree.map(lambda x: x[0], mixed), jax.tree.map(lambda x: x[0], first))
    fresh = _direct(conf, pool & (group == 1))
    _same(jax.tree.map(lambda x: x[1:], mixed), fresh)
    want = np.where(group == 0,
                    np.asarray(gmm.posterior_confident(first, np.stack([conf, conf])))[0],
                    np.asarray(gmm.posterior_confident(fresh, conf[None]))[0])
    np.testing.assert_allclose(np.asarray(post), want, rtol=1e-6)


def test_rounds_jsonl_records_the_pool_and_the_fit_kept(pair, shared_data, tmp_path):
    """No trace runs after the last round: its pool is empty, and it keeps an earlier fit."""
    steer = {k: v for k, v in tiny.SHORT.items() if k not in ("temperature", "seed")}
    cfg = {"small": str(pair["small_dir"]), "large": str(pair["large_dir"]), "dtype": "float32",
           "benchmark": {"name": "math500", "path": str(shared_data / "math500"), "limit": 3},
           "steer": {**steer, "refine": "none", "min_fit_traces": 2}}
    run(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    traces = [json.loads(x) for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    by_round = {m["round"]: m for m in lines}
    assert len(by_round) == len(lines)  # one "all" fit a round, one group
    for m in lines:
        # n: the traces whose step ended in the round and that go on to another step.
        assert m["n"] == len(m["confidences"]) == sum(len(t["steps"]) > m["round"] + 1
                                                      for t in traces)
        if m["n"] >= 2:
            assert m["kept_from"] is None
    last = lines[-1]
    assert last["n"] == 0 and last["kept_from"] is not None
    source = by_round[last["kept_from"]]
    assert source["n"] >= 2 and source["kept_from"] is None
    for key in ("weights", "means", "variances"):
        assert last[key] == source[key]


def test_continuous_keeps_fits_for_few_survivors(pair):
    res = tiny.run(pair, schedule="continuous", chunk=4, min_fit_traces=4)
    mixtures = {(m.round, m.model): m for m in res.mixtures}
    kept = [m for m in res.mixtures if m.kept_from is not None]
    assert kept and all(m.n < 4 for m in kept)
    for m in kept:
        source = mixtures[(m.kept_from, m.model)]
        assert source.n >= 4 and source.kept_from is None
        assert (m.weights, m.means, m.variances) == (source.weights, source.means,
                                                     source.variances)


@pytest.mark.parametrize("bad, match", [
    (dict(fit_over="ended"), "steer.fit_over must be one of"),
    (dict(min_fit_traces=0), "steer.min_fit_traces must be >= 1"),
    (dict(min_fit_traces=2.5), "steer.min_fit_traces must be an integer"),
    (dict(min_fit_traces=True), "steer.min_fit_traces must be an integer"),
])
def test_bad_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        SteerOptions(**bad)


def test_config_keys_reach_the_options():
    base = {"small": "s", "large": "l", "benchmark": {"name": "demo"}}
    _, opts = validate(base)
    assert (opts.fit_over, opts.min_fit_traces) == ("running", 16)
    _, opts = validate({**base, "steer": {"fit_over": "running_and_ended", "min_fit_traces": 1}})
    assert (opts.fit_over, opts.min_fit_traces) == ("running_and_ended", 1)
    with pytest.raises(RunConfigError, match="steer.min_fit_traces must be >= 1"):
        validate({**base, "steer": {"min_fit_traces": 0}})
