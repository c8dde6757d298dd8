"""The benchmark workload (benchmarks/workload.py): its models are the designed Markov chain, and
the text `generate` samples from them has the stated step-length law, by tests that could fail."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import xlogy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import workload as W  # noqa: E402
from steer_jax import generate  # noqa: E402
from steer_jax.modeling.module import param_shapes  # noqa: E402

BUDGET, CAP, SIGNIFICANCE = 1024, 256, 1e-3


def censored_lengths(traces: list[list[int]], tokenizer, budget: int, cap: int) -> list[int]:
    """Step lengths, cap + 1 standing for "more than cap", of the steps that began with at least
    `cap` tokens of budget left. Whether a step is kept depends only on the steps before it, so
    the kept ones are independent draws of the step law (Doob's optional skipping), which
    keeping every complete step would not be: a long step is more often cut by the budget."""
    out = []
    for tokens in traces:
        start = 0
        for length in W.split_steps(tokens, tokenizer, partial=True):
            if start + cap > budget:
                break
            out.append(min(length, cap + 1))
            start += length
    return out


def lengths_p_value(lengths: list[int], law: W.StepLengths, cap: int, bins: int = 10) -> float:
    """Chi-square goodness of fit over the law's decile bins up to `cap`, and a bin above it."""
    edges = sorted({1, *(law.quantile(i / bins) for i in range(1, bins)), cap})
    edges = [e for e in edges if e <= cap]
    cdf = np.r_[law.cdf(np.asarray(edges)), 1.0]
    expected = np.diff(np.r_[0.0, cdf])[1:] * len(lengths)
    observed = np.histogram(lengths, bins=[*np.asarray(edges) + 0.5, math.inf])[0]
    assert observed.sum() == len(lengths) and expected.min() > 5
    return float(stats.chisquare(observed, expected).pvalue)


def steps_p_value(traces: list[list[int]], reasons: list[str], tokenizer,
                  law: W.StepLengths) -> float:
    """Each complete step ends the trace (EOS) with probability 1 / mean_steps, independently of
    its length and of the steps before: the steps per trace are then geometric, with the traces
    the budget cut censored. Likelihood-ratio test of that probability (chi-square, 1 df)."""
    complete = sum(len(W.split_steps(t, tokenizer)) for t in traces)
    eos = reasons.count("eos")
    q, q_hat = law.eos_prob, eos / complete
    rest = complete - eos  # xlogy: 0 * log 0 = 0, when no trace (or every step) ended by EOS
    g = 2 * (xlogy(eos, q_hat / q) + xlogy(rest, (1 - q_hat) / (1 - q)))
    return float(stats.chi2.sf(g, 1))


@pytest.fixture(scope="module")
def pair():
    return W.build_pair("test", W.StepLengths(), seed=0)


@pytest.fixture(scope="module")
def samples(pair):
    """Each model's traces for 128 prompts, sampled to EOS or 1024 tokens, different seeds."""
    small, large, tok = pair
    out = {}
    for seed, (name, model) in enumerate((("small", small), ("large", large)), start=1):
        res = generate(model, W.prompts(128, 16, seed=seed), max_new_tokens=BUDGET,
                       temperature=0.7, seed=seed)
        out[name] = (res.tokens, res.stop_reasons)
    return out


def test_law() -> None:
    law = W.StepLengths()
    n = np.arange(0, 20000)
    assert law.pmf(n).sum() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(np.cumsum(law.pmf(n)), law.cdf(n), atol=1e-12)
    assert law.cdf(1) == 0 and law.pmf(2) > 0 and law.mean == pytest.approx(53.025)
    # The stated approximation of the lognormal of median 35, sigma 0.9 (docstring's table).
    for p, tolerance in ((0.5, 0.02), (0.9, 0.08), (0.99, 0.05)):
        lognormal = 35 * math.exp(0.9 * NormalDist().inv_cdf(p))
        assert law.quantile(p) == pytest.approx(lognormal, rel=tolerance)
    assert 0.005 < 1 - law.cdf(256) < 0.02  # the engine's 256-token cap: rarely reached
    one = W.StepLengths.geometric(10.0)
    assert one.pmf(np.arange(100000)) @ np.arange(100000) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        W.StepLengths((0.5, 0.6), (10, 20))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_models_are_the_designed_chain(dtype: str) -> None:
    """Each position's next-token distribution is the design for its token's state, whatever
    came before it (one sequence through every token): an exact bigram model, to ~1e-4 in
    bfloat16; the max logit varies per token."""
    law = W.StepLengths()
    small, large, tok = W.build_pair("test", law, seed=3, dtype=dtype)
    design = W.transition_probs(law)
    states = W.token_states(len(law.weights))
    sequence = np.random.default_rng(0).permutation(len(states))
    for model in (small, large):
        lg = np.asarray(model.logits(sequence[None]), np.float64)[0]
        logp = jax.nn.log_softmax(jnp.asarray(lg / 0.7), axis=-1)
        want = design[states[sequence]]
        got = np.exp(np.asarray(logp))
        assert got[:, len(states):].sum(axis=1).max() < 1e-20  # undesigned ids: never
        ok = want > 0
        error = np.abs(np.asarray(logp)[:, : len(states)][ok] - np.log(want[ok])).max()
        assert error < (1e-5 if dtype == "float32" else 5e-4)
        assert np.ptp(lg.max(axis=1)) > 1.0  # the jitter: confidence differs per token
    assert len(tok) == len(states) <= small.config.vocab_size


def test_step_lengths_follow_the_law(pair, samples) -> None:
    _, _, tok = pair
    law = W.StepLengths()
    for name, (traces, reasons) in samples.items():
        lengths = censored_lengths(traces, tok, BUDGET, CAP)
        assert len(lengths) > 500, name
        p_len = lengths_p_value(lengths, law, CAP)
        p_steps = steps_p_value(traces, reasons, tok, law)
        print(f"{name}: {len(lengths)} steps, lengths p={p_len:.3g}, steps p={p_steps:.3g}")
        assert p_len > SIGNIFICANCE and p_steps > SIGNIFICANCE, name


def test_a_wrong_law_fails_the_same_tests(pair, samples) -> None:
    _, _, tok = pair
    law = W.StepLengths()
    doubled = W.StepLengths(law.weights, tuple(2 * m for m in law.means), law.mean_steps)
    longer = W.StepLengths(law.weights, law.means, 2 * law.mean_steps)
    for name, (traces, reasons) in samples.items():
        lengths = censored_lengths(traces, tok, BUDGET, CAP)
        p_len = lengths_p_value(lengths, doubled, CAP)
        p_steps = steps_p_value(traces, reasons, tok, longer)
        print(f"{name}: means doubled p={p_len:.3g}, mean_steps doubled p={p_steps:.3g}")
        assert p_len < SIGNIFICANCE and p_steps < SIGNIFICANCE, name


def test_split_steps_and_summary(pair) -> None:
    _, _, tok = pair
    word = W.CLASS_BASE
    tokens = [word, word, W.DELIM, word, W.DELIM, word, word, word, W.EOS]
    assert W.split_steps(tokens, tok) == [3, 2, 4]
    assert W.split_steps(tokens[:7], tok) == [3, 2]
    assert W.split_steps(tokens[:7], tok, partial=True) == [3, 2, 2]
    assert W.summarize([3, 2, 4])["median"] == 3 and W.summarize([])["count"] == 0
    assert tok.decode([W.DELIM]) == "\n\n" and tok.eos_token_id == W.EOS
    p = W.prompts(5, 16, seed=1)
    assert len(p) == 5 and all(len(x) == 16 and 3 <= min(x) and max(x) < W.CLASS_BASE for x in p)


@pytest.mark.parametrize("which", ["small", "large"])
def test_real_shapes_build_abstractly(which: str) -> None:
    """The Qwen2.5-Math-1.5B/7B pair: real dimensions, untied, bfloat16; the build traces at that
    size without memory (on an accelerator it runs as one program)."""
    shape = W.SHAPES["Qwen2.5-Math-1.5B/7B"]
    cfg = getattr(shape, which)
    dims = {"small": (1536, 28, 8960, 151936), "large": (3584, 28, 18944, 152064)}[which]
    assert (cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size) == dims
    assert cfg.max_position_embeddings == 4096 and cfg.rope_global.theta == 10000.0
    assert not cfg.tie_embeddings and cfg.eos_token_ids == (W.EOS,) and shape.dtype == "bfloat16"
    d = W.design(W.StepLengths(), cfg.hidden_size, dtype=jnp.bfloat16)
    built = jax.eval_shape(
        lambda key: W._params(cfg, key, jnp.asarray(d["embed"]), jnp.asarray(d["head"]),
                              jnp.float32(d["on"]), jnp.float32(d["shift"]), dtype=jnp.bfloat16,
                              on_dim=d["on_dim"], shift_dim=d["shift_dim"]),
        jax.random.key(0))
    want = param_shapes(cfg, jnp.bfloat16)
    assert jax.tree.structure(built) == jax.tree.structure(want)
    assert jax.tree.leaves(built) == jax.tree.leaves(want)
