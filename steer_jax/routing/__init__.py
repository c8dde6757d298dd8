"""Confidence calibration (a two-component Gaussian mixture fitted on device) and routing policies."""

from steer_jax.routing.gmm import GMMParams, fit, log_likelihood, log_odds_confident, posterior_confident
from steer_jax.routing.policy import (
    percentile_count,
    route_by_percentile,
    route_by_posterior,
    route_by_threshold,
    route_steer,
)

__all__ = [
    "GMMParams",
    "fit",
    "log_likelihood",
    "log_odds_confident",
    "posterior_confident",
    "percentile_count",
    "route_by_percentile",
    "route_by_posterior",
    "route_by_threshold",
    "route_steer",
]
