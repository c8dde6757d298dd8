"""The axis a confidence measure is plotted on, and the fitted mixture's density carried onto it.

Max logit is plotted as is. Max probability lives in (0, 1] and piles up just below 1.0, so a
histogram of raw values is one spike with the mixture hidden inside it; it is plotted as
y = -log(1 - p), which spreads the confident end out. Negative entropy (-H, at most 0) piles up
just below 0 the same way and is plotted as y = -log(H). Both maps increase with confidence, so
the confident component stays on the right.

The mixture is fitted on the raw measure x. On the plotted axis its density is
f_Y(y) = f_X(x(y)) |dx/dy| (change of variables), so the curves keep integrating to the mass they
had and stay comparable with a density-normalised histogram of the transformed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from steer_jax.decoding.sampler import MEASURES

# The largest float32 below 1 is 1 - 2**-24: a mean of float32 max probabilities that reads 1.0
# (or an entropy of 0) is within this of its limit, and is drawn at the axis' cap instead of at
# infinity.
EDGE = 2.0**-24


@dataclass(frozen=True)
class ConfidenceAxis:
    """How one measure is drawn: y = forward(x), x = inverse(y), and |dx/dy| at y."""

    measure: str
    label: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    jacobian: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _ones(y: np.ndarray) -> np.ndarray:
    return np.ones_like(np.asarray(y, dtype=float))


def _neg_log_gap_to_one(p: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(1.0 - np.asarray(p, dtype=float), EDGE))


def _neg_log_entropy(x: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(-np.asarray(x, dtype=float), EDGE))


def _exp_neg(y: np.ndarray) -> np.ndarray:
    # For both maps |dx/dy| = exp(-y): p = 1 - exp(-y) and x = -exp(-y).
    return np.exp(-np.asarray(y, dtype=float))


AXES = {
    "max_logit": ConfidenceAxis("max_logit", "step confidence (mean max logit)", _identity, _identity, _ones),
    "max_prob": ConfidenceAxis(
        "max_prob", "-log(1 - p), p = mean max probability", _neg_log_gap_to_one,
        lambda y: 1.0 - np.exp(-np.asarray(y, dtype=float)), _exp_neg,
    ),
    "neg_entropy": ConfidenceAxis(
        "neg_entropy", "-log(H), H = mean entropy (nats)", _neg_log_entropy,
        lambda y: -np.exp(-np.asarray(y, dtype=float)), _exp_neg,
    ),
}
RAW = {m: ConfidenceAxis(m, f"step confidence ({m})", _identity, _identity, _ones) for m in MEASURES}


def axis_for(measure: str, transform: bool = True) -> ConfidenceAxis:
    """The plotting axis of `measure` (raw values when not `transform`)."""
    if measure not in AXES:
        raise ValueError(f"unknown confidence measure {measure!r}; expected one of {list(AXES)}")
    return AXES[measure] if transform else RAW[measure]


def normal_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    var = max(float(var), 1e-12)
    return np.exp(-0.5 * (np.asarray(x, dtype=float) - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def component_densities(
    ys: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray, axis: ConfidenceAxis
) -> np.ndarray:
    """[K, len(ys)]: each weighted mixture component's density at the plotted values `ys`."""
    weights, means, variances = (np.asarray(a, dtype=float) for a in (weights, means, variances))
    if not weights.shape == means.shape == variances.shape or weights.ndim != 1:
        raise ValueError(
            f"mixture weights, means and variances must be 1-D of one length, got shapes "
            f"{weights.shape}, {means.shape}, {variances.shape}"
        )
    xs, jac = axis.inverse(ys), axis.jacobian(ys)
    return np.stack([w * normal_pdf(xs, m, v) * jac for w, m, v in zip(weights, means, variances)])


def plot_range(
    values: np.ndarray, means: np.ndarray, variances: np.ndarray, axis: ConfidenceAxis
) -> tuple[float, float]:
    """The plotted span: every value and each component's mean +- 3 sd, mapped onto the axis."""
    sd = np.sqrt(np.maximum(np.asarray(variances, dtype=float), 1e-12))
    means = np.asarray(means, dtype=float)
    raw = np.concatenate([np.asarray(values, dtype=float).ravel(), means - 3 * sd, means + 3 * sd])
    mapped = axis.forward(raw)
    mapped = mapped[np.isfinite(mapped)]
    lo, hi = float(mapped.min()), float(mapped.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
