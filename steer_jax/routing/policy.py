"""Routing policies: which running traces get their next step from the large model.

Every policy takes step confidences ``scores`` of shape ``[..., n]`` (leading axes are groups,
as in ``gmm.fit``) and an optional ``running`` mask of the same shape, and returns a boolean mask
of that shape, on device: True means "the large model writes this trace's next step". A finished
trace (``running`` False) is never routed. Thresholds (``gamma``, ``p``, ``threshold``) are
scalars or arrays broadcastable to the group shape ``[...]``, so each group can have its own.

* ``route_by_posterior`` is STEER's rule, the paper's equation (10): route when
  ``P(confident | s) < gamma``, with the posterior of ``gmm.posterior_confident``. The test is
  made on the log-odds, ``logit P < logit gamma`` (``gmm.log_odds_confident``): the same
  inequality, exact up to the float32 parameters even where the float32 posterior has no
  resolution left (within a few ulps of 0 or 1). The ends are fixed by definition: ``gamma <= 0``
  routes nothing; ``gamma >= 1`` routes every running trace. The latter is what a user asking
  for gamma = 1 means ("always the large model"), and it is the only reading that does not let
  a posterior equal to 1 slip through: in float32 the posterior rounds to exactly 1.0 once
  ``1 - P < 6e-8``, and degenerate groups (``gmm`` module docstring) have posterior exactly 1.
  Invalid scores (NaN, infinite, out of the fit's range) have posterior 0, so any ``gamma > 0``
  routes them.
* ``route_by_percentile`` is the Figure 3 scheme: in each group the ``k`` running traces with
  the lowest scores go to the large model, ``k = floor(p * n_running)`` (``percentile_count``).
  Floor makes ``p`` a budget the large model never exceeds (one running trace at ``p = 0.1``
  routes nothing, not 100%). Because ``p`` is a float32, ``p * n_running`` is taken with a
  margin of a few ulps so that products that are integers in exact arithmetic are not floored
  one short (``0.65 * 180`` is 116.99999 in float32). Exactly ``k`` traces are routed
  even with ties: equal scores are ranked by index. NaN scores rank lowest (a broken confidence
  is treated as the least confident), then ``-inf``, the finite scores, ``+inf``.
* ``route_by_threshold`` routes when the raw confidence is below a fixed ``threshold``; NaN
  scores are routed, like the posterior rule's invalid scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from steer_jax.routing import gmm as _gmm

Array = jax.Array

__all__ = [
    "route_by_posterior",
    "route_by_percentile",
    "route_by_threshold",
    "percentile_count",
    "route_steer",
]

# Margin, in ulps of p * n, for the percentile count (see module docstring).
_COUNT_ULPS = 4.0


def _running(scores: Array, running: Array | None) -> Array:
    if running is None:
        return jnp.ones(scores.shape, bool)
    return jnp.broadcast_to(jnp.asarray(running, bool), scores.shape)


def _per_group(value, scores: Array, dtype) -> Array:
    """A scalar or group-shaped [...] value, as [..., 1] to broadcast against [..., n]."""
    v = jnp.broadcast_to(jnp.asarray(value, dtype), scores.shape[:-1])
    return v[..., None]


def route_by_posterior(
    params: _gmm.GMMParams, scores: Array, gamma: float | Array, running: Array | None = None
) -> Array:
    """Equation (10): True (large model) where ``P(confident | score) < gamma``; ``[..., n]``.

    ``params`` is the per-group mixture (fields ``[..., 2]``), normally
    ``gmm.fit(scores, running)``. ``gamma <= 0`` routes nothing, ``gamma >= 1`` every running trace.
    """
    scores = jnp.asarray(scores)
    d = _gmm.log_odds_confident(params, scores)
    g = _per_group(gamma, scores, d.dtype)
    # logit(gamma); where() keeps the ends exact instead of trusting log(0) and log1p(-1).
    inner = (g > 0) & (g < 1)
    gs = jnp.where(inner, g, 0.5)
    logit_g = jnp.where(inner, jnp.log(gs) - jnp.log1p(-gs), jnp.where(g >= 1, jnp.inf, -jnp.inf))
    route = (g >= 1) | (d < logit_g)
    return route & _running(scores, running)


def route_steer(
    scores: Array, gamma: float | Array, running: Array | None = None, **fit_kwargs
) -> tuple[Array, _gmm.GMMParams]:
    """Fits the mixture over the running traces of each group and applies equation (10).

    Returns ``(route [..., n], params)``; ``fit_kwargs`` go to ``gmm.fit``.
    """
    scores = jnp.asarray(scores)
    params = _gmm.fit(scores, running, **fit_kwargs)
    return route_by_posterior(params, scores, gamma, running), params


def percentile_count(p: float | Array, n_running: Array) -> Array:
    """``floor(p * n_running)`` clipped to ``[0, n_running]``, int32, per group.

    Computed in float32 with a margin of a few ulps of the product, so that exact-arithmetic
    integers are not floored one short by the rounding of ``p``.
    """
    n = jnp.asarray(n_running)
    nf = n.astype(jnp.float32)
    x = jnp.asarray(p, jnp.float32) * nf
    eps = float(jnp.finfo(jnp.float32).eps)
    k = jnp.floor(x + _COUNT_ULPS * eps * jnp.abs(x))
    k = jnp.clip(jnp.where(jnp.isnan(k), 0, k), 0, nf)
    return k.astype(jnp.int32)


def route_by_percentile(scores: Array, p: float | Array, running: Array | None = None) -> Array:
    """True for the ``floor(p * n_running)`` lowest-scoring running traces of each group."""
    scores = jnp.asarray(scores)
    run = _running(scores, running)
    k = percentile_count(jnp.broadcast_to(jnp.asarray(p, jnp.float32), scores.shape[:-1]), jnp.sum(run, -1))
    # Lexicographic order: running first, then NaN, then by score, then by index; a trace's
    # rank among the running ones is then its position, and exactly k of them are routed.
    key_run = (~run).astype(jnp.int32)
    key_nan = (~jnp.isnan(scores)).astype(jnp.int32)
    key_val = jnp.where(jnp.isnan(scores), 0, scores)
    idx = lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    *_, order = lax.sort((key_run, key_nan, key_val, idx), dimension=scores.ndim - 1, num_keys=4)
    rank = jnp.argsort(order, axis=-1)
    return run & (rank < k[..., None])


def route_by_threshold(scores: Array, threshold: float | Array, running: Array | None = None) -> Array:
    """True where the raw confidence is below ``threshold`` (NaN counts as below)."""
    scores = jnp.asarray(scores)
    t = _per_group(threshold, scores, jnp.promote_types(scores.dtype, jnp.float32))
    route = ~(scores >= t)  # NaN compares False, so it is routed
    return route & _running(scores, running)
