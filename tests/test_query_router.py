"""Query router baseline: prompt features against HF transformers, training, orbax round trip."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

import tiny
from steer_jax import load_model
from steer_jax.baselines import query_router
from steer_jax.baselines.query_router import (Router, RouterConfig, labels_from_runs, load_router,
                                              predict, prompt_features, route, save_router,
                                              train_router)

# Ragged on purpose: lengths straddle the 16-position bucket and one needs the 32 bucket.
PROMPTS = [[5, 17, 3], [1], list(range(3, 23)), [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
           [127, 0, 64, 2, 100], list(range(40, 73))]


@pytest.fixture(scope="module")
def tiny_qwen(tiny_models):
    path, ref = tiny_models["qwen2_tied_mha"]
    return load_model(path, dtype="float32"), ref


def test_features_match_transformers_mean_last_hidden_state(tiny_qwen):
    model, ref = tiny_qwen
    feats = prompt_features(model, PROMPTS)
    assert feats.shape == (len(PROMPTS), model.config.hidden_size) and feats.dtype == np.float32
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = ref(ids, output_hidden_states=True)
            # transformers 5 ties hidden_states[-1] to the final-norm output; guard that here.
            torch.testing.assert_close(out.hidden_states[-1], ref.model(ids).last_hidden_state)
        expected = out.hidden_states[-1][0].mean(0).numpy()
        np.testing.assert_allclose(feats[i], expected, rtol=1e-5, atol=1e-5, err_msg=f"prompt {i}")


def test_features_do_not_depend_on_batching(tiny_qwen):
    model, _ = tiny_qwen
    alone = np.stack([prompt_features(model, [p])[0] for p in PROMPTS])
    for batch_size in (3, 32):
        np.testing.assert_allclose(prompt_features(model, PROMPTS, batch_size=batch_size), alone,
                                   rtol=1e-6, atol=1e-5, err_msg=f"batch_size {batch_size}")
    # Reordering the prompts reorders the rows and nothing else.
    perm = [4, 0, 5, 2, 1, 3]
    np.testing.assert_allclose(prompt_features(model, [PROMPTS[i] for i in perm]), alone[perm],
                               rtol=1e-6, atol=1e-5)


def test_features_reject_bad_prompts(tiny_qwen):
    model, _ = tiny_qwen
    with pytest.raises(ValueError, match="prompts is empty"):
        prompt_features(model, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        prompt_features(model, [[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        prompt_features(model, [[1, 128]])


def hyperplane_problem(seed: int, n: int, d: int = 16, offset: float = 0.8):
    """Gaussian features labelled by a random hyperplane; the offset makes positives a minority."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 30, size=d).astype(np.float32)
    y = (x / np.linalg.norm(w)) @ w > offset * x.std()
    return x + rng.normal(size=d).astype(np.float32) * 50, y  # shifted: exercises standardization


# The quick tests share one shape and structural config, so they share one compiled program.
SMALL = RouterConfig(hidden=16, epochs=5)


def test_router_learns_a_separable_problem():
    x, y = hyperplane_problem(0, 1500)
    train, test = slice(0, 1000), slice(1000, None)
    assert 0.1 < y.mean() < 0.4  # imbalanced, as real "large model needed" labels are
    router = train_router(x[train], y[train], RouterConfig(hidden=64, epochs=60))
    probs = predict(router, x[test])
    assert probs.shape == (500,) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    accuracy = np.mean(route(router, x[test]) == y[test])
    assert accuracy >= 0.95, accuracy
    recall = np.mean(route(router, x[test])[y[test]])
    assert recall >= 0.9, recall


