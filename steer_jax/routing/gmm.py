"""Two-component 1-D Gaussian mixture fitted by EM on device: STEER's confidence calibration.

Every round STEER refits a two-component mixture over the step confidences of the traces that are
still running and routes on the posterior of the confident (higher-mean) component. This module
does that fit inside one jitted ``lax.while_loop``, vectorized over any number of leading group
axes, with a mask for finished traces. Nothing comes back to the host.

Shapes: ``scores`` is ``[..., n]``; every leading index is an independent group. The result holds
``weights``, ``means`` and ``variances`` of shape ``[..., 2]``, components sorted by mean, so index
1 is the confident component of the paper's equation (9).

Numerics, and why:

* Standardization. Each group is first scaled by a power of two (exact, so no rounding is added)
  to keep squares from overflowing, then centred on its mean and divided by its standard
  deviation (two passes: raw max-logit confidences sit near 20-30 with a spread of 1, and a
  one-pass ``E[x^2] - E[x]^2`` in float32 would lose most digits). EM runs in these units and the
  result is mapped back, which makes the fit invariant to shift and scale and lets ``reg`` and
  ``tol`` be relative quantities.
* Variance floor. Each component's variance is floored at ``reg`` times the group's variance
  (default 1e-6, the magnitude of scikit-learn's ``reg_covar`` for unit-variance data). It keeps
  a component from collapsing onto one point into an infinite likelihood, while binding only for
  components a thousand times narrower than the data.
* Log domain. With two components the responsibilities are a logistic function of the log-odds
  ``d = log(pi_1 N_1) - log(pi_0 N_0)``: ``r_1 = sigmoid(d)``, ``r_0 = sigmoid(-d)`` (each computed
  directly, so a rare component's tiny responsibilities do not cancel), and the per-point
  log-likelihood is ``log(pi_0 N_0) + softplus(d)``. Nothing is exponentiated before a ratio is
  taken, so distant points never underflow both densities into 0/0.
* One pass per iteration. The M-step statistics are accumulated around the current means
  (``sum r (z - mu)``, ``sum r (z - mu)^2``), so the new variance is
  ``E_r[(z - mu)^2] - (mu' - mu)^2`` with ``mu' - mu`` small near convergence: no cancellation,
  and the E-step, M-step sums and the log-likelihood share one fused read of the data. A
  component weight is floored at the smallest normal float so that its logarithm stays finite.
* Initialization (deterministic). Split at the group mean, then ``init_iters`` Lloyd (2-means)
  iterations that move the split to the midpoint of the two cluster means; weights, means and
  variances start at the two clusters' fractions, means and floored variances. This is
  scikit-learn's k-means start without its random seeding, and needs no sort (a sort of a million
  floats costs more on CPU than the whole EM).
* Convergence. A group stops when its mean log-likelihood (standardized units) changes by at most
  ``tol`` between two iterations, or after ``max_iters``. A stopped group is frozen while others
  continue, so a batched fit gives the same answer as separate fits. ``n_iters`` and
  ``converged`` report what happened per group.

Exclusions and degenerate groups:

* Masked entries (``mask`` False) and non-finite scores take no part at all: they are replaced
  by zeros before any arithmetic and carry weight zero. Non-finite scores inside the mask are
  counted in ``n_invalid``; ``n_valid`` counts the points actually fitted.
* A group is degenerate when it has fewer than 2 valid points, or when its spread is nil: a
  standard deviation at most 1e-6 of its mean's magnitude (below float32's resolution for the
  data) or at most 1e-15 absolute. All-equal values and everything masked are such groups. Its
  result is the defined one-component mixture ``weights = [0, 1]``, ``means = [m, m]`` (``m`` the
  mean of the valid points, 0 when there are none), ``variances = [1, 1]`` (a placeholder: with
  ``weights[0] == 0`` nothing depends on it but the likelihood), ``degenerate = True``. Its
  posterior is exactly 1 everywhere: without two distinguishable confidence levels there is no
  evidence that any trace is unconfident, so a threshold ``gamma < 1`` routes nothing on
  degeneracy alone.
* The posterior of a non-finite score is 0 (log-odds ``-inf``): a NaN or infinite confidence
  means something broke, and the conservative choice is to let the large model write the step.
  Far-out finite scores are clipped to 1e12 standard deviations before squaring, so the
  posterior is never 0/0 or inf - inf. Like the paper's equation (9), a score far beyond both
  means belongs to the wider component: far to the right it can be "unconfident" if that
  component is the wider one.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["GMMParams", "fit", "log_odds_confident", "posterior_confident", "log_likelihood"]

_LOG_2PI = math.log(2.0 * math.pi)
# Relative spread under which a group counts as all-equal: float32 carries ~7 digits, so below
# this the differences are rounding noise, not signal.
_REL_SPREAD = 1e-6
# Absolute spread under which a group counts as all-equal: keeps variance * reg a normal float32.
_ABS_SPREAD = 1e-15
# Far-out scores are clipped (in component-std units) so that squares stay finite in float32.
_Z_CLIP = 1e12
# Bounds on an extrapolated SQUAREM point (standardized units): they only keep exp() finite; any
# jump that reaches them is rejected by the likelihood check anyway.
_MAX_LOGIT = 80.0
_MAX_MEAN = 1e6
_MAX_LOGVAR = 20.0
_MAX_STEP = 1e3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMParams:
    """A fitted two-component mixture per group; leading axes ``[...]`` are the groups.

    Attributes:
      weights: ``[..., 2]`` mixing weights, summing to 1.
      means: ``[..., 2]`` component means, ascending: index 1 is the confident component.
      variances: ``[..., 2]`` component variances, positive and finite.
      n_valid: ``[...]`` int32, points that took part in the fit (in the mask and finite).
      n_invalid: ``[...]`` int32, points in the mask that were excluded for being non-finite.
      n_iters: ``[...]`` int32, EM iterations (M-steps) performed for the group.
      converged: ``[...]`` bool, whether the log-likelihood tolerance was met within
        ``max_iters`` (True for degenerate groups, which need no iterations).
      degenerate: ``[...]`` bool, fewer than two valid points or no spread; see the module
        docstring for the defined mixture returned then.
    """

    weights: Array
    means: Array
    variances: Array
    n_valid: Array
    n_invalid: Array
    n_iters: Array
    converged: Array
    degenerate: Array


def _float_dtype(x: Array) -> jnp.dtype:
    # bfloat16/float16 confidences are widened: EM sums need at least float32.
    return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _em_stats(z: Array, w: Array, lw: Array, mu: Array, var: Array):
    """One fused pass: log-likelihood and M-step sums around the current means.

    z, w: [..., n]; lw, mu, var: [..., 2]. Returns ll [...], and nk, sk, qk [..., 2].
    """
    dz0 = z - mu[..., 0:1]
    dz1 = z - mu[..., 1:2]
    sq0 = dz0 * dz0
    sq1 = dz1 * dz1
    c = lw - 0.5 * (_LOG_2PI + jnp.log(var))  # [..., 2]
    lp0 = c[..., 0:1] - 0.5 * sq0 / var[..., 0:1]
    lp1 = c[..., 1:2] - 0.5 * sq1 / var[..., 1:2]
    d = lp1 - lp0
    r1 = w * jax.nn.sigmoid(d)
    r0 = w * jax.nn.sigmoid(-d)
    ll = jnp.sum(w * (lp0 + jax.nn.softplus(d)), axis=-1)
    nk = jnp.stack([jnp.sum(r0, -1), jnp.sum(r1, -1)], -1)
    sk = jnp.stack([jnp.sum(r0 * dz0, -1), jnp.sum(r1 * dz1, -1)], -1)
    qk = jnp.stack([jnp.sum(r0 * sq0, -1), jnp.sum(r1 * sq1, -1)], -1)
    return ll, nk, sk, qk


def _m_step(nk: Array, sk: Array, qk: Array, mu: Array, nv: Array, reg: float, tiny: float):
    nk_safe = jnp.maximum(nk, tiny)
    shift = sk / nk_safe
    new_mu = mu + shift
    new_var = jnp.maximum(qk / nk_safe - shift * shift, reg)
    new_lw = jnp.log(jnp.maximum(nk / nv[..., None], tiny))
    return new_lw, new_mu, new_var


def _pack(lw: Array, mu: Array, var: Array) -> Array:
    """Unconstrained per-group vector [log-odds of weight 1, mu_0, mu_1, log var_0, log var_1]."""
    return jnp.concatenate([(lw[..., 1] - lw[..., 0])[..., None], mu, jnp.log(var)], -1)


def _unpack(u: Array):
    a = u[..., 0:1]
    lw = jnp.concatenate([-jax.nn.softplus(a), -jax.nn.softplus(-a)], -1)
    return lw, u[..., 1:3], jnp.exp(u[..., 3:5])


def _lloyd_init(z: Array, w: Array, init_iters: int, reg: float, tiny: float):
    """Deterministic 2-means start from a split at the mean (z is centred, so at 0)."""

    def cluster_stats(t):
        lo = w * (z < t[..., None]).astype(z.dtype)
        hi = w - lo
        n_lo, n_hi = jnp.sum(lo, -1), jnp.sum(hi, -1)
        m_lo = jnp.sum(lo * z, -1) / jnp.maximum(n_lo, tiny)
        m_hi = jnp.sum(hi * z, -1) / jnp.maximum(n_hi, tiny)
        return n_lo, n_hi, m_lo, m_hi, lo, hi

    def body(_, t):
        _, _, m_lo, m_hi, _, _ = cluster_stats(t)
        return 0.5 * (m_lo + m_hi)

    t0 = jnp.zeros(z.shape[:-1], z.dtype)
    t = lax.fori_loop(0, init_iters, body, t0)
    n_lo, n_hi, m_lo, m_hi, lo, hi = cluster_stats(t)
    v_lo = jnp.sum(lo * (z - m_lo[..., None]) ** 2, -1) / jnp.maximum(n_lo, tiny)
    v_hi = jnp.sum(hi * (z - m_hi[..., None]) ** 2, -1) / jnp.maximum(n_hi, tiny)
    n = jnp.maximum(n_lo + n_hi, 1.0)
    lw = jnp.log(jnp.maximum(jnp.stack([n_lo, n_hi], -1) / n[..., None], tiny))
    mu = jnp.stack([m_lo, m_hi], -1)
    var = jnp.maximum(jnp.stack([v_lo, v_hi], -1), reg)
    return lw, mu, var


def fit(
    scores: Array,
    mask: Array | None = None,
    *,
    max_iters: int = 1000,
    tol: float = 1e-6,
    reg: float = 1e-6,
    init_iters: int = 5,
) -> GMMParams:
    """Fits a two-component 1-D Gaussian mixture per group by EM; jittable, shardable.

    Args:
      scores: ``[..., n]`` step confidences; leading axes are independent groups.
      mask: optional boolean, broadcastable to ``scores``; False entries (finished traces) have
        no influence at all. Non-finite scores are excluded as well and counted in ``n_invalid``.
      max_iters: cap on EM iterations per group.
      tol: stop a group once its mean log-likelihood (in standardized units) changes by at most
        this much between iterations.
      reg: variance floor, relative to the group's variance.
      init_iters: Lloyd iterations of the deterministic 2-means initialization.

    Returns:
      ``GMMParams`` with ``[..., 2]`` weights, means, variances sorted by mean (index 1 is the
      confident component) and per-group diagnostics. See the module docstring for degenerate
      groups.
    """
    x = jnp.asarray(scores)
    dtype = _float_dtype(x)
    x = x.astype(dtype)
    finfo = jnp.finfo(dtype)
    tiny = float(finfo.tiny)
    m_in = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    finite = jnp.isfinite(x)
    sel = m_in & finite
    n_invalid = jnp.sum(m_in & ~finite, axis=-1, dtype=jnp.int32)
    n_valid = jnp.sum(sel, axis=-1, dtype=jnp.int32)
    w = sel.astype(dtype)
    nv = jnp.maximum(n_valid, 1).astype(dtype)
    x0 = jnp.where(sel, x, 0)

    # Power-of-two prescale: exact, and keeps the squares below from overflowing.
    amax = jnp.max(jnp.abs(x0), axis=-1)
    pow2 = jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(amax > 0, amax, 1)))), 1).astype(dtype)
    xs = x0 / pow2[..., None]
    m = jnp.sum(xs, axis=-1) / nv
    dev = jnp.where(sel, xs - m[..., None], 0)
    s = jnp.sqrt(jnp.sum(dev * dev, axis=-1) / nv)
    loc = m * pow2
    scale = s * pow2
    degenerate = (n_valid < 2) | ~(s > _REL_SPREAD * jnp.abs(m)) | ~(scale > _ABS_SPREAD)
    z = dev / jnp.where(degenerate, 1, s)[..., None]

    lw, mu, var = _lloyd_init(z, w, init_iters, reg, tiny)
    u = _pack(lw, mu, var)
    u_lo = jnp.array([-_MAX_LOGIT, -_MAX_MEAN, -_MAX_MEAN, math.log(reg), math.log(reg)], dtype)
    u_hi = jnp.array([_MAX_LOGIT, _MAX_MEAN, _MAX_MEAN, _MAX_LOGVAR, _MAX_LOGVAR], dtype)

    def em(u):
        lw, mu, var = _unpack(u)
        ll, nk, sk, qk = _em_stats(z, w, lw, mu, var)
        return ll / nv, _pack(*_m_step(nk, sk, qk, mu, nv, reg, tiny))

    def cond(state):
        it, _, _, done, _ = state
        return (it * 3 < max_iters) & jnp.any(~done)

    def body(state):
        it, u0, prev, done, n_it = state
        ll0, u1 = em(u0)
        ll1, u2 = em(u1)
        # SQUAREM (Varadhan & Roland 2008, scheme S3): extrapolate along the EM path, then one
        # stabilizing EM step; fall back to plain EM when the jump does not beat it. Overlapping
        # or rare components make plain EM crawl for hundreds of steps along a ridge where the
        # per-step gain looks converged long before the fit is.
        r = u1 - u0
        v = u2 - u1 - r
        rn = jnp.sqrt(jnp.sum(r * r, -1, keepdims=True))
        vn = jnp.sqrt(jnp.sum(v * v, -1, keepdims=True))
        alpha = jnp.clip(-rn / jnp.where(vn > 0, vn, 1), -_MAX_STEP, -1.0)
        alpha = jnp.where(vn > 0, alpha, -1.0)
        uj = jnp.clip(u0 - 2 * alpha * r + alpha * alpha * v, u_lo, u_hi)
        llj, uj2 = em(uj)
        accept = (llj >= ll1)[..., None]
        u_next = jnp.where(accept, uj2, u2)
        done_now = done | (jnp.abs(ll0 - prev) <= tol)
        u_next = jnp.where(done_now[..., None], u0, u_next)
        prev = jnp.where(done, prev, ll0)
        n_it = n_it + 3 * (~done_now).astype(jnp.int32)
        return it + 1, u_next, prev, done_now, n_it

    batch = x.shape[:-1]
    state = (jnp.int32(0), u, jnp.full(batch, -jnp.inf, dtype), degenerate, jnp.zeros(batch, jnp.int32))
    _, u, _, done, n_it = lax.while_loop(cond, body, state)
    lw, mu, var = _unpack(u)

    weights = jnp.exp(lw)
    weights = weights / jnp.sum(weights, -1, keepdims=True)
    means = loc[..., None] + scale[..., None] * mu
    variances = jnp.minimum(jnp.square(scale)[..., None] * var, finfo.max)

    swap = (mu[..., 0] > mu[..., 1])[..., None]
    weights = jnp.where(swap, weights[..., ::-1], weights)
    means = jnp.where(swap, means[..., ::-1], means)
    variances = jnp.where(swap, variances[..., ::-1], variances)

    deg = degenerate[..., None]
    one_comp = jnp.array([0.0, 1.0], dtype)
    weights = jnp.where(deg, one_comp, weights)
    means = jnp.where(deg, jnp.where(n_valid > 0, loc, 0)[..., None], means)
    variances = jnp.where(deg, jnp.ones_like(variances), variances)

    return GMMParams(
        weights=weights,
        means=means,
        variances=variances,
        n_valid=n_valid,
        n_invalid=n_invalid,
        n_iters=n_it,
        converged=done,
        degenerate=degenerate,
    )


def _component_log_probs(params: GMMParams, scores: Array, clip: bool):
    """log(pi_k N_k(x)) for k = 0, 1, evaluated in units centred and scaled per group.

    Working in rescaled units keeps every intermediate finite for any finite score; clipping
    (for the log-odds only) bounds the squares of far-out scores.
    """
    x = jnp.asarray(scores)
    dtype = jnp.promote_types(_float_dtype(x), params.means.dtype)
    x = x.astype(dtype)
    mu = params.means.astype(dtype)[..., None, :]
    var = params.variances.astype(dtype)[..., None, :]
    lw = jnp.log(params.weights.astype(dtype))[..., None, :]
    c = 0.5 * (mu[..., 0] + mu[..., 1])  # [..., 1]
    sd = jnp.sqrt(jnp.max(var, axis=-1))  # [..., 1]
    sd = jnp.where(sd > 0, sd, 1)
    z = (jnp.where(jnp.isfinite(x), x, 0) - c) / sd  # [..., n]
    if clip:
        z = jnp.clip(z, -_Z_CLIP, _Z_CLIP)
    mz = (mu - c[..., None]) / sd[..., None]  # [..., 1, 2]
    vz = var / jnp.square(sd)[..., None]
    lp = lw - 0.5 * (_LOG_2PI + jnp.log(vz)) - 0.5 * jnp.square(z[..., None] - mz) / vz
    return lp[..., 0], lp[..., 1], jnp.log(sd), jnp.isfinite(x)


def log_odds_confident(params: GMMParams, scores: Array) -> Array:
    """``log P(confident | s) - log P(unconfident | s)``, shape of ``scores`` (``[..., n]``).

    ``+inf`` for degenerate groups (posterior exactly 1), ``-inf`` for non-finite scores
    (posterior 0). Policies threshold this rather than the posterior, so that a posterior that
    rounds to 1.0 in float32 still compares correctly against any ``gamma < 1``.
    """
    lp0, lp1, _, finite = _component_log_probs(params, scores, clip=True)
    d = lp1 - lp0
    return jnp.where(finite, d, -jnp.inf)


def posterior_confident(params: GMMParams, scores: Array) -> Array:
    """P(confident | s): the paper's equation (9), per score, shape of ``scores`` (``[..., n]``).

    ``pi_1 N(s | mu_1, var_1) / sum_k pi_k N(s | mu_k, var_k)`` with component 1 the higher-mean
    one; 1 for degenerate groups, 0 for non-finite scores. Never NaN.
    """
    return jax.nn.sigmoid(log_odds_confident(params, scores))


def log_likelihood(params: GMMParams, scores: Array, mask: Array | None = None) -> Array:
    """Mean log-likelihood per group, ``[...]``, over the finite scores in ``mask``.

    Comparable with scikit-learn's ``GaussianMixture.score``. A group without any valid score
    gets 0 (an empty mean, defined rather than NaN).
    """
    lp0, lp1, log_sd, finite = _component_log_probs(params, scores, clip=False)
    sel = finite if mask is None else finite & jnp.broadcast_to(jnp.asarray(mask, bool), finite.shape)
    ll = jnp.logaddexp(lp0, lp1) - log_sd
    n = jnp.sum(sel, axis=-1)
    total = jnp.sum(jnp.where(sel, ll, 0), axis=-1)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0)
