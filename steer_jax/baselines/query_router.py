"""Query-level routing baseline: a small MLP that reads the prompt and picks one model per query.

After the routing setting of Damani et al. (2024), "Learning How Hard to Think: Input-Adaptive
Allocation of LM Computation": before any reasoning starts, a light classifier on the small
model's representation of the prompt predicts whether the large model is needed, and the whole
query goes to one model. STEER routes per step instead; this baseline shows what routing the
query as a whole buys at the same cost.

Design choices, and why:

* Features are the small model's final-norm hidden states, mean-pooled over the prompt's tokens
  (`prompt_features`). The small model has to read the prompt anyway, so the feature is free at
  serving time, and mean pooling (rather than the last token) does not depend on how a chat
  template ends the prompt. Prompts are sorted by length and right-padded into buckets of
  power-of-two shape (at least 16 positions) so a benchmark compiles a handful of programs;
  causal attention makes the padding invisible to each row's valid positions.
* Features are standardized with the training split's mean and std, stored in the `Router`:
  raw hidden states have a few very large dimensions (the well-known outlier features of LLM
  residual streams) that would otherwise dominate the first layer and the learning rate. A
  dimension that is constant on the training split gets std 1, so it maps to 0 and not to NaN.
* Loss: binary cross-entropy with "balanced" class weights, n / (2 n_c) for class c. Queries that
  need the large model (small wrong and large right) are usually a minority; unweighted, the MLP
  learns to say "small" everywhere and the threshold sweep has little room. Balanced weights make
  the two classes count equally, so the output is a probability under a balanced prior and 0.5
  is the balanced-error decision; use `Router.threshold` (set it with `dataclasses.replace`) to
  trade accuracy for large-model calls, e.g. from a sweep on a validation split.
* Training is one XLA program: a `lax.scan` over epochs of a `lax.scan` over minibatches (the
  jitted train step), so 200 epochs cost no Python dispatch per step. Each epoch draws its own
  permutation from the seed; the last, partial minibatch is padded with zero-weight rows so every
  step has one shape. Weight decay (AdamW) applies to weight matrices, not to biases, so the
  output bias can fit the class balance freely.
* Checkpoints use orbax: one `CompositeCheckpointHandler` directory with the arrays (`state`:
  params, mean, std) and a JSON item (`meta`: format tag, config, threshold, feature width).
  Orbax writes everything into a sibling `<path>.orbax-checkpoint-tmp*` and renames it to
  `<path>` only when complete (local and POSIX file systems), so `<path>` is either complete or
  absent; a crashed save leaves only the temporary sibling, which the next save replaces. On GCS orbax uses a commit marker
  file instead and its restore refuses an unmarked directory, which `load_router` reports.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from steer_jax.latency import seconds
from steer_jax.modeling.transformer import KVCache, Model, forward

_MIN_BUCKET = 16
_FORMAT = "steer_jax.query_router"
_FORMAT_VERSION = 1


def _bucket(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames="cfg")
def _mean_hidden(params: dict[str, Any], tokens: jax.Array, lengths: jax.Array,
                 cfg: Any) -> jax.Array:
    batch, slots = tokens.shape
    hidden, _ = forward(params, cfg, tokens, KVCache.init(cfg, batch, slots, params["embed"].dtype))
    valid = jnp.arange(slots)[None, :] < lengths[:, None]
    # Summed in float32 so a bfloat16 model's features do not lose precision in the pooling.
    total = jnp.sum(jnp.where(valid[..., None], hidden.astype(jnp.float32), 0.0), axis=1)
    return total / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)  # padding rows: 0/1


def prompt_features(model: Model, prompts: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """Mean final hidden state over each prompt's tokens: float32 [len(prompts), hidden_size].

    `prompts` are token id lists (already chat-templated). A row's features do not depend on
    which other prompts share its batch or on `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: there is nothing to compute features for")
    vocab = model.config.vocab_size
    arrays = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty: a mean over no tokens is undefined")
        if ids.min() < 0 or ids.max() >= vocab:
            # The embedding gather would clamp an out-of-range id silently.
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): "
                             f"min {ids.min()}, max {ids.max()}")
        arrays.append(ids.astype(np.int32))

    # Sorting by length keeps similar lengths together, so little of each bucket is padding.
    order = np.argsort([a.size for a in arrays], kind="stable")
    out = np.empty((len(arrays), model.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = min(batch_size, _bucket(len(idx)))
        slots = _bucket(max(arrays[i].size for i in idx), _MIN_BUCKET)
        tokens = np.zeros((rows, slots), np.int32)  # id 0 as padding: never attended to
        lengths = np.zeros((rows,), np.int32)
        for r, i in enumerate(idx):
            tokens[r, :arrays[i].size] = arrays[i]
            lengths[r] = arrays[i].size
        feats = _mean_hidden(model.params, jnp.asarray(tokens), jnp.asarray(lengths), model.config)
        out[idx] = np.asarray(feats)[:len(idx)]
    return out


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Hyperparameters of the router MLP and its training; `threshold` is the initial cut."""

    hidden: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    batch_size: int = 64
    seed: int = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"RouterConfig.lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"RouterConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RouterConfig.threshold must be in [0, 1], got {self.threshold}")


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Router:
    """A trained query router: MLP params, feature standardization, and the routing threshold.

    `threshold` starts as `config.threshold` and may be re-tuned after training (with
    `dataclasses.replace`) without touching the params; `config` records how it was trained.
    """

    params: dict[str, jax.Array]  # w1 [D, hidden], b1 [hidden], w2 [hidden, 1], b2 [1]
    mean: np.ndarray  # [D] float32, training-split feature mean
    std: np.ndarray  # [D] float32, training-split feature std (1 where a feature is constant)
    threshold: float
    config: RouterConfig

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])


def _init_params(key: jax.Array, num_features: int, hidden: int) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    # Variance-preserving (LeCun) scales: the inputs are standardized, so activations stay O(1).
    return {"w1": jax.random.normal(k1, (num_features, hidden)) / np.sqrt(num_features),
            "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
            "b2": jnp.zeros((1,))}


def _logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    # Float32 on every backend, as the models' float32 dots (execution.precision): DEFAULT
    # would be TF32 on a GPU and bfloat16 passes on a TPU. The MLP is tiny; the cost is nil.
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    h = jax.nn.gelu(dot(x, params["w1"]) + params["b1"])
    return (dot(h, params["w2"]) + params["b2"])[:, 0]


def _optimizer(lr: jax.Array, weight_decay: jax.Array) -> optax.GradientTransformation:
    decay_mask = {"w1": True, "b1": False, "w2": True, "b2": False}
    return optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)


# Only what fixes shapes or loop lengths is static: a seed or learning-rate sweep reuses one
# compiled program.
@functools.partial(jax.jit, static_argnames=("hidden", "epochs", "batch_size"))
def _fit(x: jax.Array, y: jax.Array, weights: jax.Array, key: jax.Array, lr: jax.Array,
         weight_decay: jax.Array, *, hidden: int, epochs: int,
         batch_size: int) -> dict[str, jax.Array]:
    n = x.shape[0]
    bs = min(batch_size, n)
    steps = -(-n // bs)
    opt = _optimizer(lr, weight_decay)
    init_key, shuffle_key = jax.random.split(key)
    params = _init_params(init_key, x.shape[1], hidden)

    def loss_fn(params, xb, yb, wb, count):
        bce = optax.sigmoid_binary_cross_entropy(_logits(params, xb), yb)
        return jnp.sum(wb * bce) / count

    def step(carry, idx):
        params, opt_state = carry
        real = idx >= 0  # -1 marks the padding of the last, partial minibatch
        safe = jnp.maximum(idx, 0)
        grads = jax.grad(loss_fn)(params, x[safe], y[safe], jnp.where(real, weights[safe], 0.0),
                                  jnp.sum(real))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, key):
        perm = jax.random.permutation(key, n)
        idx = jnp.concatenate([perm, jnp.full((steps * bs - n,), -1, perm.dtype)])
        return jax.lax.scan(step, carry, idx.reshape(steps, bs))[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, opt.init(params)),
                                  jax.random.split(shuffle_key, epochs))
    return params


def _check_features(features: Any) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must have shape [n >= 1, D], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    return x


def train_router(features: np.ndarray, labels: np.ndarray,
                 config: RouterConfig = RouterConfig()) -> Router:
    """Fit the router on `features` [n, D] (from `prompt_features`) and bool `labels` [n].

    A label is True when the query needs the large model. Derive labels from a training split
    (never the evaluation split) that was run twice, once with the small model alone and once
    with the large model alone (the `small_only` and `large_only` routing rules), then
    `labels_from_runs(small_correct, large_correct)`: True where the small model was wrong and
    the large model right. Queries both get right or both get wrong are False: sending them to
    the large model spends FLOPs and changes nothing.

    Deterministic: the same inputs and `config.seed` give bit-identical params on one backend.
    """
    x = _check_features(features)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match features, got {y.shape}")
    if y.dtype != np.bool_:
        raise ValueError(f"labels must be bool (True = the large model is needed), got {y.dtype}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"labels are all {bool(y[0])} ({y.size} queries): a router needs both "
                         "classes to learn anything")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    # Relative floor: a constant column's float32 std is rounding noise proportional to its mean.
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0).astype(np.float32)
    class_weight = np.array([y.size / (2 * (y.size - n_pos)), y.size / (2 * n_pos)], np.float32)
    params = _fit(jnp.asarray((x - mean) / std), jnp.asarray(y, jnp.float32),
                  jnp.asarray(class_weight[y.astype(np.int32)]), jax.random.key(config.seed),
                  jnp.float32(config.lr), jnp.float32(config.weight_decay),
                  hidden=config.hidden, epochs=config.epochs, batch_size=config.batch_size)
    return Router(params, mean.astype(np.float32), std, float(config.threshold), config)


@jax.jit
def _probs(params: dict[str, jax.Array], mean: jax.Array, std: jax.Array,
           x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(_logits(params, (x - mean) / std))


def predict(router: Router, features: np.ndarray) -> np.ndarray:
    """P(the large model is needed) per query: float32 [n]."""
    x = _check_features(features)
    if x.shape[1] != router.num_features:
        raise ValueError(f"features have {x.shape[1]} dimensions; the router was trained on "
                         f"{router.num_features}")
    return np.asarray(_probs(router.params, router.mean, router.std, jnp.asarray(x)))


def route(router: Router, features: np.ndarray) -> np.ndarray:
    """Bool [n]: True sends the whole query to the large model (probability >= threshold)."""
    return predict(router, features) >= router.threshold


def route_prompts(router: Router, model: Model, prompts: list[list[int]]
                  ) -> tuple[np.ndarray, float]:
    """`route` over the prompts' features, and its routing latency: the device seconds of the
    small model's feature pass and the MLP, the device synchronised around them and compiling
    left out (steer_jax/latency.py)."""
    # The weights it reads are made ready before the clock starts (a load may still be copying).
    return seconds(lambda _weights: route(router, prompt_features(model, prompts)),
                   (model.params, router.params))


def labels_from_runs(small_correct: Any, large_correct: Any) -> np.ndarray:
    """Training labels from per-query correctness of small-only and large-only runs: [n], one run
    of each model, or [S, n], S runs (sampled with different seeds) of each.

    True where the large model's success rate over its runs is above the small model's: the
    sign of Damani et al.'s routing target, the gain in expected reward from the expensive
    procedure, estimated by Monte Carlo. With one run each: the small model wrong and the large
    one right, the only queries on which calling the large model changes the outcome.
    """
    small = np.asarray(small_correct)
    large = np.asarray(large_correct)
    if small.ndim not in (1, 2) or small.shape != large.shape or small.shape[-1] == 0:
        raise ValueError(f"small_correct and large_correct must be [questions] or "
                         f"[samples, questions], non-empty, of the same length and samples, got "
                         f"shapes {small.shape} and {large.shape}")
    if small.dtype != np.bool_ or large.dtype != np.bool_:
        raise ValueError(f"correctness must be bool, got {small.dtype} and {large.dtype}")
    if small.ndim == 1:
        return ~small & large
    return large.mean(axis=0) > small.mean(axis=0)


def save_router(router: Router, path: str | Path, *, overwrite: bool = False) -> None:
    """Write `router` to the directory `path` with orbax; `path` appears only once complete.

    An existing `path` is an error unless `overwrite`; then orbax deletes it before writing the
    new one, so a crash in between leaves `path` absent, never half written.
    """
    path = Path(path).absolute()  # orbax requires absolute paths
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    state = {"params": jax.tree.map(np.asarray, router.params), "mean": router.mean,
             "std": router.std}
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION,
            "config": dataclasses.asdict(router.config), "threshold": router.threshold,
            "num_features": router.num_features}
    # Closing waits for the array writes still in flight when another item's save fails, so a
    # crashed save cannot go on writing into the temporary directory the next save clears.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=overwrite)


def load_router(path: str | Path) -> Router:
    """Read a router written by `save_router`."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no router checkpoint at {path}: the directory does not exist")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
    except (ValueError, KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a complete router checkpoint: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a router checkpoint (metadata {meta!r})")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has router format version {meta.get('version')}; this code "
                         f"reads version {_FORMAT_VERSION}")
    config = RouterConfig(**meta["config"])
    d, h = int(meta["num_features"]), config.hidden
    # Restoring into numpy targets keeps the router off any device mesh the caller has set up.
    target = {"params": {"w1": np.zeros((d, h), np.float32), "b1": np.zeros((h,), np.float32),
                         "w2": np.zeros((h, 1), np.float32), "b2": np.zeros((1,), np.float32)},
              "mean": np.zeros((d,), np.float32), "std": np.zeros((d,), np.float32)}
    state = checkpointer.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    return Router(jax.tree.map(jnp.asarray, state["params"]), state["mean"], state["std"],
                  float(meta["threshold"]), config)