def test_training_and_prediction_ask_for_float32_dots():
    """DEFAULT precision is TF32 on a GPU and bfloat16 passes on a TPU; the CPU computes float32
    either way, so what this checks is the request in both programs (gradients included)."""
    x, y = jnp.ones((8, 4)), jnp.zeros((8,))
    fit = functools.partial(query_router._fit, hidden=SMALL.hidden, epochs=1, batch_size=4)
    trained = jax.make_jaxpr(fit)(x, y, jnp.ones((8,)), jax.random.key(0), 1e-3, 0.0)
    params = query_router._init_params(jax.random.key(0), 4, SMALL.hidden)
    probs = jax.make_jaxpr(query_router._probs)(params, jnp.zeros(4), jnp.ones(4), x)
    # Training: 2 forward, 3 backward (each weight's gradient and the hidden layer's).
    for jaxpr, at_least in ((trained, 5), (probs, 2)):
        precisions = tiny.dot_precisions(jaxpr.jaxpr)
        assert len(precisions) >= at_least and all(map(tiny.is_highest, precisions)), precisions


def test_training_is_deterministic_in_the_seed():
    x, y = hyperplane_problem(1, 300)
    cfg = SMALL
    a = train_router(x, y, cfg)
    b = train_router(x, y, cfg)
    c = train_router(x, y, dataclasses.replace(cfg, seed=1))
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    assert not np.array_equal(np.asarray(a.params["w1"]), np.asarray(c.params["w1"]))
    assert not np.array_equal(predict(a, x), predict(c, x))


def test_class_weighting_balances_an_uninformative_router():
    # Constant features carry no information, so the best the MLP can do is a constant output.
    # Unweighted cross-entropy would put it at the 10% base rate; balanced weights put it at 0.5.
    # Also checks that a zero-variance feature is standardized to 0, not to NaN.
    x = np.full((200, 4), 3.0, np.float32)
    y = np.arange(200) % 10 == 0
    router = train_router(x, y, RouterConfig(hidden=8, epochs=100, lr=1e-2))
    np.testing.assert_array_equal(router.std, np.ones(4, np.float32))
    np.testing.assert_allclose(predict(router, x[:3]), 0.5, atol=0.02)


