"""The shipped demo pairs (models/), the trainer that made them, and the `make demo` runner.

The shipped checkpoints are compared against transformers (an independent implementation of both
architectures); the trainer is checked on a scaled-down copy of itself, for determinism, learning
and a loadable export; the runner on a few problems of the real pairs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from steer_jax import load_model, load_tokenizer
from steer_jax.eval import demo_task, render_prompt
from steer_jax.train_demo import CONTEXT, SHAPES, Shape, TrainOptions, demo_config, \
    draw_weights, encode_examples, train, train_pair

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODELS = Path(__file__).resolve().parents[1] / "models"
PAIRS = {"qwen2": "configs/demo.yaml", "gemma3": "configs/demo-gemma3.yaml"}
NAMES = [f"demo-{family}-{size}" for family in PAIRS for size in ("small", "large")]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, e, "demo"), add_special_tokens=False).input_ids
            for e in demo_task.make_split("test", n)]


def test_shipped_models_fit_the_budget_and_the_ratio() -> None:
    sizes = sum(f.stat().st_size for name in NAMES for f in (MODELS / name).iterdir())
    assert sizes <= 40 * 2**20, f"{sizes / 2**20:.1f} MB of models, the budget is 40 MB"
    for family in PAIRS:
        small = load_model(MODELS / f"demo-{family}-small", "float32").num_params
        large = load_model(MODELS / f"demo-{family}-large", "float32").num_params
        assert 4 <= large / small <= 8, (family, small, large)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_models_give_transformers_logits(name: str) -> None:
    path = MODELS / name
    ours = load_model(path, "float32")
    tokenizer = load_tokenizer(path)
    # The training data's own tokenizer: the shipped files encode as it does (a tokenizer class
    # picked by model_type would have the same vocabulary and other ids).
    sample = demo_task.make_split("test", 1)[0]
    text = render_prompt(tokenizer, sample, "demo") + sample.meta["solution"]
    built = demo_task.build_demo_tokenizer()
    assert tokenizer(text).input_ids == built(text).input_ids
    assert tokenizer.chat_template == built.chat_template
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = _prompts(tokenizer, 1)[0]
    ids = prompt + tokenizer(sample.meta["solution"], add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(ours.logits([ids])[0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Trained, not random: the worked solution is what the model predicts, token by token,
    # for most of its tokens (the large models for nearly all).
    predicted = got[len(prompt) - 1:-1].argmax(-1)
    assert (predicted == np.array(ids[len(prompt):])).mean() > 0.6


# ---- the trainer, scaled down --------------------------------------------------------------------

TINY = {"small": Shape(hidden=16, layers=2, heads=2, kv_heads=1, mlp=32),
        "large": Shape(hidden=32, layers=2, heads=2, kv_heads=1, mlp=64)}


@pytest.fixture()
def tiny_shapes(monkeypatch):
    for size, shape in TINY.items():
        monkeypatch.setitem(SHAPES, size, shape)


def test_training_is_deterministic_and_learns(tiny_shapes) -> None:
    tokenizer = demo_task.build_demo_tokenizer()
    tokens, mask = encode_examples(tokenizer, demo_task.make_split("train", 256))
    cfg = demo_config("qwen2", "large", tokenizer)
    opts = TrainOptions(steps=4, batch=16, seed=3)
    a, b = train(cfg, tokens, mask, opts), train(cfg, tokens, mask, opts)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    c = train(cfg, tokens, mask, dataclasses.replace(opts, seed=4))
    assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])
    losses: list[float] = []
    train(cfg, tokens, mask, dataclasses.replace(opts, steps=40),
          lambda i, loss: losses.append(loss))
    # From ln(vocab) ~ 5 at init; the format tokens alone are learnable in a few dozen steps.
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_small_model_never_draws_a_problem_needing_what_it_must_not_learn() -> None:
    examples = demo_task.make_split("train", 2000)
    small, large = draw_weights(examples, SHAPES["small"]), draw_weights(examples, SHAPES["large"])
    assert SHAPES["small"].unseen and not SHAPES["large"].unseen
    for e, ws, wl in zip(examples, small, large):
        # The rule, re-read here from the worked solution's first line, not from the question.
        ops = [(op, int(x)) for op, x, _ in
               re.findall(r" ([-+*]) (\d) = (\d)", e.meta["solution"].split("\n\n")[0])]
        assert (ws == 0) == any(op in SHAPES["small"].unseen for op in ops) and wl > 0
    # The large model draws every level equally often; the small the same draws, less its own.
    levels = np.array([e.meta["level"] for e in examples])
    per_level = [large[levels == lv].sum() for lv in (1, 2, 3, 4)]
    np.testing.assert_allclose(per_level, per_level[0], rtol=1e-9)
    np.testing.assert_array_equal(small, np.where(small == 0, 0.0, large))
    assert 0.3 < np.mean(small == 0) < 0.5  # a sizeable minority of problems, as the docs say


def test_encoded_examples_mask_exactly_the_assistant_tokens() -> None:
    tokenizer = demo_task.build_demo_tokenizer()
    examples = demo_task.make_split("train", 4)
    tokens, mask = encode_examples(tokenizer, examples)
    assert tokens.shape == mask.shape == (4, CONTEXT)
    for row, m, e in zip(tokens, mask, examples):
        targets = row[1:][m[:-1] > 0]  # what the loss asks the model to predict
        assert tokenizer.decode(targets) == e.meta["solution"] + tokenizer.eos_token


def test_train_pair_writes_checkpoints_both_libraries_load(tiny_shapes, tmp_path: Path) -> None:
    record = train_pair("gemma3", tmp_path, TrainOptions(steps=3, batch=4), log=lambda _: None)
    assert json.loads((tmp_path / "demo-gemma3.json").read_text()) == record
    for size in ("small", "large"):
        path = tmp_path / f"demo-gemma3-{size}"
        ours = load_model(path, "float32", scan_layers=True, cpu_kernels=False)
        # The config.json spells exactly the architecture trained, sliding layers included
        # (and the load asked for the execution `demo_config`'s default names).
        assert ours.config == demo_config("gemma3", size, demo_task.build_demo_tokenizer())
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = _prompts(load_tokenizer(path), 1)[0]
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(np.asarray(ours.logits([ids])[0]), expected, rtol=1e-4,
                                   atol=1e-5)
    # Retraining one size keeps the other's entry; with other options it is dropped, not misfiled.
    again = train_pair("gemma3", tmp_path, TrainOptions(steps=3, batch=4), log=lambda _: None,
                       sizes=["small"])
    assert again["models"]["large"] == record["models"]["large"]
    other = train_pair("gemma3", tmp_path, TrainOptions(steps=2, batch=4), log=lambda _: None,
                       sizes=["small"])
    assert set(other["models"]) == {"small"}
    with pytest.raises(ValueError, match="medium"):
        train_pair("gemma3", tmp_path, sizes=["medium"])


def test_unknown_demo_model_is_refused() -> None:
    tokenizer = demo_task.build_demo_tokenizer()
    with pytest.raises(ValueError, match="llama/small"):
        demo_config("llama", "small", tokenizer)


# ---- make demo -----------------------------------------------------------------------------------

def test_demo_runner_writes_every_method_and_the_report(tmp_path: Path) -> None:
    from steer_jax.demo import RUNS, run_demo
    from steer_jax.eval.report import report
    from steer_jax.eval.runs import expand_run_dirs
    from steer_jax.run_config import load_config

    config = load_config(PAIRS["qwen2"], ["benchmark.limit=4"])
    summaries = run_demo(config, tmp_path, warm_up=False)  # the timed runs need not be fair here
    assert set(summaries) == set(RUNS)
    for name in RUNS:
        assert (tmp_path / name / "summary.json").is_file()
        assert (tmp_path / name / "traces.jsonl").is_file()
    assert summaries["percentile"].options["policy"] == "percentile"
    # The shipped pair gives STEER something to route: some steps go to the large model, not all.
    assert 0.0 < summaries["steer"].large_step_fraction < 1.0
    traces = [json.loads(line) for line in (tmp_path / "steer" / "traces.jsonl").read_text()
              .splitlines()]
    assert {"small", "large"} <= {s["model"] for t in traces for s in t["steps"]}
    # Routing latency is measured in the run (issue #23): the judge's forward passes take
    # longer than the mixture fits and posteriors; the methods that decide nothing take none.
    for key in ("routing_s_per_query", "routing_s_per_round"):
        steer, judge = (getattr(summaries[m], key) for m in ("steer", "specreason"))
        assert 0.0 < steer < judge, (key, steer, judge)
        assert getattr(summaries["small_only"], key) == getattr(summaries["large_only"], key) == 0
    out = report(expand_run_dirs([tmp_path]), tmp_path / "report")
    table = (out / "results.md").read_text()
    assert "STEER (p=0.3)" in table and "STEER (γ=0.5)" in table and "SpecReason" in table
    assert (out / "plots" / "routing_latency.png").is_file()


def test_demo_runner_names_missing_models(tmp_path: Path) -> None:
    from steer_jax.demo import run_demo
    from steer_jax.run_config import load_config

    config = load_config(PAIRS["qwen2"], [f"small={tmp_path / 'absent'}"])
    with pytest.raises(FileNotFoundError, match="absent.*train-demo"):
        run_demo(config, tmp_path / "out")
