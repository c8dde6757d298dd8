"""Two-component 1-D Gaussian mixture fitted by EM on device: STEER's confidence calibration.

Every round STEER refits a two-component mixture over the step confidences of the traces that
are still running and routes on the posterior of the confident (higher-mean) component. ``fit``
does that inside one jitted computation (``lax.while_loop``s, nothing comes back to the host),
vectorized over any number of leading group axes, with a mask for finished traces, and it runs
unchanged on inputs sharded over the group axis or the score axis.

Shapes: ``scores`` is ``[..., n]``; every leading index is an independent group. The result holds
``weights``, ``means`` and ``variances`` of shape ``[..., 2]``, components sorted by mean, so index
1 is the confident component of the paper's equation (9).

Numerics, and why (the EM passes themselves: routing/em.py):

* Standardization. Each group is scaled by a power of two (exact) so that no square overflows,
  then centred on its mean and divided by its standard deviation, in two passes (max-logit
  confidences sit near 20-30 with a spread of about 1, and a one-pass ``E[x^2] - E[x]^2`` in
  float32 would keep few digits). EM runs in these units and the result is mapped back: the fit
  is shift- and scale-equivariant, and ``reg`` and ``tol`` are relative quantities.
* Variance floor: ``reg`` (default 1e-6) times the group's variance, the magnitude of
  scikit-learn's ``reg_covar`` for unit-variance data. It stops a component from collapsing onto
  one point into an infinite likelihood and binds only for components a thousand times narrower
  (in sd) than the data. A component on a lone outlier still sits at the floor if that is the
  likelihood maximum, as in scikit-learn.
* Deterministic initialization, robust to local maxima. EM for mixtures has local maxima that
  matter here (a rare unconfident component is exactly the case where a single start lands on
  the wrong one). The group is binned into ``explore_bins`` bins (each bin at its points' mean,
  carrying their variance and count, so the cost is independent of n); 17 hard splits at
  -3.2 ... 3.2 sd seed 17 starts; splits that leave fewer than max(2, 1%) of the points on one
  side are dropped (they seed spikes), except the split at the mean; all starts run 30 EM passes
  on the histogram side by side; the one with the best likelihood is then fitted on the data.
  On random mixtures this matches scikit-learn's best of 10 random restarts; no sort, no RNG.
Exclusions and degenerate groups:

* Masked entries (``mask`` False) and invalid scores take no part at all: they are replaced by
  zeros before any arithmetic and carry weight zero. Invalid means non-finite, or beyond
  ``sqrt(float max) / 16`` (~1.2e18 in float32), whose squares the sums could not hold; those
  inside the mask are counted in ``n_invalid``; ``n_valid`` counts the points fitted.
* A group is degenerate when it has fewer than 2 valid points or no spread: a standard deviation
  at most 1e-6 of its mean's magnitude (float32 rounding, not signal) or at most 1e-15. All-equal
  scores and everything masked are such groups. The result is the defined one-component mixture
  ``weights = [0, 1]``, ``means = [m, m]`` (``m`` the mean of the valid points, 0 when there are
  none), ``variances = [1, 1]`` (a placeholder: with ``weights[0] == 0`` only the likelihood
  depends on it), ``degenerate = True``. Its posterior is exactly 1 everywhere: with no two
  distinguishable confidence levels there is no evidence that any trace is unconfident, so a
  threshold ``gamma < 1`` routes nothing on degeneracy alone (``gamma >= 1`` still routes all).
* The posterior of an invalid score is 0 (log-odds ``-inf``): a NaN or infinite confidence means
  something broke, and the conservative answer is to let the large model write the step. For
  finite scores the log-odds are computed in units centred between the means, with far tails
  clipped at 1e12 sd and expanded so that nearly equal huge squares do not cancel: never NaN.
  As in equation (9), a score far beyond both means belongs to the wider component, so far to
  the right it can be "unconfident" when that component is the wider one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from steer_jax.routing import em

Array = jax.Array

__all__ = ["GMMParams", "fit", "log_odds_confident", "posterior_confident", "log_likelihood"]

# Relative spread under which a group counts as all-equal: float32 carries ~7 digits, so below
# this the differences are rounding noise, not signal.
_REL_SPREAD = 1e-6
# Absolute spread under which a group counts as all-equal: keeps variance * reg a normal float32.
_ABS_SPREAD = 1e-15
# Far-out scores are clipped (in component-std units) so that squares stay finite in float32.
_Z_CLIP = 1e12
# Beyond this distance (component-std units) the log-odds switch to the tail-stable expansion.
_TAIL_Z = 1e4
# Thresholds (standardized units) of the hard splits that seed EM: the centre for balanced
# mixtures, out to 3.2 sd for a rare component in either tail. 0 (the mean) must be among them.
_SPLITS = tuple(round(0.4 * k, 6) for k in range(-8, 9))
# A split must leave this many points (and this fraction of the group) on its smaller side.
_MIN_SIDE = 2.0
_MIN_SIDE_FRAC = 0.01
# Starting variances are floored at this (standardized units), so that a candidate is ranked by
# how it splits the bulk, not by the spike bonus of a side that happens to be narrow.
_INIT_VAR_FLOOR = 1e-2
# EM passes each candidate start gets on the histogram before the best one is chosen.
_EXPLORE_PASSES = 30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMParams:
    """A fitted two-component mixture per group; leading axes ``[...]`` are the groups.

    Attributes:
      weights: ``[..., 2]`` mixing weights, summing to 1.
      means: ``[..., 2]`` component means, ascending: index 1 is the confident component.
      variances: ``[..., 2]`` component variances, positive and finite.
      n_valid: ``[...]`` int32, points that took part in the fit (in the mask and finite).
      n_invalid: ``[...]`` int32, points in the mask excluded as invalid (non-finite or out of
        range).
      n_iters: ``[...]`` int32, EM passes of the final fit over the data (the exploration on the
        histogram comes on top, a fixed budget).
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


