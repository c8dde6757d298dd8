"""How a round's two-component fit behaves on few traces: the measurement behind the default of
`steer.min_fit_traces` (README, config reference).

    python benchmarks/few_survivors.py [--fits 1000] [--seed 0]

For each pool size n, `--fits` pools are drawn and fitted in one batched `gmm.fit`: pools of two
kinds of step, 70% confident ~ N(0, 1) and 30% unconfident ~ N(-4, 1) (STEER's structure: two
components far apart), and pools of one kind ~ N(0, 1). Printed per n: how often a component sits
on the variance floor (narrower than 1e-4 of the pool's variance: on one point), and, for two kinds,
the share of steps the posterior at gamma 0.5 puts on the other side than the component they were
drawn from.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from steer_jax.routing import gmm

SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)


def measure(x: np.ndarray, unconfident: np.ndarray | None) -> tuple[float, float | None]:
    """(share of fits with a component on the floor, share of steps misrouted at gamma 0.5)."""
    params = gmm.fit(jnp.asarray(x), jnp.ones(x.shape, bool))
    floor = float(np.mean(np.asarray(params.variances).min(-1) < 1e-4 * x.var(-1)))
    if unconfident is None:
        return floor, None
    post = np.asarray(gmm.posterior_confident(params, jnp.asarray(x)))
    return floor, float(np.mean((post < 0.5) != unconfident))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fits", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| pool size | two kinds: a component on the floor | two kinds: misrouted at gamma 0.5 "
          "| one kind: a component on the floor |")
    print("|---|---|---|---|")
    for n in SIZES:
        shape = (args.fits, n)
        unconfident = rng.random(shape) < 0.3
        two = np.where(unconfident, rng.normal(-4, 1, shape), rng.normal(0, 1, shape))
        floor2, wrong = measure(two.astype(np.float32), unconfident)
        floor1, _ = measure(rng.normal(0, 1, shape).astype(np.float32), None)
        print(f"| {n} | {floor2:.2f} | {wrong:.3f} | {floor1:.2f} |")


if __name__ == "__main__":
    main()
