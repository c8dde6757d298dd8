"""Decoding against HF transformers and against our own full forward: tokens, measures, steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
from steer_jax import generate, load_model
from steer_jax.decoding import build_masks, decode, read, rollback, step_confidence, vocab_masks
from steer_jax.decoding.sampler import Greedy, Stops, argmax, token_measures
from steer_jax.modeling import KVCache, forward, logits
from steer_jax.modeling.transformer import Model

RS = np.random.RandomState(7)
PROMPTS = [RS.randint(3, 120, size=n).tolist() for n in (5, 11, 2)]


@pytest.fixture(scope="module")
def models(tiny_models):
    return {name: (load_model(tiny_models[name][0], "float32"), tiny_models[name][1])
            for name in ("qwen2_untied_gqa", "gemma3_text")}


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [float(x.max()) for x in out.logits]


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_greedy_matches_transformers(models, name):
    model, hf = models[name]
    n = 28  # Gemma's window is 4: most of these tokens attend past it
    res = generate(model, PROMPTS, n)
    for prompt, toks, max_logits, reason in zip(PROMPTS, res.tokens, res.max_logits,
                                                res.stop_reasons):
        ref, ref_max = hf_greedy(hf, prompt, n)
        assert toks == ref
        np.testing.assert_allclose(max_logits, ref_max, atol=1e-3)
        assert reason == ("eos" if ref[-1] in model.config.eos_token_ids else "max_tokens")


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_cached_decode_equals_full_forward(models, name):
    """Ragged rows fed one token at a time through the cache give the full forward's logits."""
    model, _ = models[name]
    cfg, T = model.config, 20
    seqs = np.stack([RS.randint(3, 120, size=T) for _ in range(2)])
    full = np.asarray(model.logits(seqs))
    cache = KVCache.init(cfg, 2, 32, model.dtype)
    # Row 1 starts 3 tokens behind row 0: it pads its first chunk, then the length is corrected.
    fwd = jax.jit(forward, static_argnums=1)
    hidden, cache = fwd(model.params, cfg, jnp.asarray(seqs[:, :5]), cache)
    cache = dataclasses.replace(cache, length=jnp.array([5, 2]))
    got = [[np.asarray(logits(model.params, cfg, hidden[0, :5]))], [np.asarray(
        logits(model.params, cfg, hidden[1, :2]))]]
    pos = np.array([5, 2])
    while pos.min() < T:
        step = np.minimum(pos, T - 1)
        h, cache = fwd(model.params, cfg, jnp.asarray(seqs[[0, 1], step][:, None]), cache)
        for r in range(2):
            if pos[r] < T:
                got[r].append(np.asarray(logits(model.params, cfg, h[r])))
        pos = pos + 1
        cache = dataclasses.replace(cache, length=jnp.asarray(np.minimum(pos, T)))
    for r in range(2):
        np.testing.assert_allclose(np.concatenate(got[r]), full[r], atol=2e-5, rtol=1e-5)


def test_sampling_is_batch_invariant(models):
    model, _ = models["gemma3_text"]
    alone = generate(model, [PROMPTS[1]], 24, temperature=0.7, seed=3, trace_ids=[42])
    mixed = generate(model, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], 24, temperature=0.7, seed=3,
                     trace_ids=[5, 6, 42])
    assert mixed.tokens[2] == alone.tokens[0]
    other_seed = generate(model, [PROMPTS[1]], 24, temperature=0.7, seed=4, trace_ids=[42])
    assert other_seed.tokens[0] != alone.tokens[0]
    other_id = generate(model, [PROMPTS[1]], 24, temperature=0.7, seed=3, trace_ids=[43])
    assert other_id.tokens[0] != alone.tokens[0]


def test_top_p_restricts_to_nucleus():
    from steer_jax.decoding.sampler import Sample, row_keys, sample

    lg = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = row_keys(jnp.int32(0), jnp.arange(512), jnp.zeros(512, jnp.int32))
    drawn = np.asarray(sample(Sample(1.0, 0.75), lg, keys))
    assert set(drawn) == {0, 1}  # 0.5 + 0.3 reach 0.75; 0.15 and 0.05 are cut
    drawn = np.asarray(sample(Sample(1.0, 1.0), lg, keys))
    assert set(drawn) == {0, 1, 2, 3}


# Step mode: a tokenizer whose token texts we choose, over the greedy path of a random model.

@pytest.fixture(scope="module")
def path(models):
    model, _ = models["qwen2_untied_gqa"]
    eos_free = Model(dataclasses.replace(model.config, eos_token_ids=()), model.params)
    toks = generate(eos_free, [PROMPTS[0]], 24).tokens[0]
    return eos_free, toks