def _in_range(x: Array) -> Array:
    """Finite and small enough that its square, summed, is representable: the scores a fit uses."""
    limit = math.sqrt(float(jnp.finfo(x.dtype).max)) / 16
    return jnp.isfinite(x) & (jnp.abs(x) <= limit)


def _with_start(init: GMMParams, loc: Array, scale: Array, lw_c: Array, mu_c: Array,
                var_c: Array, keep: Array, reg: float):
    """The candidate starts with `init` (mapped to the group's standardized units) appended; it
    takes part where it is a proper two-component fit with finite parameters."""
    w = jnp.asarray(init.weights, lw_c.dtype)
    safe = jnp.where(scale > 0, scale, 1)[..., None]
    mu = (jnp.asarray(init.means, mu_c.dtype) - loc[..., None]) / safe
    var = jnp.maximum(jnp.asarray(init.variances, var_c.dtype) / (safe * safe),
                      max(reg, _INIT_VAR_FLOOR))
    ok = (~init.degenerate & jnp.all(w > 0, -1) & jnp.all(jnp.isfinite(mu), -1)
          & jnp.all(jnp.isfinite(var), -1))
    lw = jnp.log(jnp.where(ok[..., None], w, 0.5))
    mu, var = jnp.where(ok[..., None], mu, 0), jnp.where(ok[..., None], var, 1)
    cat = lambda a, b: jnp.concatenate([a, b[..., None, :]], -2)  # noqa: E731
    return (cat(lw_c, lw), cat(mu_c, mu), cat(var_c, var),
            jnp.concatenate([keep, ok[..., None]], -1))


def _best(u: Array, ll: Array) -> Array:
    """The start with the highest likelihood (the first on ties), [..., 1, 5]."""
    best = jnp.argmax(ll, axis=-1)[..., None, None]
    return jnp.take_along_axis(u, best, axis=-2)


