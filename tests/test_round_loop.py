"""The round loop's phases, one at a time: each takes a `RoundState` and returns the next, and
each is checked against what the whole loop (or an independent reference) gives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from steer_jax import steer
from steer_jax.calls import ENDED, LARGE, SMALL
from steer_jax.routing import gmm
from steer_jax.steer import prepare


def _loop(pair, **kw):
    opts = {**tiny.SHORT, **kw}
    return prepare(pair["small"], pair["large"], pair["tok"], pair["prompts"], **opts)


def test_small_write_alone_is_the_runs_first_step(pair):
    loop, s = _loop(pair, refine="none")
    s = loop.write(loop.begin(s), loop.sides[SMALL])
    trace = s.trace
    assert bool(jnp.all(trace.author == ENDED)) and bool(jnp.all(trace.writer == SMALL))
    whole = steer(pair["small"], pair["large"], pair["tok"], pair["prompts"], refine="none",
                  **tiny.SHORT)
    for b, t in enumerate(whole.traces):
        start, end = int(trace.prompt_len[b]), int(trace.total[b])
        assert np.asarray(trace.tokens[b, start:end]).tolist() == t.tokens[: t.steps[0].tokens]
        assert float(trace.conf[b]) == pytest.approx(t.steps[0].confidence, rel=1e-6)
    # The large model wrote nothing and read nothing: its cache is still empty.
    assert int(jnp.max(s.caches[LARGE].length)) == 0 and s.within.calls >= 1


def test_fit_alone_is_the_mixture_of_the_confidences_and_route_ranks_them(pair):
    loop, s = _loop(pair, refine="none", policy="percentile", percentile=0.5)
    s = loop.write(loop.begin(s), loop.sides[SMALL])
    everyone = s.trace.running
    s, params, post = loop.fit(s, everyone, "all")
    assert len(s.fits) == 1 and s.fits[0].who == "all" and s.fits[0].round == 0
    # The same EM on the same confidences, called directly (test_gmm checks it against
    # scikit-learn).
    conf = s.trace.conf[None, :]
    direct = gmm.fit(conf, everyone[None, :])
    np.testing.assert_allclose(np.asarray(params.means), np.asarray(direct.means), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(post),
                               np.asarray(gmm.posterior_confident(direct, conf))[0], rtol=1e-6)
    routed = np.asarray(loop.route(s.trace.conf, everyone, params))
    # floor(0.5 * 8): the four lowest confidences go to the large model.
    assert routed.sum() == len(pair["prompts"]) // 2
    assert routed[np.argsort(np.asarray(s.trace.conf))[: routed.sum()]].all()


def test_discard_alone_rolls_every_step_back(pair):
    loop, s = _loop(pair, refine="none")
    before = s
    s = loop.write(loop.begin(s), loop.sides[SMALL])
    written = np.asarray(s.trace.total - before.trace.total)
    assert (written > 0).all()
    s = loop.discard(s, s.trace.running)
    np.testing.assert_array_equal(np.asarray(s.trace.total), np.asarray(before.trace.total))
    np.testing.assert_array_equal(np.asarray(s.trace.discarded), written)
    # The small cache holds the prompt but its last token, pending again.
    np.testing.assert_array_equal(np.asarray(s.caches[SMALL].length),
                                  np.asarray(before.trace.total) - 1)


def test_finish_alone_records_each_step_and_routes_by_the_policy(pair):
    loop, s = _loop(pair, refine="none", policy="percentile", percentile=0.5)
    s = loop.write(loop.begin(s), loop.sides[SMALL])
    done = loop.finish(s)
    assert done.round == 1 and done.within is None and len(done.fits) == 1
    rec = np.asarray(done.trace.rec_model[:, 0])
    assert (rec == SMALL).all()
    np.testing.assert_allclose(np.asarray(done.trace.rec_conf[:, 0]), np.asarray(s.trace.conf))
    to_large = np.asarray(done.trace.author) == LARGE
    ranked = loop.route(s.trace.conf, s.trace.running, done.routing)
    np.testing.assert_array_equal(to_large, np.asarray(ranked) & np.asarray(done.trace.running))
    # The state is a value: the one finish began from is unchanged.
    assert s.round == 0 and s.within is not None and int(s.trace.rec_model[0, 0]) < 0