def _first_new(toks, k):
    """Index j >= k such that toks[j] does not occur before it (so its text alone decides)."""
    return next(j for j in range(k, len(toks)) if toks[j] not in toks[:j])


def test_step_stops_at_delimiter_token(path):
    model, toks = path
    j = _first_new(toks, 4)
    texts = tiny.plain_texts()
    texts[toks[j]] = "so\n\nthen"
    res = generate(model, [PROMPTS[0]], 24, stop_at_step=True, tokenizer=tiny.tokenizer(texts))
    assert res.tokens[0] == toks[: j + 1] and res.stop_reasons == ["delimiter"]
    np.testing.assert_allclose(res.step_confidence[0], np.mean(res.max_logits[0]), rtol=1e-6)


def test_step_stops_at_delimiter_split_over_two_tokens(path):
    model, toks = path
    j = next(j for j in range(4, len(toks)) if toks[j] not in toks[:j]
             and toks[j - 1] not in toks[: j - 1] and toks[j] != toks[j - 1])
    texts = tiny.plain_texts()
    texts[toks[j - 1]], texts[toks[j]] = "end.\n", "\nnext"
    res = generate(model, [PROMPTS[0]], 24, stop_at_step=True, tokenizer=tiny.tokenizer(texts))
    assert res.tokens[0] == toks[: j + 1] and res.stop_reasons == ["delimiter"]


def test_split_delimiter_needs_both_halves_in_the_step(path):
    """A step whose first token starts with "\\n" after a prompt ending in "\\n" goes on."""
    model, toks = path
    texts = tiny.plain_texts()
    texts[PROMPTS[0][-1]] = "prompt\n"
    texts[toks[0]] = "\nstart"
    res = generate(model, [PROMPTS[0]], 24, stop_at_step=True, tokenizer=tiny.tokenizer(texts))
    # Host reference: the step ends where two adjacent step tokens first join into "\n\n".
    joined = [j for j in range(1, len(toks)) if (texts[toks[j - 1]] + texts[toks[j]]).count(
        "\n\n") > 0]
    end = joined[0] + 1 if joined else len(toks)
    assert res.tokens[0] == toks[:end] and len(res.tokens[0]) > 1


def test_step_stops_at_eos_and_max_tokens(path):
    model, toks = path
    j = _first_new(toks, 3)
    with_eos = Model(dataclasses.replace(model.config, eos_token_ids=(toks[j],)), model.params)
    texts = tiny.plain_texts()
    res = generate(with_eos, [PROMPTS[0]], 24, stop_at_step=True, tokenizer=tiny.tokenizer(texts))
    assert res.tokens[0] == toks[: j + 1] and res.stop_reasons == ["eos"]
    res = generate(model, [PROMPTS[0]], 5, stop_at_step=True, tokenizer=tiny.tokenizer(texts))
    assert res.tokens[0] == toks[:5] and res.stop_reasons == ["max_tokens"]


def test_step_confidence_over_math_tokens(path):
    model, toks = path
    texts = tiny.plain_texts()
    math_ids = {toks[2], toks[5]}
    for t in math_ids:
        texts[t] = "\\frac{1}{2}" if t == toks[2] else "x=3"
    tok = tiny.tokenizer(texts)
    for measure, col in (("max_logit", "max_logits"), ("max_prob", "max_probs"),
                         ("neg_entropy", "neg_entropies")):
        res = generate(model, [PROMPTS[0]], 10, stop_at_step=True, tokenizer=tok,
                       confidence=measure, aggregate="math")
        values = np.array(getattr(res, col)[0])
        chosen = [i for i, t in enumerate(res.tokens[0]) if t in math_ids]
        np.testing.assert_allclose(res.step_confidence[0], values[chosen].mean(), rtol=1e-6)
    # No math token in the step: the mean falls back to all tokens.
    res = generate(model, [PROMPTS[0]], 2, stop_at_step=True, tokenizer=tok, aggregate="math")
    np.testing.assert_allclose(res.step_confidence[0], np.mean(res.max_logits[0]), rtol=1e-6)


def test_measures_match_softmax_of_logits():
    lg = jnp.asarray(np.random.RandomState(0).randn(3, 50).astype(np.float32) * 3)
    got = np.asarray(token_measures(lg))
    p = torch.softmax(torch.tensor(np.asarray(lg)), -1).numpy()
    np.testing.assert_allclose(got[:, 0], np.asarray(lg).max(-1), rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], p.max(-1), rtol=1e-5)
    np.testing.assert_allclose(got[:, 2], (p * np.log(p)).sum(-1), rtol=1e-5)


