"""RSD with a process reward model whose tokenizer is not the policy models' (issue #23): it reads
the question and the steps as text in its own tokens, in Skywork-o1-Open-PRM's format, and its
reads are billed. The reference is HF transformers running the same tiny PRM over the whole text
at once, built here from each step's text as Skywork's `prepare_input` lays it out."""

from __future__ import annotations

import json
import string

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import tiny
from steer_jax import load_model, load_tokenizer
from steer_jax.runner import run, summarize
from steer_jax.steer import SteerOptions, prepare

PRM_VOCAB = 160  # not the policy pair's 128
QUESTIONS = tiny.QUESTIONS


def prm_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Characters in another order than the policy tokenizer's, a BOS, and a few words of
    several characters: the same text takes other ids and another length here."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"][::-1]
    texts = ["<unk>", "<s>", "</s>"] + chars
    texts += [f"<pad{i}>" for i in range(PRM_VOCAB - 8 - len(texts))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(texts)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(w, normalized=False) for w in ("is", "the", "What", " a", "?\n")])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A tiny Qwen2 PRM (Skywork's layout: a causal LM plus `v_head.summary`) of its own
    vocabulary and tokenizer; its torch model and value head are the reference."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("prm") / "prm"
    torch.manual_seed(21)
    cfg = tiny.qwen2_config(tied=True, gqa=True, context=1024)
    cfg.vocab_size = PRM_VOCAB
    model = tf.Qwen2ForCausalLM(cfg)
    tiny.save(model, path, seed=21)
    g = torch.Generator().manual_seed(21)
    w, b = torch.randn(1, cfg.hidden_size, generator=g) * 0.3, torch.randn(1, generator=g)
    tensors = load_file(path / "model.safetensors")
    tensors.update({"v_head.summary.weight": w, "v_head.summary.bias": b})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    prm_tokenizer().save_pretrained(path)
    return dict(dir=path, model=load_model(path, "float32", value_head=True),
                tok=load_tokenizer(path), torch=model, w=w[0], b=b)


def _run(pair, foreign, **kw):
    return tiny.run(pair, method="rsd", prm=foreign["model"], prm_tokenizer=foreign["tok"],
                    prm_questions=QUESTIONS, **kw)


def _reference(pair, foreign, trace):
    """Skywork's layout of the question and the trace's steps, built independently from the
    result's text: (PRM token ids, the position of each step's reward)."""
    tok, prm_tok = pair["tok"], foreign["tok"]
    sid = prm_tok.encode("\n")[-1]
    ids = prm_tok.encode(prm_tok.bos_token + QUESTIONS[trace.id] + "\n")
    at, pos = [], 0
    for step in trace.steps:
        text = tok.decode(trace.tokens[pos:pos + step.tokens], skip_special_tokens=True)
        pos += step.tokens
        pieces = [p for p in text.split("\n") if p]
        ids += [t for p in pieces for t in prm_tok.encode(p) + [sid]] or [sid]
        at.append(len(ids) - 1)
    return ids, at


def _check_scores(pair, foreign, res):
    """Every judged step's score is the HF PRM's value at its step token; returns how many."""
    scored = 0
    for t in res.traces:
        ids, at = _reference(pair, foreign, t)
        with torch.no_grad():
            hidden = foreign["torch"].model(torch.tensor([ids])).last_hidden_state[0]
        values = torch.sigmoid(hidden @ foreign["w"] + foreign["b"])
        for step, i in zip(t.steps, at):
            if step.score is not None:
                assert step.model == "small"
                assert step.score == pytest.approx(float(values[i]), rel=1e-4, abs=1e-6)
                scored += 1
    return scored


def _last_scored_end(pair, foreign, trace):
    ids, at = _reference(pair, foreign, trace)
    last = max(i for i, s in enumerate(trace.steps) if s.score is not None)
    return at[last] + 1


def test_the_policy_and_prm_tokenizers_differ(pair, foreign):
    assert pair["tok"].get_vocab() != foreign["tok"].get_vocab()
    q = QUESTIONS[0]
    assert pair["tok"].encode(q) != foreign["tok"].encode(q)
    loop, _ = prepare(pair["small"], pair["large"], pair["tok"], pair["prompts"], method="rsd",
                      prm=foreign["model"], prm_tokenizer=foreign["tok"], **tiny.SHORT)
    assert loop.text_prm is not None
    # A PRM tokenizer of the same vocabulary keeps the cheaper path: the trace's own tokens.
    same, _ = prepare(pair["small"], pair["large"], pair["tok"], pair["prompts"], method="rsd",
                      prm=foreign["model"], prm_tokenizer=load_tokenizer(pair["small_dir"]),
                      **tiny.SHORT)
    assert same.text_prm is None
    with pytest.raises(ValueError, match="prm_questions holds 2 questions for 8 prompts"):
        prepare(pair["small"], pair["large"], pair["tok"], pair["prompts"], method="rsd",
                prm=foreign["model"], prm_tokenizer=foreign["tok"], prm_questions=QUESTIONS[:2],
                **tiny.SHORT)


@pytest.fixture(scope="module")
def kept(pair, foreign):
    """Threshold 0 keeps every draft: the PRM reads each trace once, through its last small
    step."""
    return _run(pair, foreign, prm_threshold=0.0)


def _median_score(res) -> float:
    return float(np.median([s.score for t in res.traces for s in t.steps if s.score is not None]))


def test_scores_equal_hf_and_every_read_is_billed(pair, foreign, kept):
    assert _check_scores(pair, foreign, kept) >= len(QUESTIONS)
    assert kept.routing_s > 0  # the PRM's passes are counted as routing latency
    n_prm = foreign["model"].num_params
    for t in kept.traces:
        assert t.read["prm"] == _last_scored_end(pair, foreign, t)
    summary = summarize(kept, [True] * len(QUESTIONS), SteerOptions(**tiny.SHORT), "x", 1.0)
    params = kept.params
    by_hand = sum(2 * params[m] * t.read[m] for t in kept.traces for m in ("small", "large"))
    by_hand += sum(2 * n_prm * t.read["prm"] for t in kept.traces)
    assert params["prm"] == n_prm
    assert summary.prefill_flops_per_query == pytest.approx(
        by_hand / len(QUESTIONS) / 1e12, rel=1e-12)
    assert kept.executed_tokens["prm"] >= sum(t.read["prm"] for t in kept.traces)

    # A threshold between the scores rejects some drafts; the PRM cuts them off its cache, so
    # the later steps' scores still equal a reading of the kept text alone.
    scores = sorted(s.score for t in kept.traces for s in t.steps if s.score is not None)
    strict = _run(pair, foreign, prm_threshold=float(np.median(scores)))
    assert _check_scores(pair, foreign, strict) > 0
    assert any(s.model == "large" for t in strict.traces for s in t.steps)
    assert all(s.score >= np.median(scores) for t in strict.traces for s in t.steps
               if s.score is not None)
    # Rejected drafts were read too: the bill holds more than the kept text's reads.
    assert sum(t.read["prm"] for t in strict.traces) > sum(
        _last_scored_end(pair, foreign, t) for t in strict.traces
        if any(s.score is not None for s in t.steps))


def test_continuous_checks_drafts_at_their_boundaries_on_the_kept_text(pair, foreign, kept):
    # The median of the scores when every draft is kept rejects some drafts.
    res = _run(pair, foreign, prm_threshold=_median_score(kept), schedule="continuous", chunk=4)
    assert _check_scores(pair, foreign, res) > 0
    assert any(s.model == "large" for t in res.traces for s in t.steps)


def test_evicted_prm_rows_read_their_text_again(pair, foreign):
    # Pools of 16-token pages: the PRM's holds fewer traces than run, so calls evict and rows
    # read their question and kept steps again, and are billed for it.
    whole = _run(pair, foreign, page_size=16, prm_threshold=0.5)
    tight = _run(pair, foreign, page_size=16, prm_threshold=0.5, batch_size=3,
                 pool_pages=[None, None, 14])
    assert [t.tokens for t in tight.traces] == [t.tokens for t in whole.traces]
    assert _check_scores(pair, foreign, tight) > 0
    assert sum(t.read["prm"] for t in tight.traces) > sum(t.read["prm"] for t in whole.traces)


def test_resumed_inside_the_prm_calls_or_after_a_round_ends_as_the_whole_run(pair, foreign):
    calls, rounds = [], []
    whole = _run(pair, foreign, batch_size=3, prm_threshold=0.5,
                 on_call=lambda s: calls.append(tiny.copied(s)),
                 on_round=lambda s: rounds.append(tiny.copied(s)))
    inside = next(s for s in calls if s.round == 1 and s.within.phase == 1
                  and not s.within.shared)
    assert bool(jnp.any(inside.within.done))
    for state in (inside, rounds[1]):
        resumed = _run(pair, foreign, batch_size=3, prm_threshold=0.5, resume_from=state)
        assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures
        assert resumed.executed_tokens == whole.executed_tokens


def test_a_run_config_with_a_foreign_prm_writes_its_bill(pair, foreign, tmp_path):
    cfg = {"small": str(pair["small_dir"]), "large": str(pair["large_dir"]), "dtype": "float32",
           "method": "rsd", "rsd": {"prm": str(foreign["dir"]), "threshold": 0.5},
           "benchmark": {"name": "demo", "limit": 3},
           "steer": {k: v for k, v in tiny.SHORT.items() if k not in ("temperature", "seed")}}
    run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    traces = [json.loads(x) for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert summary["params"]["prm"] == foreign["model"].num_params
    assert all(t["read"]["prm"] > 0 for t in traces)
    by_hand = sum(2 * summary["params"][m] * t["read"][m] for t in traces
                  for m in ("small", "large", "prm"))
    assert summary["prefill_flops_per_query"] == pytest.approx(by_hand / 3 / 1e12, rel=1e-12)
