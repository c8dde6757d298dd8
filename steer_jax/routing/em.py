"""The EM engine behind ``gmm.fit``: passes, SQUAREM cycles and starts, in standardized units.

Every function works on standardized scores ``z`` with weights ``w`` (0 for points that take
no part), vectorized over leading group axes; ``gmm.fit`` standardizes, picks the starts and
maps the result back.

* Log domain. With two components, the responsibilities are logistic in the log-odds
  ``d = log(pi_1 N_1) - log(pi_0 N_0)``. One ``e = exp(-|d|)`` per point gives both (the larger is
  ``1 / (1 + e)``, the smaller ``e / (1 + e)``: never ``1 -`` the other, which would cancel for a
  rare component) and the log-likelihood ``max(lp_0, lp_1) + log1p(e)``. No density is
  exponentiated on its own, so far points never turn into 0/0.
* One read of the data per EM pass: the M-step sums are taken around the current means
  (``sum r (z - mu)``, ``sum r (z - mu)^2``), so the new variance ``E_r[(z - mu)^2] - (mu' - mu)^2``
  does not cancel, and the likelihood comes from the same pass. A component's weight is floored
  at the smallest normal float, so its logarithm stays finite.
* Acceleration and convergence. EM is accelerated with SQUAREM (two passes, an extrapolation
  along their path, a stabilizing pass that is kept only if it beats plain EM): overlapping and
  rare components otherwise crawl for hundreds of passes with per-pass gains that look
  converged. A group stops when its mean log-likelihood (standardized units) changes by at most
  ``tol`` from one cycle to the next, or after ``max_iters`` passes. A stopped group is frozen
  while the others continue, so a batched fit equals separate fits; ``n_iters`` and ``converged``
  say what happened per group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

LOG_2PI = math.log(2.0 * math.pi)
# SQUAREM cycle: two EM passes, an extrapolation, one stabilizing pass.
_PASSES_PER_CYCLE = 3
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


def em_stats(z: Array, w: Array, spread, lw: Array, mu: Array, var: Array):
    """One pass over the data: log-likelihood and M-step sums around the current means.

    z, w: [..., n]; spread: None, or [..., n] variances of binned points around z (added to the
    second moments only); lw, mu, var: [..., 2]. Returns ll [...], and nk, sk, qk [..., 2].
    """
    dz0 = z - mu[..., 0:1]
    dz1 = z - mu[..., 1:2]
    sq0 = dz0 * dz0
    sq1 = dz1 * dz1
    c = lw - 0.5 * (LOG_2PI + jnp.log(var))  # [..., 2]
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


def m_step(nk: Array, sk: Array, qk: Array, mu: Array, nv: Array, reg: float, tiny: float):
    nk_safe = jnp.maximum(nk, tiny)
    shift = sk / nk_safe
    new_mu = mu + shift
    new_var = jnp.maximum(qk / nk_safe - shift * shift, reg)
    new_lw = jnp.log(jnp.maximum(nk / nv[..., None], tiny))
    return new_lw, new_mu, new_var


def pack(lw: Array, mu: Array, var: Array) -> Array:
    """Unconstrained per-group vector [log-odds of weight 1, mu_0, mu_1, log var_0, log var_1]."""
    return jnp.concatenate([(lw[..., 1] - lw[..., 0])[..., None], mu, jnp.log(var)], -1)


def unpack(u: Array):
    a = u[..., 0:1]
    lw = jnp.concatenate([-jax.nn.softplus(a), -jax.nn.softplus(-a)], -1)
    return lw, u[..., 1:3], jnp.exp(u[..., 3:5])


def split_candidates(z: Array, w: Array, spread: Array, thresholds: Array, var_floor: float, tiny: float):
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


def histogram(z: Array, w: Array, bins: int):
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


def run_em(z, w, u, done, *, tol, max_passes, reg, tiny, spread=None):
    """SQUAREM-accelerated EM from several starts at once, in standardized units.

    z, w: [..., n]; u: [..., S, 5] starts; done: [..., S] starts not to run; reg: the variance
    floor, a float or [..., 1, 1]; spread: optional [..., n] (see ``em_stats``). Returns the final
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
        lw, mu, var = unpack(u)
        ll, nk, sk, qk = em_stats(zs, ws, sp, lw, mu, var)
        return ll / nv, pack(*m_step(nk, sk, qk, mu, nv, reg, tiny))

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