def test_argmax_is_numpys_first_maximal_index():
    """Ties go to the first index, and a NaN counts as maximal (numpy's rule), at a real
    vocabulary's width."""
    lg = np.random.RandomState(1).randn(6, 151936).astype(np.float32)
    lg[1, [5, 70000]] = 9.0  # a tie
    lg[2, [9, 40]] = np.nan
    lg[3] = -np.inf
    lg[4, -1] = 50.0
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(lg))), np.argmax(lg, -1))


def test_real_tokenizer_masks(hf_meta):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_meta / "Qwen2.5-1.5B-Instruct")
    masks = vocab_masks(tok, 151936)
    nl, nlnl = tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    word = tok.convert_tokens_to_ids("Ġthe")
    assert bool(masks.has_delimiter[nlnl]) and not bool(masks.has_delimiter[nl])
    yes = masks.step_ends(jnp.array([nl]), jnp.array([nl]), jnp.array([True]))
    no = masks.step_ends(jnp.array([word]), jnp.array([nl]), jnp.array([True]))
    assert bool(yes[0]) and not bool(no[0])
    math_tokens = tok.convert_tokens_to_ids(["\\", "}{", "1", "Ġ+", "=", "Ġ"])
    assert [bool(masks.is_math[i]) for i in math_tokens] == [True] * 5 + [False]
    assert not bool(masks.is_math[tok.convert_tokens_to_ids("<|im_end|>")])
    assert not bool(masks.is_math[151900])  # past the tokenizer: padding rows of the embedding


# Teacher-forced reads and rollback.

@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_teacher_forced_read_matches_full_forward(models, name):
    model, _ = models[name]
    cfg = model.config
    seqs = np.stack([RS.randint(3, 120, size=18) for _ in range(2)])
    full = np.asarray(token_measures(model.logits(seqs)))
    cache = KVCache.init(cfg, 2, 32, model.dtype)
    cache, first = read(model.params, cfg, cache, jnp.asarray(seqs[:, :7]), jnp.array([7, 4]))
    # Row 1 continues from its 4th token: the second read picks each row up where it stopped.
    rest = np.zeros((2, 14), np.int32)
    rest[0, :11], rest[1] = seqs[0, 7:], seqs[1, 4:]
    cache, second = read(model.params, cfg, cache, jnp.asarray(rest), jnp.array([11, 14]))
    got0 = np.concatenate([np.asarray(first[0, :7]), np.asarray(second[0, :11])])
    got1 = np.concatenate([np.asarray(first[1, :4]), np.asarray(second[1, :14])])
    np.testing.assert_allclose(got0, full[0], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got1, full[1], atol=1e-4, rtol=1e-5)
    assert list(np.asarray(cache.length)) == [18, 18]


def test_rollback_then_generate_equals_shorter_prefix(models):
    model, _ = models["gemma3_text"]
    cfg = dataclasses.replace(model.config, eos_token_ids=())
    prompt = np.array([PROMPTS[1]], np.int32)
    run = dict(sampler=Greedy(), max_tokens=12, stops=Stops())
    args = (jnp.ones(1, bool), jnp.int32(0), jnp.zeros(1, jnp.int32), None)
    cache = KVCache.init(cfg, 1, 64, model.dtype)
    first = decode(model.params, cfg, cache, jnp.asarray(prompt), jnp.array([11]), *args, **run)
    toks = np.asarray(first.tokens[0])
    # Keep the prompt and 3 generated tokens in the cache; the 4th is pending again.
    cache = rollback(first.cache, jnp.array([11 + 3]))
    again = decode(model.params, cfg, cache, jnp.asarray(toks[3:4][None]), jnp.array([1]),
                      *args, **run)
    assert np.asarray(again.tokens[0]).tolist()[:8] == toks[4:].tolist()[:8]


def test_bad_prompts_fail_before_compute(models):
    model, _ = models["qwen2_untied_gqa"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[3], []], 4)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[3, 500]], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        generate(model, [[3] * 500], 20)


def test_build_masks_rejects_small_vocab():
    with pytest.raises(ValueError, match="tokenizer has 5 tokens but the model only 4"):
        build_masks(["a"] * 5, 4)


def test_step_confidence_of_empty_row_is_nan():
    conf = step_confidence(jnp.ones((1, 3, 3)), jnp.zeros((1, 3), jnp.int32), jnp.array([0]),
                           measure="max_logit")
    assert np.isnan(np.asarray(conf)[0])