def fit(
    scores: Array,
    mask: Array | None = None,
    *,
    max_iters: int = 1000,
    tol: float = 1e-6,
    reg: float = 1e-6,
    explore_bins: int = 128,
    init: GMMParams | None = None,
) -> GMMParams:
    """Fits a two-component 1-D Gaussian mixture per group by EM; jittable, shardable.

    Args:
      scores: ``[..., n]`` step confidences; leading axes are independent groups.
      mask: optional boolean, broadcastable to ``scores``; False entries (finished traces) have
        no influence at all. Invalid scores (non-finite, or beyond ~1e18 in float32) are excluded
        as well and counted in ``n_invalid``.
      max_iters: cap on EM passes of the final fit, per group (counted in whole SQUAREM cycles
        of three passes).
      tol: stop once the mean log-likelihood (standardized units) changes by at most this much
        from one SQUAREM cycle to the next.
      reg: variance floor, relative to the group's variance.
      explore_bins: size of the histogram on which the candidate starts are explored.
      init: optional earlier fit of the same groups (``[..., 2]``); it joins the candidate starts,
        so a refit over data that moved a little starts where the last fit ended when that is
        still the best start, and cannot end worse than a fit without it.

    ``reg`` and ``explore_bins`` must be Python numbers (static under ``jax.jit``); ``max_iters``
    and ``tol`` may also be traced values.

    Returns:
      ``GMMParams`` with ``[..., 2]`` weights, means, variances sorted by mean (index 1 is the
      confident component) and per-group diagnostics. See the module docstring for degenerate
      groups.
    """
    x = jnp.asarray(scores)
    m_in = (jnp.ones(x.shape, bool) if mask is None
            else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape))
    g = _standardize(x.astype(_float_dtype(x)), m_in)
    u0 = _explore(g, reg, tol, explore_bins, init)
    # The winner is then fitted to convergence on all valid points.
    u, _, done, n_it = em.run_em(g.z, g.w, u0, g.degenerate[..., None], tol=tol,
                                 max_passes=max_iters, reg=reg, tiny=g.tiny)
    weights, means, variances = _mapped_back(g, u[..., 0, :])
    return GMMParams(weights=weights, means=means, variances=variances, n_valid=g.n_valid,
                     n_invalid=g.n_invalid, n_iters=n_it[..., 0], converged=done[..., 0],
                     degenerate=g.degenerate)


class _Standardized(NamedTuple):
    """A fit's data in standardized units, with what maps it back."""

    z: Array  # [..., n] (x - loc) / scale, 0 where excluded
    w: Array  # [..., n] 1 for the points fitted, else 0
    loc: Array  # [...]
    scale: Array  # [...]
    n_valid: Array
    n_invalid: Array
    degenerate: Array
    tiny: float


def _standardize(x: Array, m_in: Array) -> _Standardized:
    """Each group centred on its mean and divided by its spread, in two passes (a one-pass
    ``E[x^2] - E[x]^2`` in float32 keeps few digits of max-logit confidences near 20-30)."""
    dtype = x.dtype
    ok = _in_range(x)
    sel = m_in & ok
    n_valid = jnp.sum(sel, axis=-1, dtype=jnp.int32)
    nv = jnp.maximum(n_valid, 1).astype(dtype)
    x0 = jnp.where(sel, x, 0)
    # Power-of-two prescale: exact, and keeps the squares below from overflowing.
    amax = jnp.max(jnp.abs(x0), axis=-1, initial=0)
    pow2 = jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(amax > 0, amax, 1)))),
                     1).astype(dtype)
    xs = x0 / pow2[..., None]
    m = jnp.sum(xs, axis=-1) / nv
    dev = jnp.where(sel, xs - m[..., None], 0)
    s = jnp.sqrt(jnp.sum(dev * dev, axis=-1) / nv)
    loc, scale = m * pow2, s * pow2
    degenerate = (n_valid < 2) | ~(s > _REL_SPREAD * jnp.abs(m)) | ~(scale > _ABS_SPREAD)
    return _Standardized(z=dev / jnp.where(degenerate, 1, s)[..., None], w=sel.astype(dtype),
                         loc=loc, scale=scale, n_valid=n_valid,
                         n_invalid=jnp.sum(m_in & ~ok, axis=-1, dtype=jnp.int32),
                         degenerate=degenerate, tiny=float(jnp.finfo(dtype).tiny))


