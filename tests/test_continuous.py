"""The continuous schedule: one loop with rounds, a trace routed as soon as its step ends.

Rounds put a barrier at each boundary: their write calls repeat until every step of the round
ended, so rounds in chunks of a few tokens are the rounds of whole steps, bit for bit. Without
the barrier, a step ends at the first boundary after it is done and its trace is routed there.
"""

from __future__ import annotations

import pytest

import tiny

SHORT = tiny.SHORT
CONT = dict(schedule="continuous", chunk=4)
_run = tiny.run


@pytest.mark.parametrize("chunk", [1, 5])
def test_rounds_in_chunks_are_the_rounds_of_whole_steps(pair, chunk):
    """Chunk 1 splits every "\\n" + "\\n" delimiter over two calls; the step still ends there."""
    whole, chunked = _run(pair, refine="all"), _run(pair, refine="all", chunk=chunk)
    assert chunked.traces == whole.traces and chunked.mixtures == whole.mixtures
    assert any(s.model == "large" for t in whole.traces for s in t.steps)
    assert chunked.iterations == whole.iterations  # positions stepped, whatever the calls


def test_continuous_gamma_zero_is_small_only_and_gamma_one_is_large_only(pair):
    small, large = _run(pair, method="small_only"), _run(pair, method="large_only")
    zero, one = _run(pair, gamma=0.0, **CONT), _run(pair, gamma=1.0, **CONT)
    assert [t.tokens for t in zero.traces] == [t.tokens for t in small.traces]
    assert all(s.model == "small" for t in zero.traces for s in t.steps)
    assert [t.tokens for t in one.traces] == [t.tokens for t in large.traces]
    assert all(s.model == "large" for t in one.traces for s in t.steps)
    assert [t.discarded for t in one.traces] == [t.steps[0].tokens for t in small.traces]
    # The baselines themselves do not depend on the schedule, only their steps' rounds do.
    cont = _run(pair, method="large_only", **CONT)
    steps = lambda r: [[(s.model, s.tokens, s.confidence) for s in t.steps]  # noqa: E731
                       for t in r.traces]
    assert steps(cont) == steps(large) and cont.iterations["large"] < large.iterations["large"]


def test_a_trace_is_routed_at_the_boundary_its_step_ended(pair):
    res = _run(pair, gamma=0.5, **CONT)
    rounds = {m.round for m in res.mixtures if m.model == "all"}
    assert len(rounds) == len([m for m in res.mixtures if m.model == "all"])  # one refit each
    steps = [s for t in res.traces for s in t.steps]
    assert any(s.model == "large" for s in steps) and any(s.model == "small" for s in steps)
    for t in res.traces:
        ends = [s.round for s in t.steps]
        assert ends == sorted(set(ends)) and all(e in rounds for e in ends)
        # A step of n tokens needs ceil(n / chunk) rounds (a rewritten draft more).
        assert all(b - a >= -(-s.tokens // 4) for a, b, s in zip(ends, ends[1:], t.steps[1:]))
        for prev, nxt in zip(t.steps, t.steps[1:]):
            assert (nxt.model == "large") == (prev.posterior < 0.5), (prev, nxt)
    # A continuous round is a chunk long: a run has more of them than a trace has steps.
    assert len(rounds) > SHORT["max_steps"]


def test_continuous_traces_do_not_depend_on_the_batch(pair):
    """Same tokens, writers and rounds. A large step's confidence is the small model's read
    of it, whose width follows the call's rows: it may differ in the last float bit."""
    one, calls = _run(pair, **CONT), _run(pair, batch_size=3, **CONT)
    key = lambda r: [(t.tokens, t.stop, t.generated, t.read, t.discarded,  # noqa: E731
                      [(s.model, s.tokens, s.round) for s in t.steps]) for t in r.traces]
    assert key(calls) == key(one)
    conf = lambda r: [s.confidence for t in r.traces for s in t.steps]  # noqa: E731
    assert conf(calls) == pytest.approx(conf(one), rel=1e-6)


def test_a_large_step_read_a_chunk_a_boundary_scores_as_hf_reads_it_whole(pair):
    """Continuous, the small model reads a large step as it is written, a chunk at a boundary;
    its confidence (source small) is still the mean max-logit transformers' small model gives
    the step's tokens, read with everything before them in one pass."""
    import torch
    import transformers as tf

    res = _run(pair, gamma=0.5, **CONT)
    hf_small = tf.Qwen2ForCausalLM.from_pretrained(pair["small_dir"]).eval()
    chunk = CONT["chunk"]
    long = [(t, i) for t in res.traces for i, s in enumerate(t.steps)
            if s.model == "large" and s.tokens > chunk]
    assert long, "no large step longer than a chunk: nothing read across boundaries"
    for t, i in long:
        before = sum(s.tokens for s in t.steps[:i])
        prefix = pair["prompts"][t.id] + t.tokens[:before]
        step = t.tokens[before:before + t.steps[i].tokens]
        with torch.no_grad():
            lg = hf_small(torch.tensor([prefix + step])).logits[0]
        # Token j of the step is predicted at the position before it.
        top = lg[len(prefix) - 1:len(prefix) - 1 + len(step)].max(-1).values
        assert t.steps[i].confidence == pytest.approx(float(top.mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["specreason", "query_router"])
def test_baselines_run_continuous(pair, method):
    extra = dict(route_queries=[i % 2 == 0 for i in range(8)]) if method == "query_router" else {}
    res = _run(pair, method=method, **CONT, **extra)
    for t in res.traces:
        assert t.steps and sum(s.tokens for s in t.steps) == len(t.tokens)
    if method == "query_router":
        assert all({s.model for s in t.steps} == {"large" if i % 2 == 0 else "small"}
                   for i, t in enumerate(res.traces))


def test_bad_schedule_or_chunk_is_named():
    from steer_jax.steer import SteerOptions
    with pytest.raises(ValueError, match="steer.schedule"):
        SteerOptions(schedule="async")
    with pytest.raises(ValueError, match="steer.chunk"):
        SteerOptions(chunk=0)