def test_train_router_rejects_bad_inputs():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="labels are all False"):
        train_router(x, np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        train_router(x, np.array([True, False]))
    with pytest.raises(ValueError, match="labels must be bool"):
        train_router(x, np.array([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        train_router(np.full((4, 3), np.nan), np.array([True, False, True, False]))
    with pytest.raises(ValueError, match="RouterConfig.threshold"):
        RouterConfig(threshold=1.5)


def test_predict_rejects_the_wrong_feature_width():
    x, y = hyperplane_problem(2, 300)
    router = train_router(x, y, SMALL)
    with pytest.raises(ValueError, match="trained on 16"):
        predict(router, np.zeros((2, 17), np.float32))


def test_threshold_controls_routing():
    x, y = hyperplane_problem(3, 300)
    router = train_router(x, y, SMALL)
    assert route(dataclasses.replace(router, threshold=0.0), x).all()
    strict = dataclasses.replace(router, threshold=float(np.median(predict(router, x))))
    assert 0.4 <= route(strict, x).mean() <= 0.6


def test_labels_from_runs():
    small = [True, True, False, False]
    large = [True, False, True, False]
    np.testing.assert_array_equal(labels_from_runs(small, large), [False, False, True, False])
    with pytest.raises(ValueError, match="same length"):
        labels_from_runs([True], [True, False])


def test_labels_from_sampled_runs_compare_success_rates():
    # Per question (columns), 3 runs each: small succeeds 2/3, 0/3, 1/3, 3/3 of the time,
    # large 3/3, 2/3, 1/3, 2/3: the large model is needed where it succeeds more often.
    small = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]], bool)
    large = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(labels_from_runs(small, large), [True, True, False, False])
    # One run each, as [1, n]: the one-run rule, small wrong and large right.
    np.testing.assert_array_equal(labels_from_runs(small[:1], large[:1]),
                                  ~small[0] & large[0])
    with pytest.raises(ValueError, match="same length and samples"):
        labels_from_runs(small, large[:2])


def test_router_samples_run_each_baseline_once_per_seed():
    from steer_jax.train_router import sampled_correctness

    calls = []

    def graded(cfg):  # a stub run: question q is right when (q + seed) is odd, for large also q=0
        calls.append((cfg["method"], cfg["sampling"]["seed"], cfg["benchmark"]["name"],
                      cfg["sampling"]["temperature"]))
        seed = cfg["sampling"]["seed"]
        return [(q + seed) % 2 == 1 or (cfg["method"] == "large_only" and q == 0)
                for q in range(3)]

    config = {"router": {"train": {"name": "demo"}}, "sampling": {"temperature": 0.7, "seed": 5}}
    got = sampled_correctness(config, 2, 5, graded)
    assert calls == [("small_only", 5, "demo", 0.7), ("small_only", 6, "demo", 0.7),
                     ("large_only", 5, "demo", 0.7), ("large_only", 6, "demo", 0.7)]
    np.testing.assert_array_equal(got["small_only"], [[True, False, True], [False, True, False]])
    np.testing.assert_array_equal(got["large_only"], [[True, False, True], [True, True, False]])
    # Success rates: small 1/2, 1/2, 1/2; large 1, 1/2, 1/2: only question 0 needs the large one.
    np.testing.assert_array_equal(labels_from_runs(got["small_only"], got["large_only"]),
                                  [True, False, False])


@pytest.mark.parametrize("samples", [0, 1.5, True])
def test_router_samples_must_be_a_positive_integer(samples):
    from steer_jax.run_config import RunConfigError, validate

    with pytest.raises(RunConfigError, match="router.samples"):
        validate({"small": "s", "large": "l", "benchmark": {"name": "demo"},
                  "router": {"samples": samples}})


@pytest.fixture(scope="module")
def trained():
    x, y = hyperplane_problem(4, 300)
    router = train_router(x, y, dataclasses.replace(SMALL, seed=7, threshold=0.3))
    return dataclasses.replace(router, threshold=0.37), x


def test_save_load_round_trip(trained, tmp_path):
    router, x = trained
    save_router(router, tmp_path / "router")
    loaded = load_router(tmp_path / "router")
    assert isinstance(loaded, Router)
    assert loaded.config == router.config and loaded.threshold == 0.37
    np.testing.assert_array_equal(loaded.mean, router.mean)
    np.testing.assert_array_equal(loaded.std, router.std)
    np.testing.assert_array_equal(predict(loaded, x), predict(router, x))
    np.testing.assert_array_equal(route(loaded, x), route(router, x))
    # Only the final directory is left behind: the temporary one was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == ["router"]


def test_save_refuses_to_overwrite_unless_asked(trained, tmp_path):
    router, x = trained
    path = tmp_path / "router"
    save_router(router, path)
    with pytest.raises(FileExistsError, match=str(path)):
        save_router(router, path)
    other = dataclasses.replace(router, threshold=0.9)
    save_router(other, path, overwrite=True)
    assert load_router(path).threshold == 0.9


def test_failed_save_leaves_no_directory(trained, tmp_path, monkeypatch):
    router, _ = trained

    async def crash(self, directory, *args, **kwargs):
        raise RuntimeError("disk full")

    # The JSON item is written alongside the arrays: a crash in the middle of the checkpoint.
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_router(router, tmp_path / "crashed")
    assert not (tmp_path / "crashed").exists()
    monkeypatch.undo()
    # A process killed mid-save leaves orbax's temporary directory; it does not block the next
    # save. (Re-saving over the in-process crash above would race its orphaned writes, which a
    # killed process cannot have.)
    leftover = tmp_path / "router.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_bytes(b"half a checkpoint")
    save_router(router, tmp_path / "router")
    assert load_router(tmp_path / "router").threshold == router.threshold


def test_load_missing_or_foreign_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_router(missing)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(ValueError, match=str(foreign)):
        load_router(foreign)