def _explore(g: _Standardized, reg: float, tol, bins: int, init: GMMParams | None) -> Array:
    """The best start, [..., 1, 5]: every split candidate (and `init`) runs a short EM side by
    side on a histogram of the group, whose size is independent of n. Variances there are
    floored at a bin's own width (Sheppard's correction) so that a full bin of equal scores does
    not pass for a spike."""
    z_e, w_e, spread_e, width = em.histogram(g.z, g.w, bins)
    reg_e = jnp.maximum(reg, jnp.square(width) / 12)[..., None, None]
    n_e = jnp.sum(w_e, -1)
    thresholds = jnp.asarray(_SPLITS, g.z.dtype)
    lw_c, mu_c, var_c, n_small = em.split_candidates(z_e, w_e, spread_e, thresholds,
                                                     max(reg, _INIT_VAR_FLOOR), g.tiny)
    # Splits that cut off only a point or two start EM at a spike; the central split (at the
    # mean) is always kept so that a non-degenerate group has at least one start.
    keep = (n_small >= jnp.maximum(_MIN_SIDE, _MIN_SIDE_FRAC * n_e)[..., None]) | (thresholds == 0)
    if init is not None:
        lw_c, mu_c, var_c, keep = _with_start(init, g.loc, g.scale, lw_c, mu_c, var_c, keep, reg)
    skip = ~keep | g.degenerate[..., None]
    u, ll, _, _ = em.run_em(z_e, w_e, em.pack(lw_c, mu_c, var_c), skip, tol=tol,
                            max_passes=_EXPLORE_PASSES, reg=reg_e, tiny=g.tiny, spread=spread_e)
    return _best(u, jnp.where(skip | jnp.isnan(ll), -jnp.inf, ll))


def _mapped_back(g: _Standardized, u: Array) -> tuple[Array, Array, Array]:
    """Weights, means, variances [..., 2] in the data's units, sorted by mean; degenerate groups
    get the defined one-component mixture."""
    lw, mu, var = em.unpack(u)
    weights = jnp.exp(lw)
    weights = weights / jnp.sum(weights, -1, keepdims=True)
    means = g.loc[..., None] + g.scale[..., None] * mu
    variances = jnp.minimum(jnp.square(g.scale)[..., None] * var, jnp.finfo(var.dtype).max)
    swap = (mu[..., 0] > mu[..., 1])[..., None]
    weights = jnp.where(swap, weights[..., ::-1], weights)
    means = jnp.where(swap, means[..., ::-1], means)
    variances = jnp.where(swap, variances[..., ::-1], variances)
    deg = g.degenerate[..., None]
    weights = jnp.where(deg, jnp.array([0.0, 1.0], weights.dtype), weights)
    means = jnp.where(deg, jnp.where(g.n_valid > 0, g.loc, 0)[..., None], means)
    variances = jnp.where(deg, jnp.ones_like(variances), variances)
    return weights, means, variances


