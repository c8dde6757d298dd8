"""Two-component 1-D Gaussian mixture fitted by EM on device: STEER's confidence calibration.

Every round STEER refits a two-component mixture over the step confidences of the traces that
are still running and routes on the posterior of the confident (higher-mean) component. ``fit``
does that inside one jitted computation (``lax.while_loop``s, nothing comes back to the host),
vectorized over any number of leading group axes, with a mask for finished traces, and it runs
unchanged on inputs sharded over the group axis or the score axis.

Shapes: ``scores`` is ``[..., n]``; every leading index is an independent group. The result holds
``weights``, ``means`` and ``variances`` of shape ``[..., 2]``, components sorted by mean, so index
1 is the confident component of the paper's equation (9).

Numerics, and why:

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
* Log domain. With two components, the responsibilities are logistic in the log-odds
  ``d = log(pi_1 N_1) - log(pi_0 N_0)``. One ``e = exp(-|d|)`` per point gives both (the larger is
  ``1 / (1 + e)``, the smaller ``e / (1 + e)``: never ``1 -`` the other, which would cancel for a
  rare component) and the log-likelihood ``max(lp_0, lp_1) + log1p(e)``. No density is
  exponentiated on its own, so far points never turn into 0/0.
* One read of the data per EM pass: the M-step sums are taken around the current means
  (``sum r (z - mu)``, ``sum r (z - mu)^2``), so the new variance ``E_r[(z - mu)^2] - (mu' - mu)^2``
  does not cancel, and the likelihood comes from the same pass. A component's weight is floored
  at the smallest normal float, so its logarithm stays finite.
* Deterministic initialization, robust to local maxima. EM for mixtures has local maxima that
  matter here (a rare unconfident component is exactly the case where a single start lands on
  the wrong one). The group is binned into ``explore_bins`` bins (each bin at its points' mean,
  carrying their variance and count, so the cost is independent of n); 17 hard splits at
  -3.2 ... 3.2 sd seed 17 starts; splits that leave fewer than max(2, 1%) of the points on one
  side are dropped (they seed spikes), except the split at the mean; all starts run 30 EM passes
  on the histogram side by side; the one with the best likelihood is then fitted on the data.
  On random mixtures this matches scikit-learn's best of 10 random restarts; no sort, no RNG.
* Acceleration and convergence. EM is accelerated with SQUAREM (two passes, an extrapolation
  along their path, a stabilizing pass that is kept only if it beats plain EM): overlapping and
  rare components otherwise crawl for hundreds of passes with per-pass gains that look
  converged. A group stops when its mean log-likelihood (standardized units) changes by at most
  ``tol`` from one cycle to the next, or after ``max_iters`` passes. A stopped group is frozen
  while the others continue, so a batched fit equals separate fits; ``n_iters`` and ``converged``
  say what happened per group.

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
# Beyond this distance (component-std units) the log-odds switch to the tail-stable expansion.
_TAIL_Z = 1e4
# SQUAREM cycle: two EM passes, an extrapolation, one stabilizing pass.
_PASSES_PER_CYCLE = 3
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
# From this many points per group on, the EM sums are taken as one stacked reduction: XLA:CPU
# then reads the data once instead of once per sum; below, kernel count rather than memory
# traffic is the cost, and separate sums win (benchmarks/gmm.py).
_STACK_FROM = 1024
# Histogram range for the exploration, in standard deviations of the group.
_HIST_RANGE = 8.0
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


def _em_stats(z: Array, w: Array, spread, lw: Array, mu: Array, var: Array):
    """One pass over the data: log-likelihood and M-step sums around the current means.

    z, w: [..., n]; spread: None, or [..., n] variances of binned points around z (added to the
    second moments only); lw, mu, var: [..., 2]. Returns ll [...], and nk, sk, qk [..., 2].
    """
    dz0 = z - mu[..., 0:1]
    dz1 = z - mu[..., 1:2]
    sq0 = dz0 * dz0
    sq1 = dz1 * dz1
    c = lw - 0.5 * (_LOG_2PI + jnp.log(var))  # [..., 2]
    h = -0.5 / var
    lp0 = c[..., 0:1] + h[..., 0:1] * sq0
    lp1 = c[..., 1:2] + h[..., 1:2] * sq1
    d = lp1 - lp0
    # One exp serves both responsibilities and the likelihood: with e = exp(-|d|) the larger
    # responsibility is 1 / (1 + e), the smaller e / (1 + e) (never 1 - the larger, which would
    # cancel for a rare component), and log(p0 + p1) = max(lp0, lp1) + log1p(e) (never
    # lp0 + softplus(d), which recovers lp1 as a difference of huge numbers when lp0 is far off).
    e = jnp.exp(-jnp.abs(d))
    big = w / (1 + e)
    small = e * big
    pos = d >= 0
    r1 = jnp.where(pos, big, small)
    r0 = jnp.where(pos, small, big)
    lli = w * (jnp.maximum(lp0, lp1) + jnp.log1p(e))
    if spread is not None:
        sq0_m, sq1_m = sq0 + spread, sq1 + spread
    else:
        sq0_m, sq1_m = sq0, sq1
    if z.shape[-1] >= _STACK_FROM:
        q = jnp.stack([r0, r1, r0 * dz0, r1 * dz1, r0 * sq0_m, r1 * sq1_m, lli], -2)
        t = jnp.sum(q, -1)
        ll = t[..., 6]
        nk, sk, qk = t[..., 0:2], t[..., 2:4], t[..., 4:6]
    else:
        ll = jnp.sum(lli, axis=-1)
        nk = jnp.stack([jnp.sum(r0, -1), jnp.sum(r1, -1)], -1)
        sk = jnp.stack([jnp.sum(r0 * dz0, -1), jnp.sum(r1 * dz1, -1)], -1)
        qk = jnp.stack([jnp.sum(r0 * sq0_m, -1), jnp.sum(r1 * sq1_m, -1)], -1)
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


def _split_candidates(z: Array, w: Array, spread: Array, thresholds: Array, var_floor: float, tiny: float):
    """Hard two-way splits of the standardized data at each threshold, as mixtures.

    z, w: [..., n]; thresholds: [K]. Returns lw, mu, var [..., K, 2] and the number of points on
    the smaller side, [..., K]. Each side's statistics are summed directly (not as the total
    minus the other side), so that an empty or tiny side is exactly that.
    """
    zz = z[..., None, :]
    lo = w[..., None, :] * (zz < thresholds[:, None]).astype(z.dtype)  # [..., K, n]
    hi = w[..., None, :] - lo

    def side(m):
        n = jnp.sum(m, -1)
        n_safe = jnp.maximum(n, tiny)
        mu = jnp.sum(m * zz, -1) / n_safe
        var = jnp.sum(m * (jnp.square(zz - mu[..., None]) + spread[..., None, :]), -1) / n_safe
        return n, mu, var

    n_lo, mu_lo, var_lo = side(lo)
    n_hi, mu_hi, var_hi = side(hi)
    n = jnp.stack([n_lo, n_hi], -1)
    total = jnp.maximum(n_lo + n_hi, 1.0)[..., None]
    lw = jnp.log(jnp.maximum(n / total, tiny))
    mu = jnp.stack([mu_lo, mu_hi], -1)
    var = jnp.maximum(jnp.stack([var_lo, var_hi], -1), var_floor)
    return lw, mu, var, jnp.minimum(n_lo, n_hi)


def _histogram(z: Array, w: Array, bins: int):
    """The standardized data of each group binned: [..., bins] means, counts, within-bin variances.

    The bins span the valid data's range clipped to +-_HIST_RANGE sd (farther outliers land in
    the edge bins). A bin sits at the mean of its points and carries their variance, so that EM
    on the histogram sees the spread of a wide edge bin instead of a spike. Moments are summed
    around the bin's centre, where they are small, so nothing cancels.
    """
    big = jnp.asarray(jnp.inf, z.dtype)
    valid = w > 0
    lo = jnp.maximum(jnp.min(jnp.where(valid, z, big), -1, initial=big), -_HIST_RANGE)
    hi = jnp.minimum(jnp.max(jnp.where(valid, z, -big), -1, initial=-big), _HIST_RANGE)
    ok = hi > lo
    lo = jnp.where(ok, lo, -1.0)
    hi = jnp.where(ok, hi, 1.0)
    width = (hi - lo) / bins
    idx = jnp.clip(jnp.floor((z - lo[..., None]) / width[..., None]), 0, bins - 1)
    dz = z - (lo[..., None] + (idx + 0.5) * width[..., None])
    moments = jnp.stack([w, w * dz, w * dz * dz], -1)  # [..., n, 3]
    batch, n = z.shape[:-1], z.shape[-1]
    groups = math.prod(batch)
    add = jax.vmap(lambda m, i: jnp.zeros((bins, 3), m.dtype).at[i].add(m))
    acc = add(moments.reshape(groups, n, 3), idx.astype(jnp.int32).reshape(groups, n))
    acc = acc.reshape(*batch, bins, 3)
    counts = acc[..., 0]
    safe = jnp.maximum(counts, 1)
    offset = acc[..., 1] / safe
    spread = jnp.maximum(acc[..., 2] / safe - offset * offset, 0)
    centre = lo[..., None] + (jnp.arange(bins, dtype=z.dtype) + 0.5) * width[..., None]
    return centre + offset, counts, spread, width


def _run_em(z, w, u, done, *, tol, max_passes, reg, tiny, spread=None):
    """SQUAREM-accelerated EM from several starts at once, in standardized units.

    z, w: [..., n]; u: [..., S, 5] starts; done: [..., S] starts not to run; reg: the variance
    floor, a float or [..., 1, 1]; spread: optional [..., n] (see ``_em_stats``). Returns the final
    u, the mean log-likelihood of each start's last evaluated point, done, and EM passes per start.

    SQUAREM (Varadhan & Roland 2008, scheme S3): two EM passes, an extrapolation along the path
    they trace, one stabilizing EM pass from the extrapolated point, which is kept only if it
    does at least as well as plain EM. Overlapping or rare components make plain EM crawl for
    hundreds of passes along a ridge where the per-pass gain looks converged long before the fit
    is. Each loop iteration is one EM pass, the phase (0, 1, 2) saying which point it starts
    from, so that the EM pass is traced and compiled once.
    """
    dtype = z.dtype
    zs, ws = z[..., None, :], w[..., None, :]
    sp = None if spread is None else spread[..., None, :]
    nv = jnp.maximum(jnp.sum(w, -1), 1)[..., None]
    u_lo = jnp.array([-_MAX_LOGIT, -_MAX_MEAN, -_MAX_MEAN, -_MAX_LOGVAR, -_MAX_LOGVAR], dtype)
    u_hi = jnp.array([_MAX_LOGIT, _MAX_MEAN, _MAX_MEAN, _MAX_LOGVAR, _MAX_LOGVAR], dtype)
    log_reg = jnp.log(jnp.asarray(reg, dtype))

    def em(u):
        lw, mu, var = _unpack(u)
        ll, nk, sk, qk = _em_stats(zs, ws, sp, lw, mu, var)
        return ll / nv, _pack(*_m_step(nk, sk, qk, mu, nv, reg, tiny))

    def extrapolate(u0, u1, u2):
        r = u1 - u0
        v = u2 - u1 - r
        rn = jnp.sqrt(jnp.sum(r * r, -1, keepdims=True))
        vn = jnp.sqrt(jnp.sum(v * v, -1, keepdims=True))
        alpha = jnp.clip(-rn / jnp.where(vn > 0, vn, 1), -_MAX_STEP, -1.0)
        alpha = jnp.where(vn > 0, alpha, -1.0)
        uj = jnp.clip(u0 - 2 * alpha * r + alpha * alpha * v, u_lo, u_hi)
        return jnp.concatenate([uj[..., :3], jnp.maximum(uj[..., 3:], log_reg)], -1)

    def cond(state):
        passes, _, _, _, _, _, _, done, _ = state
        return (passes < max_passes) & jnp.any(~done)

    def body(state):
        passes, u0, u1, u2, ll1, prev, phase, done, n_it = state
        start = jnp.where(phase == 0, u0, jnp.where(phase == 1, u1, extrapolate(u0, u1, u2)))
        ll, out = em(start)
        # Phase 0 evaluates the cycle's starting point: the convergence test, once per cycle.
        # A start whose likelihood went NaN is stopped and, in the caller, never chosen.
        bad = jnp.isnan(ll)
        done_now = jnp.where(phase == 0, done | bad | (jnp.abs(ll - prev) <= tol), done)
        prev = jnp.where((phase == 0) & ~done, jnp.where(bad, -jnp.inf, ll), prev)
        u1 = jnp.where(phase == 0, out, u1)
        u2 = jnp.where(phase == 1, out, u2)
        ll1 = jnp.where(phase == 1, ll, ll1)
        cycle_end = jnp.where((ll >= ll1)[..., None], out, u2)
        u0 = jnp.where((phase == 2) & ~done_now[..., None], cycle_end, u0)
        n_it = n_it + (~done_now).astype(jnp.int32)
        return passes + 1, u0, u1, u2, ll1, prev, (phase + 1) % _PASSES_PER_CYCLE, done_now, n_it

    minus_inf = jnp.full(done.shape, -jnp.inf, dtype)
    state = (jnp.int32(0), u, u, u, minus_inf, minus_inf, jnp.int32(0), done, jnp.zeros(done.shape, jnp.int32))
    _, u, _, _, _, ll, _, done, n_it = lax.while_loop(cond, body, state)
    return u, ll, done, n_it


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
    dtype = _float_dtype(x)
    x = x.astype(dtype)
    finfo = jnp.finfo(dtype)
    tiny = float(finfo.tiny)
    m_in = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    ok = _in_range(x)
    sel = m_in & ok
    n_invalid = jnp.sum(m_in & ~ok, axis=-1, dtype=jnp.int32)
    n_valid = jnp.sum(sel, axis=-1, dtype=jnp.int32)
    w = sel.astype(dtype)
    nv = jnp.maximum(n_valid, 1).astype(dtype)
    x0 = jnp.where(sel, x, 0)

    # Power-of-two prescale: exact, and keeps the squares below from overflowing.
    amax = jnp.max(jnp.abs(x0), axis=-1, initial=0)
    pow2 = jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(amax > 0, amax, 1)))), 1).astype(dtype)
    xs = x0 / pow2[..., None]
    m = jnp.sum(xs, axis=-1) / nv
    dev = jnp.where(sel, xs - m[..., None], 0)
    s = jnp.sqrt(jnp.sum(dev * dev, axis=-1) / nv)
    loc = m * pow2
    scale = s * pow2
    degenerate = (n_valid < 2) | ~(s > _REL_SPREAD * jnp.abs(m)) | ~(scale > _ABS_SPREAD)
    z = dev / jnp.where(degenerate, 1, s)[..., None]

    # Exploration on a histogram of the group (its size independent of n): every split
    # candidate runs a short EM, side by side; the best by likelihood is kept. Variances there
    # are floored at a bin's own width (Sheppard's correction) so that a full bin of equal
    # scores does not pass for a spike.
    z_e, w_e, spread_e, width = _histogram(z, w, explore_bins)
    reg_e = jnp.maximum(reg, jnp.square(width) / 12)[..., None, None]
    n_e = jnp.sum(w_e, -1)
    thresholds = jnp.asarray(_SPLITS, dtype)
    lw_c, mu_c, var_c, n_small = _split_candidates(z_e, w_e, spread_e, thresholds, max(reg, _INIT_VAR_FLOOR), tiny)
    # Splits that cut off only a point or two start EM at a spike; the central split (at the
    # mean) is always kept so that a non-degenerate group has at least one start.
    keep = (n_small >= jnp.maximum(_MIN_SIDE, _MIN_SIDE_FRAC * n_e)[..., None]) | (thresholds == 0)
    if init is not None:
        lw_c, mu_c, var_c, keep = _with_start(init, loc, scale, lw_c, mu_c, var_c, keep, reg)
    skip = ~keep | degenerate[..., None]
    u, ll, _, _ = _run_em(
        z_e, w_e, _pack(lw_c, mu_c, var_c), skip,
        tol=tol, max_passes=_EXPLORE_PASSES, reg=reg_e, tiny=tiny, spread=spread_e,
    )
    u0 = _best(u, jnp.where(skip | jnp.isnan(ll), -jnp.inf, ll))

    # The winner is then fitted to convergence on all valid points.
    u, _, done, n_it = _run_em(z, w, u0, degenerate[..., None], tol=tol, max_passes=max_iters, reg=reg, tiny=tiny)
    lw, mu, var = _unpack(u[..., 0, :])
    done, n_it = done[..., 0], n_it[..., 0]

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
    lp = lw[..., None, :] - 0.5 * (_LOG_2PI + jnp.log(vz[..., None, :]))
    lp = lp - 0.5 * jnp.square(z[..., None] - mz[..., None, :]) / vz[..., None, :]
    ll = jnp.logaddexp(lp[..., 0], lp[..., 1]) - log_sd[..., None]
    n = jnp.sum(sel, axis=-1)
    total = jnp.sum(jnp.where(sel, ll, 0), axis=-1)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0)
