"""Routing policies: equation (10)'s posterior threshold, percentile routing, a fixed threshold."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from steer_jax.routing import gmm, policy

# Same function and shapes as tests/test_gmm.py, so the compiled fit is shared.
FIT = jax.jit(gmm.fit)
POSTERIOR = jax.jit(gmm.posterior_confident)
BY_POSTERIOR = jax.jit(policy.route_by_posterior)
BY_PERCENTILE = jax.jit(policy.route_by_percentile)
BY_THRESHOLD = jax.jit(policy.route_by_threshold)
G, N = 8, 1000


@pytest.fixture(scope="module")
def batch():
    """Eight groups of confidences: two-component mixtures, one all-equal group, some NaNs,
    ragged running masks, and the fit over the running traces."""
    rng = np.random.default_rng(0)
    c = rng.random((G, N)) < 0.3
    scores = np.where(c, rng.normal(22, 0.7, (G, N)), rng.normal(26, 1.2, (G, N))).astype(np.float32)
    scores[:, 0] = 31.0  # far in the (wider) confident tail: the posterior rounds to 1.0
    scores[3] = 24.0  # degenerate: posterior exactly 1
    scores[5, 1:8] = np.nan
    running = rng.random((G, N)) < np.linspace(0.2, 1.0, G)[:, None]
    running[:, 0] = True
    running[6] = False  # nothing running at all
    params = FIT(scores, running)
    return scores, running, params


def posterior64(params: gmm.GMMParams, scores: np.ndarray) -> np.ndarray:
    """Equation (9) in float64 from the fitted parameters: the independent reference."""
    w, mu, var = (np.asarray(a, np.float64)[:, None, :] for a in (params.weights, params.means, params.variances))
    s = scores.astype(np.float64)[..., None]
    with np.errstate(divide="ignore"):
        lp = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (s - mu) ** 2 / var
    d = lp[..., 1] - lp[..., 0]
    return np.where(np.isfinite(scores), 1 / (1 + np.exp(-d)), 0.0)


def test_gamma_zero_routes_nothing(batch):
    scores, running, params = batch
    assert not np.any(BY_POSTERIOR(params, scores, 0.0, running))


def test_gamma_one_routes_every_running_trace(batch):
    scores, running, params = batch
    post = np.asarray(POSTERIOR(params, scores))
    # The case that must not slip through: posteriors that are exactly 1.0 in float32, both from
    # rounding (far in the confident tail) and from a degenerate group.
    assert np.any((post == 1.0) & running & ~np.asarray(params.degenerate)[:, None])
    assert np.all(post[3] == 1.0)
    np.testing.assert_array_equal(BY_POSTERIOR(params, scores, 1.0, running), running)
    np.testing.assert_array_equal(BY_POSTERIOR(params, scores, 1.5, running), running)


@pytest.mark.parametrize("gamma", [0.05, 0.5, 0.95])
def test_posterior_threshold_is_equation_10(batch, gamma):
    scores, running, params = batch
    ref = posterior64(params, scores)
    route = np.asarray(BY_POSTERIOR(params, scores, gamma, running))
    clear = np.abs(ref - gamma) > 1e-5  # float32 parameters: leave a hair's width undecided
    np.testing.assert_array_equal(route[clear], (running & (ref < gamma))[clear])
    assert not np.any(route & ~running)
    assert not np.any(route[3])  # degenerate group: nothing routed below gamma = 1
    assert np.all(route[5, 1:8] == running[5, 1:8])  # NaN scores: posterior 0, routed
    assert 0 < route.sum() < running.sum()


def test_per_group_gamma(batch):
    scores, running, params = batch
    gammas = np.linspace(0.0, 1.0, G).astype(np.float32)
    route = np.asarray(BY_POSTERIOR(params, scores, gammas, running))
    for g in range(G):
        np.testing.assert_array_equal(route[g], np.asarray(BY_POSTERIOR(params, scores, gammas[g], running))[g])
    assert not route[0].any()
    np.testing.assert_array_equal(route[-1], running[-1])


def test_thresholds_near_one_match_exact_arithmetic():
    # log-odds d = 2 s exactly: components N(-1, 1) and N(1, 1), equal weights. Posteriors here
    # are within a few float32 ulps of 1; the decision must still be the exact one.
    params = gmm.GMMParams(
        weights=jnp.array([0.5, 0.5]),
        means=jnp.array([-1.0, 1.0]),
        variances=jnp.array([1.0, 1.0]),
        n_valid=jnp.int32(2),
        n_invalid=jnp.int32(0),
        n_iters=jnp.int32(0),
        converged=jnp.bool_(True),
        degenerate=jnp.bool_(False),
    )
    s = np.linspace(6.0, 9.0, 3001, dtype=np.float32)
    exact = 1 / (1 + np.exp(-2 * s.astype(np.float64)))
    for gamma in np.array([0.9999, 0.999999, 0.9999999, 0.99999994], np.float32):  # last: largest below 1
        want = exact < float(gamma)
        clear = np.abs(exact - float(gamma)) > 1e-11
        route = np.asarray(BY_POSTERIOR(params, s, gamma, None))
        np.testing.assert_array_equal(route[clear], want[clear], err_msg=str(gamma))


def reference_percentile(scores: np.ndarray, running: np.ndarray, p: float) -> np.ndarray:
    out = np.zeros(scores.shape, bool)
    for g in range(scores.shape[0]):
        idx = np.flatnonzero(running[g])
        k = int(Fraction(str(p)) * len(idx))  # floor of the exact product
        s = scores[g, idx]
        order = np.lexsort((idx, np.where(np.isnan(s), 0, s), ~np.isnan(s)))
        out[g, idx[order[:k]]] = True
    return out


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_percentile_routes_the_lowest_floor_p_n(batch, p):
    scores, running, _ = batch
    scores = scores.copy()
    scores[1, 10:60] = 25.0  # ties, broken by index
    scores[2, 5] = -np.inf
    scores[2, 6] = np.inf
    route = np.asarray(BY_PERCENTILE(scores, p, running))
    np.testing.assert_array_equal(route, reference_percentile(scores, running, p))
    np.testing.assert_array_equal(route.sum(-1), [int(Fraction(str(p)) * n) for n in running.sum(-1)])


def test_percentile_count_is_exact_floor():
    # 0.65 is one where plain float32 goes wrong: 0.65 * 180 comes out as 116.99999.
    ps = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1 / 3, 0.35, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99, 1.0]
    ns = np.arange(0, 2001)
    assert np.floor(np.float32(0.65) * np.float32(180)) == 116
    for p in ps:
        got = np.asarray(policy.percentile_count(p, ns))
        want = [int(Fraction(str(p)) * int(n)) if p != 1 / 3 else int(n) // 3 for n in ns]
        np.testing.assert_array_equal(got, want, err_msg=str(p))
    assert int(policy.percentile_count(0.1, 1)) == 0  # a budget, not "at least one"
    np.testing.assert_array_equal(policy.percentile_count(np.array([0.2, 0.5]), np.array([10, 10])), [2, 5])


def test_per_group_percentile(batch):
    scores, running, _ = batch
    ps = np.linspace(0.0, 1.0, G).astype(np.float32)
    route = np.asarray(BY_PERCENTILE(scores, ps, running))
    for g in range(G):
        np.testing.assert_array_equal(route[g], reference_percentile(scores[g : g + 1], running[g : g + 1], float(ps[g]))[0])


def test_fixed_threshold(batch):
    scores, running, _ = batch
    route = np.asarray(BY_THRESHOLD(scores, 24.0, running))
    np.testing.assert_array_equal(route, running & ~(scores >= 24.0))
    assert np.all(route[5, 1:8] == running[5, 1:8])  # NaN is below any threshold
    per_group = np.asarray(BY_THRESHOLD(scores, np.linspace(20, 28, G), running))
    for g, t in enumerate(np.linspace(20, 28, G)):
        np.testing.assert_array_equal(per_group[g], running[g] & ~(scores[g] >= np.float32(t)))


def test_route_steer_fits_over_running_traces(batch):
    scores, running, params = batch
    route, fitted = jax.jit(policy.route_steer)(scores, 0.5, running)
    np.testing.assert_array_equal(route, BY_POSTERIOR(params, scores, 0.5, running))
    np.testing.assert_allclose(fitted.means, params.means, rtol=1e-6)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_policies_on_sharded_groups(batch):
    scores, running, params = batch
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("x", None)))
    sharded_params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("x"))), params)
    np.testing.assert_array_equal(
        BY_POSTERIOR(sharded_params, put(scores), 0.5, put(running)), BY_POSTERIOR(params, scores, 0.5, running)
    )
    np.testing.assert_array_equal(BY_PERCENTILE(put(scores), 0.3, put(running)), BY_PERCENTILE(scores, 0.3, running))
