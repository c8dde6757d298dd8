"""Confidence-mixture fit: steer_jax's on-device EM against scikit-learn's GaussianMixture.

Two cases, one process, both sides warmed up, best of several runs (the machine may be shared):

* 10 groups x 2000 scores, ragged (each group has 1000-2000 running traces, the rest masked):
  ours is one jitted call over the whole batch, scikit-learn fits the groups one by one.
* One group of 1,000,000 scores.

scikit-learn runs with its defaults (k-means initialization, one restart, tol 1e-3; ours uses
tol 1e-6 and a deterministic multi-start), limited to one thread per pool by default: on a busy
2-core machine its OpenMP k-means is otherwise tens of times slower, and the comparison should
be against its best. `--sklearn-threads 0` leaves its thread pools alone. The mean
log-likelihood of both fits is printed next to the times, so the work compared is visible.

Usage: python benchmarks/gmm.py [--repeats 20] [--sklearn-threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import numpy as np
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from steer_jax.routing import gmm


def ragged_batch(groups: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.zeros((groups, n), np.float32)
    mask = np.zeros((groups, n), bool)
    for g in range(groups):
        k = int(rng.integers(n // 2, n + 1))
        unconfident = rng.random(k) < rng.uniform(0.05, 0.4)
        scores[g, :k] = np.where(unconfident, rng.normal(22.0, 1.5, k), rng.normal(26.0, 1.0, k))
        scores[g, k:] = rng.normal(0.0, 100.0, n - k)  # garbage where masked: must not matter
        mask[g, :k] = True
    return scores, mask


def best_of(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sklearn-threads", type=int, default=1, help="0: leave scikit-learn's thread pools alone")
    args = ap.parse_args()
    limits = threadpool_limits(args.sklearn_threads) if args.sklearn_threads > 0 else contextlib.nullcontext()
    fit = jax.jit(gmm.fit)
    loglik = jax.jit(gmm.log_likelihood)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), sklearn threads: "
          f"{args.sklearn_threads or 'default'}")

    # 10 groups x 2000, ragged.
    scores, mask = ragged_batch(10, 2000)
    ours = lambda: jax.block_until_ready(fit(scores, mask))
    params = ours()
    t_ours, med_ours = best_of(ours, args.repeats)
    with limits:
        def theirs():
            return [GaussianMixture(2, random_state=0).fit(s[m][:, None]) for s, m in zip(scores, mask)]
        fitted = theirs()
        t_sk, med_sk = best_of(theirs, max(3, args.repeats // 4))
    ll_ours = np.asarray(loglik(params, scores, mask)).mean()
    ll_sk = np.mean([g.score(s[m][:, None]) for g, s, m in zip(fitted, scores, mask)])
    print(f"gmm fit 10x2000: ours {t_ours * 1e3:.2f} ms, sklearn {t_sk * 1e3:.2f} ms, ratio {t_sk / t_ours:.1f}x"
          f"  (medians {med_ours * 1e3:.2f} / {med_sk * 1e3:.2f} ms; mean loglik ours {ll_ours:.5f},"
          f" sklearn {ll_sk:.5f})")

    # One group of 1,000,000.
    rng = np.random.default_rng(1)
    n = 1_000_000
    unconfident = rng.random(n) < 0.2
    big = np.where(unconfident, rng.normal(22.0, 1.5, n), rng.normal(26.0, 1.0, n)).astype(np.float32)
    ours = lambda: jax.block_until_ready(fit(big))
    params = ours()
    t_ours, med_ours = best_of(ours, max(3, args.repeats // 4))
    with limits:
        theirs = lambda: GaussianMixture(2, random_state=0).fit(big[:, None])
        fitted = theirs()
        t_sk, med_sk = best_of(theirs, 3)
    ll_ours = float(loglik(params, big))
    ll_sk = fitted.score(big[:, None])
    print(f"gmm fit 1x1000000: ours {t_ours * 1e3:.1f} ms, sklearn {t_sk * 1e3:.1f} ms, ratio {t_sk / t_ours:.1f}x"
          f"  (medians {med_ours * 1e3:.1f} / {med_sk * 1e3:.1f} ms; mean loglik ours {ll_ours:.5f},"
          f" sklearn {ll_sk:.5f})")


if __name__ == "__main__":
    main()
