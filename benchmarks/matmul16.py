"""The decode step's matmuls alone: 16 rows of activations times a weight, XLA against torch.

Each form multiplies through a chain of distinct weights (64 MB or more, past the CPU's L2 caches),
each product feeding the next (as a layer feeds the next: no two run at once), so the weights come
from memory as in a decode step. Forms: the models' `jnp.matmul` (XLA CPU's dot), the same product
as a multiply-and-reduce loop fusion over weights stored [out, in], steer-jax's CPU kernel over
weights packed in panels (what float32 models on a CPU run, `steer_jax.modeling.panel_matmul`),
and torch's `x @ w` (the peer) and `F.linear` (transformers' layout); also a plain read (a sum) of
each weight in turn, the rate at which this chain could at best go.

    python benchmarks/matmul16.py [--rows 16] [--mb 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from decode import best_of

from steer_jax.modeling import panel_matmul

SHAPES = [(512, 1536), (1536, 512), (512, 512)]  # the 40.9M decode model's gate/up, down, q/o


def chained(product):
    """A jitted chain over a list of weights, each product's first column feeding the next."""
    def run(x, weights):
        for w in weights:
            x = x + 1e-6 * product(x, w)[:, :1]
        return x
    return jax.jit(run)


FORMS = {
    "XLA dot (models' form)": (chained(lambda x, w: jnp.matmul(
        x, w, precision=jax.lax.Precision.HIGHEST)), "[in, out]"),
    "XLA multiply-reduce": (chained(lambda x, wt: jnp.sum(wt[:, None] * x[None], -1).T),
                            "[out, in]"),
    "steer-jax panel kernel": (chained(panel_matmul.matmul), "panels"),
    # What a chain that only reads each weight once could reach (the read waits for x, as a
    # layer's matmul waits for the layer before; a bare sum(w) would not, and run ahead).
    "XLA plain read (sum)": (chained(lambda x, w: jnp.sum(w + x[0, 0], keepdims=True)),
                             "[in, out]"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--mb", type=int, default=64, help="weights in each chain, MB")
    args = ap.parse_args()
    panel_matmul.load()
    rs = np.random.RandomState(0)
    print(f"{args.rows} rows, float32, torch threads {torch.get_num_threads()}, "
          f"jax devices {jax.devices()}")
    for k, n in SHAPES:
        count = -(-args.mb * 2**20 // (k * n * 4))
        ws = [(0.03 * rs.randn(k, n)).astype(np.float32) for _ in range(count)]
        x = rs.randn(args.rows, k).astype(np.float32)
        gb = count * k * n * 4 / 1e9
        xt, wts = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]
        linears = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in ws]  # nn.Linear's [out, in]

        def torch_chain(product, weights):
            def run():
                y = xt
                for w in weights:
                    y = y + 1e-6 * product(y, w)[:, :1]
                return y
            return run

        print(f"[{args.rows}, {k}] x [{k}, {n}], {count} weights ({gb * 1e3:.0f} MB):")
        with torch.no_grad():  # the last, x @ w, is the peer the ratios below divide by
            for name, run in (("torch F.linear (HF's)", torch_chain(F.linear, linears)),
                              ("torch x @ w (peer)", torch_chain(torch.matmul, wts))):
                run()  # warm-up
                t_torch = best_of(run, 20)
                print(f"  {name:24s} {t_torch / count * 1e3:6.3f} ms a matmul "
                      f"{gb / t_torch:5.1f} GB/s")
        layouts = {"[in, out]": jnp.asarray,
                   "[out, in]": lambda w: jnp.asarray(np.ascontiguousarray(w.T)),
                   "panels": lambda w: panel_matmul.pack(jnp.asarray(w), 1)}
        for name, (fn, layout) in FORMS.items():
            weights = [layouts[layout](w) for w in ws]
            xj = jnp.asarray(x)
            fn(xj, weights).block_until_ready()  # compile
            t = best_of(lambda: fn(xj, weights).block_until_ready(), 20)
            print(f"  {name:24s} {t / count * 1e3:6.3f} ms a matmul {gb / t:5.1f} GB/s  "
                  f"{t_torch / t:.2f}x torch")


if __name__ == "__main__":
    main()