def _rescaled(params: GMMParams, scores: Array):
    """Scores and components in units centred between the means and scaled by the wider sd.

    In these units every intermediate of a valid score stays finite; the squares of the original
    units would overflow float32 for spreads beyond ~1e19 and underflow below ~1e-19.
    """
    x = jnp.asarray(scores)
    dtype = jnp.promote_types(_float_dtype(x), params.means.dtype)
    x = x.astype(dtype)
    valid = _in_range(x)
    mu = params.means.astype(dtype)
    var = params.variances.astype(dtype)
    c = 0.5 * (mu[..., 0] + mu[..., 1])
    sd = jnp.sqrt(jnp.max(var, axis=-1))
    sd = jnp.where(sd > 0, sd, 1)
    z = (jnp.where(valid, x, 0) - c[..., None]) / sd[..., None]  # [..., n]
    mz = (mu - c[..., None]) / sd[..., None]  # [..., 2]
    vz = var / jnp.square(sd)[..., None]
    lw = jnp.log(params.weights.astype(dtype))
    return z, lw, mz, vz, jnp.log(sd), valid


def log_odds_confident(params: GMMParams, scores: Array) -> Array:
    """``log P(confident | s) - log P(unconfident | s)``, shape of ``scores`` (``[..., n]``).

    ``params`` fields have shape ``[..., 2]`` (one mixture per group), ``scores`` ``[..., n]``.
    ``+inf`` in degenerate groups (posterior exactly 1), ``-inf`` for invalid scores (posterior
    0). Policies threshold this rather than the posterior, so that a posterior that rounds to 1.0
    in float32 still compares correctly against any ``gamma < 1``.
    """
    z, lw, mz, vz, _, valid = _rescaled(params, scores)
    z = jnp.clip(z, -_Z_CLIP, _Z_CLIP)
    m0, m1 = mz[..., 0:1], mz[..., 1:2]
    v0, v1 = vz[..., 0:1], vz[..., 1:2]
    e0 = z - m0
    e1 = z - m1
    direct = e1 * e1 / v1 - e0 * e0 / v0
    # Far in a tail both squares are huge and nearly equal when the variances are: expanding
    # around e0 keeps the (exactly linear, for equal variances) difference instead of rounding
    # it away, so the far tail goes to the right component rather than to a coin flip.
    dm = m0 - m1
    tail = e0 * e0 * (1 / v1 - 1 / v0) + (2 * e0 * dm + dm * dm) / v1
    quad = jnp.where(jnp.abs(e0) > _TAIL_Z, tail, direct)
    d = (lw[..., 1:2] - lw[..., 0:1]) - 0.5 * (jnp.log(v1) - jnp.log(v0)) - 0.5 * quad
    # NaN only from parameters no fit returns (both weights 0); still never hand one out.
    return jnp.where(valid & ~jnp.isnan(d), d, -jnp.inf)


def posterior_confident(params: GMMParams, scores: Array) -> Array:
    """P(confident | s): the paper's equation (9), per score, shape of ``scores`` (``[..., n]``).

    ``pi_1 N(s | mu_1, var_1) / sum_k pi_k N(s | mu_k, var_k)`` with component 1 the higher-mean
    one; exactly 1 in degenerate groups, 0 for invalid scores. Never NaN.
    """
    return jax.nn.sigmoid(log_odds_confident(params, scores))


def log_likelihood(params: GMMParams, scores: Array, mask: Array | None = None) -> Array:
    """Mean log-likelihood per group, ``[...]``, over the valid scores in ``mask``.

    The same quantity as scikit-learn's ``GaussianMixture.score``. Invalid scores (non-finite or
    out of range) are left out, as in ``fit``; a group with no valid score gets 0 (an empty mean,
    defined rather than NaN).
    """
    z, lw, mz, vz, log_sd, valid = _rescaled(params, scores)
    sel = valid if mask is None else valid & jnp.broadcast_to(jnp.asarray(mask, bool), valid.shape)
    lp = lw[..., None, :] - 0.5 * (em.LOG_2PI + jnp.log(vz[..., None, :]))
    lp = lp - 0.5 * jnp.square(z[..., None] - mz[..., None, :]) / vz[..., None, :]
    ll = jnp.logaddexp(lp[..., 0], lp[..., 1]) - log_sd[..., None]
    n = jnp.sum(sel, axis=-1)
    total = jnp.sum(jnp.where(sel, ll, 0), axis=-1)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0)
