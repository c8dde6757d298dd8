"""Paged KV caches: pages taken as a trace grows and given back when it shrinks or ends; attention
over scattered pages equals a plain forward and transformers; a pool too small for every trace
evicts and re-reads them to the same traces, and rounds cut into calls fit one mixture."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
from steer_jax import load_model, load_tokenizer, steer
from steer_jax.decoding import paging
from steer_jax.decoding import sampler as dec
from steer_jax.modeling import execution, kv_cache, paged_attention
from steer_jax.modeling.kv_cache import KVCache
from steer_jax.run_config import RunConfigError, validate

steer_module = importlib.import_module("steer_jax.round_loop")
RS = np.random.RandomState(5)
PROMPTS = [RS.randint(3, 120, size=n).tolist() for n in (5, 11, 2)]
append = jax.jit(dec.append, static_argnames=("cfg", "scores"))


@pytest.fixture(scope="module")
def models(tiny_models):
    return {name: (load_model(tiny_models[name][0], "float32"), tiny_models[name][1])
            for name in ("qwen2_untied_gqa", "gemma3_text")}


def _fragmented(cfg, batch: int, slots: int, dtype, page_size: int) -> KVCache:
    """A pool whose free pages are every other one, so rows' pages interleave and skip."""
    pool = 2 * batch * -(-slots // page_size) + 1
    cache = KVCache.init(cfg, batch, slots, dtype, page_size=page_size, pool=pool)
    odd = jnp.arange(pool + 1) % 2 == 1
    cache = dataclasses.replace(cache, free=cache.free & odd)
    return cache if not cache.split else dataclasses.replace(cache,
                                                             free_local=cache.free_local & odd)


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
@pytest.mark.parametrize("page_size", [3, 16])
def test_rows_growing_token_by_token_over_scattered_pages_equal_a_full_forward(models, name,
                                                                              page_size):
    """Two rows, 3 tokens apart, appended one token at a time: each takes a page when it
    crosses a page boundary, so their pages interleave; every next-token logit equals the full
    forward's (Gemma's window of 4 is crossed many times)."""
    model, _ = models[name]
    cfg, T = model.config, 20
    seqs = np.stack([RS.randint(3, 120, size=T) for _ in range(2)])
    full = np.asarray(model.logits(seqs))
    cache = _fragmented(cfg, 2, 32, model.dtype, page_size)
    cache, first, _ = append(model.params, cfg, cache, jnp.asarray(seqs[:, :5]),
                             jnp.array([5, 2]), scores=False)
    got = {0: [np.asarray(first[0])], 1: [np.asarray(first[1])]}
    for t in range(T - 5):
        step = jnp.asarray([[seqs[0, 5 + t]], [seqs[1, 2 + t]]])
        cache, nxt, _ = append(model.params, cfg, cache, step, jnp.array([1, 1]), scores=False)
        got[0].append(np.asarray(nxt[0]))
        got[1].append(np.asarray(nxt[1]))
    np.testing.assert_allclose(np.stack(got[0]), full[0, 4:], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.stack(got[1]), full[1, 1:T - 3], atol=1e-4, rtol=1e-5)
    pages = np.asarray(cache.pages)
    held = np.asarray(paging.held(cache))
    assert held.tolist() == [-(-n // page_size) for n in (T, T - 3)]
    used = np.concatenate([pages[b, :held[b]] for b in range(2)])
    assert len(set(used)) == len(used) and 0 not in used and (used % 2 == 1).all()
    if page_size == 3:  # the rows took turns: their pages are not each a contiguous run
        assert not all((np.diff(pages[b, :held[b]]) == 2).all() for b in range(2))


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_greedy_over_scattered_pages_equals_transformers(models, name):
    """Page size 5 divides the first prompt and not the others."""
    model, hf = models[name]
    n = 28
    width = max(map(len, PROMPTS))
    tokens = np.zeros((3, width), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    cache = _fragmented(model.config, 3, 64, model.dtype, 5)
    out = dec.decode(model.params, model.config, cache, jnp.asarray(tokens),
                     jnp.asarray([len(p) for p in PROMPTS]), jnp.ones(3, bool), jnp.int32(0),
                     jnp.arange(3, dtype=jnp.int32), None, sampler=dec.Greedy(), max_tokens=n,
                     stops=dec.Stops())
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n)[0, len(p):].tolist()
        assert np.asarray(out.tokens[i]).tolist() == ref
    # The call gave back the pages it reserved and did not write.
    assert np.asarray(paging.held(out.cache)).tolist() == [
        -(-(len(p) + n - 1) // 5) for p in PROMPTS]


def test_rollback_across_a_page_boundary_returns_pages(models):
    model, _ = models["qwen2_untied_gqa"]
    cfg = model.config
    cache = KVCache.init(cfg, 2, 32, model.dtype, page_size=4, pool=20)
    seqs = jnp.asarray(RS.randint(3, 120, size=(2, 18)))
    cache, _, _ = append(model.params, cfg, cache, seqs, jnp.array([18, 9]), scores=False)
    assert np.asarray(paging.held(cache)).tolist() == [5, 3]
    free = int(jnp.sum(cache.free))
    kept = np.asarray(cache.pages[0, :2])
    cache = dec.rollback(cache, jnp.array([7, 32]))  # row 0 back into its second page
    assert np.asarray(paging.held(cache)).tolist() == [2, 3]
    assert int(jnp.sum(cache.free)) == free + 3
    assert np.asarray(cache.pages[0, :2]).tolist() == kept.tolist()
    assert (np.asarray(cache.pages[0, 2:]) == kv_cache.NULL_PAGE).all()
    # What is left reads on as a shorter prefix: the next logits are the full forward's.
    full = np.asarray(model.logits(np.asarray(seqs[:1, :8])))
    cache, nxt, _ = append(model.params, cfg, cache, seqs[:, 7:8], jnp.array([1, 0]),
                           scores=False)
    np.testing.assert_allclose(np.asarray(nxt[0]), full[0, 7], atol=1e-4, rtol=1e-5)


def test_pallas_paged_kernel_generates_the_xla_paths_tokens(tiny_models, monkeypatch):
    """The engine's seam with JAX's GPU paged kernel, run in Pallas interpret mode: a decode
    through it writes the portable path's tokens (float32; its own tests compare the kernel
    with the reference at the number level)."""
    from steer_jax import generate

    model = load_model(tiny_models["qwen2_untied_gqa"][0], "float32", cpu_kernels=False)
    prompts = [p + [7] * 3 for p in PROMPTS]
    plain = generate(model, prompts, 9)
    calls, pallas_decode = [], paged_attention.pallas_decode

    def kernel(*args, **kw):
        calls.append(kw["backend"])
        return pallas_decode(*args, **kw, interpret=True)

    monkeypatch.setattr(execution, "pallas_backend", lambda *a: "gpu")
    monkeypatch.setattr(execution.paged_attention, "pallas_decode", kernel)
    jax.clear_caches()  # the plain path's programs would be reused
    via_kernel = generate(model, prompts, 9)
    jax.clear_caches()
    assert calls and set(calls) == {"gpu"}
    assert via_kernel.tokens == plain.tokens
    np.testing.assert_allclose(np.concatenate(via_kernel.max_logits),
                               np.concatenate(plain.max_logits), atol=1e-4)


# ---- the round loop over pages ----------------------------------------------------------------

SHORT = dict(max_steps=4, max_step_tokens=12, max_new_tokens=40, temperature=0.7, seed=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    small_dir, large_dir = tiny.steer_pair(tmp_path_factory.mktemp("pair"))
    tok = load_tokenizer(small_dir)
    run = functools.partial(steer, load_model(small_dir, "float32"),
                            load_model(large_dir, "float32"), tok, tiny.chat_prompts(tok), **SHORT)
    return run, run(gamma=0.5)


def _same_traces(a, b) -> None:
    assert [t.tokens for t in a.traces] == [t.tokens for t in b.traces]
    assert [[s.model for s in t.steps] for t in a.traces] == \
        [[s.model for s in t.steps] for t in b.traces]
    assert len(a.mixtures) == len(b.mixtures)
    for x, y in zip(a.mixtures, b.mixtures):
        assert (x.round, x.model) == (y.round, y.model)
        np.testing.assert_allclose(x.confidences, y.confidences, rtol=1e-5)


def test_a_pool_too_small_for_every_trace_evicts_rereads_and_writes_the_same_traces(pair):
    """8 traces of up to 10 pages of 8 tokens in pools of 30, in calls of 3: at most 2-3 stay
    resident, the rest give their pages back and read their tokens again when next scheduled.
    Every round, a trace that ended holds no page, and no page is lost or held twice."""
    run, whole = pair
    rounds = []

    def check(state) -> None:
        for cache in state.caches:
            held = np.asarray(paging.held(cache))
            assert (held[~np.asarray(state.trace.running)] == 0).all()
            assert held.sum() + int(jnp.sum(cache.free)) == 30
            pages = np.asarray(cache.pages)
            used = pages[pages != kv_cache.NULL_PAGE]
            assert len(set(used.tolist())) == len(used)
        rounds.append(state.round)

    paged = run(gamma=0.5, batch_size=3, page_size=8, pool_pages=30, on_round=check)
    _same_traces(paged, whole)
    # Calls of 3 traces, one mixture over all 8: round 0's drafts, then its kept steps.
    assert [len(m.confidences) for m in paged.mixtures if m.round == 0] == [8, 8]
    assert rounds == list(range(1, len(rounds) + 1)) and rounds
    reread = sum(t.read["small"] for t in paged.traces) - sum(t.read["small"]
                                                              for t in whole.traces)
    assert reread > 0 and paged.executed_tokens["small"] > whole.executed_tokens["small"]


def test_bad_page_size_or_pool_fails_before_compute(pair):
    run, _ = pair
    with pytest.raises(ValueError, match="cache.page_size must be a positive integer"):
        run(page_size=0)
    with pytest.raises(ValueError, match=r"cache.pages: the small model's pool of 4 pages of 8 "
                                         r"tokens cannot hold one trace \(.* need 10\)"):
        run(page_size=8, pool_pages=4)
    base = {"small": "s", "large": "l", "benchmark": {"name": "demo"}}
    with pytest.raises(RunConfigError, match="cache.page_size"):
        validate({**base, "cache": {"page_size": 0}})
    with pytest.raises(RunConfigError, match="cache.pages"):
        validate({**base, "cache": {"pages": -3}})
    with pytest.raises(RunConfigError, match=r"unknown config keys: cache\.pagesize"):
        validate({**base, "cache": {"pagesize": 32}})


@pytest.mark.parametrize("scan", [False, True])
def test_sliding_layers_give_back_pages_past_their_window_and_decode_as_transformers(
        models, tiny_models, scan):
    """Gemma (window 4) decodes 36 tokens in calls of 6 over pages of 2 tokens, its sliding
    layers giving back what their window no longer sees after each call (`paging.slide`): the
    local pool of 21 pages holds 3 rows' windows but not their 40-odd tokens (60 pages), so
    only freed pages reused make the tokens equal transformers' greedy ones, unrolled or
    scanned."""
    _, hf = models["gemma3_text"]
    model = load_model(tiny_models["gemma3_text"][0], "float32", scan_layers=scan)
    cfg, n, per_call, size = model.config, 36, 6, 2
    assert cfg.sliding_window == 4 and kv_cache.local_layers(cfg) == (0, 1, 3)
    cache = KVCache.init(cfg, 3, 64, model.dtype, page_size=size, pool=96, pool_local=21)
    width = max(map(len, PROMPTS))
    tokens = np.zeros((3, width), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    tokens, lengths, got = jnp.asarray(tokens), jnp.asarray([len(p) for p in PROMPTS]), []
    for _ in range(n // per_call):
        out = dec.decode(model.params, cfg, cache, tokens, lengths, jnp.ones(3, bool),
                         jnp.int32(0), jnp.arange(3, dtype=jnp.int32), None,
                         sampler=dec.Greedy(), max_tokens=per_call, stops=dec.Stops())
        got.append(np.asarray(out.tokens))
        # A margin of one token, as steer keeps for a discarded step's pending token.
        cache = paging.slide(out.cache, out.cache.length - 1, cfg.sliding_window)
        tokens, lengths = out.pending[:, None], jnp.ones(3, jnp.int32)
        held = np.asarray(paging.held(cache, local=True))
        assert (held <= cfg.sliding_window // size + 2).all(), held
        assert held.sum() + int(jnp.sum(cache.free_local)) == 21
    got = np.concatenate(got, axis=1)
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n)[0, len(p):].tolist()
        assert got[i].tolist() == ref
    # Rolling back within the margin works; past the pages given back, it refuses.
    kept = dec.rollback(cache, cache.length - 1, cfg.sliding_window)
    assert np.asarray(kept.length).tolist() == (np.asarray(cache.length) - 1).tolist()
    with pytest.raises(ValueError, match="past the pages their sliding layers gave back"):
        dec.rollback(kept, jnp.array([3, 50, 50]), cfg.sliding_window)


def test_gemma_pools_sliding_past_the_window_evict_reread_and_resume_to_the_same_traces(
        tmp_path_factory, monkeypatch):
    """A Gemma pair (window 4) over pages of 4 tokens, catch-up reads in chunks of 8: pools of
    30 global and 16 sliding-layer pages hold 1-2 of 5 traces, so traces are evicted and read
    again, their sliding layers giving pages back as they read. The traces equal those of
    pools that hold everything; at every round boundary a running trace's sliding layers hold
    at most its window's pages; a run resumed from round 2 ends as the uninterrupted one."""
    monkeypatch.setattr(steer_module, "CHUNK", 8)
    small_dir, large_dir = tiny.steer_pair(tmp_path_factory.mktemp("gemma"), family="gemma3")
    tok = load_tokenizer(small_dir)
    prompts = tiny.chat_prompts(tok, tiny.QUESTIONS[:5])
    run = functools.partial(steer, load_model(small_dir, "float32"),
                            load_model(large_dir, "float32"), tok, prompts, gamma=0.5,
                            **{**SHORT, "max_steps": 3})
    whole = run()
    states = []

    def check(state) -> None:
        running = np.asarray(state.trace.running)
        for cache in state.caches:
            local = np.asarray(paging.held(cache, local=True))
            assert (local[~running] == 0).all() and (local <= 4 // 4 + 2).all(), local
            assert local.sum() + int(jnp.sum(cache.free_local)) == 16
            assert np.asarray(paging.held(cache)).sum() + int(jnp.sum(cache.free)) == 30
        states.append(dataclasses.replace(state, caches=jax.tree.map(jnp.copy, state.caches)))

    pools = dict(batch_size=3, page_size=4, pool_pages=[(30, 16)] * 2)
    paged = run(on_round=check, **pools)
    _same_traces(paged, whole)
    assert sum(t.read["small"] for t in paged.traces) > sum(t.read["small"] for t in whole.traces)
    assert len(states) == 3
    resumed = run(resume_from=states[1], **pools)
    _same_traces(resumed, paged)
