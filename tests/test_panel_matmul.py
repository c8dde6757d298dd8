"""The CPU kernels (matmul over packed weights, decode attention): against numpy in float64, and
through load_model against XLA's ops."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steer_jax import CheckpointError, generate, load_model
from steer_jax.modeling import panel_matmul as pm
from steer_jax.modeling.export import hf_tensors

IDS = [[3, 17, 99, 5, 64, 2, 8, 120, 41, 7]]


@pytest.fixture(scope="module")
def kernel():
    pm.load()


# Rows below, at and above a register block and a row tile; N off the panel width; K odd, and
# past a chunk of K (AVX2 machines) by a remainder.
@pytest.mark.parametrize("m, k, n", [(1, 33, 32), (13, 96, 70), (16, 512, 1536), (17, 64, 96),
                                     (300, 40, 65), (7, 301, 64)])
def test_matmul_matches_float64(kernel, m, k, n):
    rs = np.random.RandomState(m + k + n)
    x, w = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
    got = np.asarray(jax.jit(pm.matmul)(jnp.asarray(x), pm.pack(jnp.asarray(w), 1)))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    # A float32 chain of K products of unit normals: measured up to ~1.5e-7 K from float64
    # (XLA's dot ~0.6e-7 K); a wrong panel, row or remainder is off by O(1).
    assert np.abs(got - ref).max() < 5e-7 * k


def test_rows_do_not_depend_on_their_batch(kernel):
    """Every output is one multiply-add chain over k: a row's bits are the same alone or in any
    batch, on any number of threads (the engine's batch invariance leans on it)."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(37, 256).astype(np.float32))
    w = pm.pack(jnp.asarray(rs.randn(256, 320).astype(np.float32)), 1)
    whole = np.asarray(pm.matmul(x, w))
    for rows in (slice(5, 6), slice(0, 16), slice(16, 37), slice(3, 20)):
        np.testing.assert_array_equal(np.asarray(pm.matmul(x[rows], w)), whole[rows])


def reference_attention(q, k, v, mask, scale):
    """Float64 softmax attention over dense k, v [B, K, S, hd]; a row with no valid slot averages
    them all (as XLA's softmax of all-masked scores does)."""
    s = np.einsum("bkgd,bksd->bkgs", q.astype(np.float64), k) * scale
    s = np.where(mask[:, None, None], s, -np.inf)
    s = np.where(mask.any(-1)[:, None, None, None], s, 0.0)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bkgs,bksd->bkgd", p / p.sum(-1, keepdims=True), v)


def gather_pages(pool, pages, s):
    """A pool [K, N, P, hd] read through page tables [B, M] as dense [B, K, s, hd]."""
    P = pool.shape[2]
    slot = np.arange(s)
    return pool[:, pages[:, slot // P], slot % P].transpose(1, 0, 2, 3)


def paged_cache(rs, b, kv, d, page, lengths, s, spare=3):
    """Pools holding `b` rows of `lengths` slots in shuffled pages (plus `spare` pages nobody
    uses), their page tables [b, ceil(s / page)] with unused entries on the null page 0, and a
    random mask inside each row's length."""
    m = -(-s // page)
    used = [-(-n // page) for n in lengths]
    ids = 1 + rs.permutation(sum(used) + spare)
    pages = np.zeros((b, m), np.int32)
    for row, (n, start) in enumerate(zip(used, np.cumsum([0] + used))):
        pages[row, :n] = ids[start: start + n]
    k_pool, v_pool = (rs.randn(kv, 1 + len(ids), page, d).astype(np.float32) for _ in "kv")
    mask = (rs.rand(b, s) > 0.4) & (np.arange(s) < np.asarray(lengths)[:, None])
    return k_pool, v_pool, pages, mask


# Page sizes 1, 16 and 5 (dividing neither the rows' lengths nor, in one case, S); head dims on
# and off the vector width (8 lanes with AVX); one and several query heads a kv head.
@pytest.mark.parametrize("b, kv, g, d, page, s", [(3, 2, 4, 64, 16, 64), (2, 1, 1, 20, 1, 9),
                                                  (4, 3, 7, 8, 5, 70), (3, 2, 6, 128, 16, 48),
                                                  (5, 2, 4, 17, 5, 33)])
def test_decode_attention_matches_float64(kernel, b, kv, g, d, page, s):
    rs = np.random.RandomState(b + s + d + page)
    lengths = [s, *rs.randint(1, s + 1, b - 2), s - 1]
    k_pool, v_pool, pages, mask = paged_cache(rs, b, kv, d, page, lengths, s)
    mask[0, :3] = True
    mask[1] = False  # nothing to attend to: the average of all s slots, null pages included
    q = rs.randn(b, kv, g, d).astype(np.float32)
    got = np.asarray(jax.jit(pm.decode_attention, static_argnums=5)(
        *map(jnp.asarray, (q, k_pool, v_pool, pages, mask)), 0.3))
    want = reference_attention(q, gather_pages(k_pool, pages, s), gather_pages(v_pool, pages, s),
                               mask, 0.3)
    assert got.shape == (b, kv, g, d) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_decode_attention_rows_do_not_depend_on_their_batch(kernel):
    """A row's bits come from its own q, pages and mask only: the same alone, in any batch, and
    whatever the other rows' pages hold."""
    rs = np.random.RandomState(1)
    k_pool, v_pool, pages, mask = paged_cache(rs, 9, 2, 16, 8, rs.randint(1, 41, 9), 40)
    q = rs.randn(9, 2, 3, 16).astype(np.float32)
    mask[6] = False
    whole = np.asarray(pm.decode_attention(*map(jnp.asarray, (q, k_pool, v_pool, pages, mask)),
                                           0.25))
    for rows in (slice(4, 5), slice(2, 9), slice(6, 7)):
        mine = np.unique(pages[rows])
        others = np.setdiff1d(np.arange(k_pool.shape[1]), mine)
        k2, v2 = k_pool.copy(), v_pool.copy()
        k2[:, others], v2[:, others] = rs.randn(2, 2, len(others), 8, 16)
        np.testing.assert_array_equal(
            np.asarray(pm.decode_attention(*map(jnp.asarray, (q[rows], k2, v2, pages[rows],
                                                              mask[rows])), 0.25)),
            whole[rows])


def test_decode_attention_never_reads_masked_slots(kernel):
    """Pages a row does not attend to (freed ones, the null page, a short row's tail) may hold
    anything, NaN included, without reaching its output."""
    rs = np.random.RandomState(2)
    k_pool, v_pool, pages, mask = paged_cache(rs, 4, 2, 16, 4, [13, 20, 3, 9], 20)
    mask[:, 0] = True
    q = rs.randn(4, 2, 2, 16).astype(np.float32)
    args = lambda k, v: map(jnp.asarray, (q, k, v, pages, mask))  # noqa: E731
    clean = np.asarray(pm.decode_attention(*args(k_pool, v_pool), 0.5))
    k_bad, v_bad = k_pool.copy(), v_pool.copy()
    read = np.zeros(k_pool.shape[1:3], bool)  # [N, P]: the (page, slot) pairs some row attends to
    for row, s in np.argwhere(mask):
        read[pages[row, s // 4], s % 4] = True
    k_bad[:, ~read], v_bad[:, ~read] = np.nan, np.nan
    assert not read[0].any() and read.any(1).sum() < read.shape[0] - 1  # null and spare pages
    np.testing.assert_array_equal(np.asarray(pm.decode_attention(*args(k_bad, v_bad), 0.5)),
                                  clean)


def test_decode_attention_reads_a_layer_of_stacked_pools_in_place(kernel):
    """Every layer's pools [L, K, N, P, hd] and a layer index (traced or not) give that layer's
    bits, as its own pools do; an index outside the stack is an error, not a stray read."""
    rs = np.random.RandomState(4)
    k_pool, _, pages, mask = paged_cache(rs, 5, 2, 16, 4, rs.randint(1, 21, 5), 20)
    k_all, v_all = (jnp.asarray(rs.randn(3, *k_pool.shape).astype(np.float32)) for _ in "kv")
    q = jnp.asarray(rs.randn(5, 2, 3, 16).astype(np.float32))
    at_layer = jax.jit(pm.decode_attention, static_argnums=5)
    for i, (k_pool, v_pool) in enumerate(zip(k_all, v_all)):
        alone = np.asarray(pm.decode_attention(q, jnp.asarray(k_pool), jnp.asarray(v_pool),
                                               jnp.asarray(pages), jnp.asarray(mask), 0.25))
        np.testing.assert_array_equal(np.asarray(pm.decode_attention(
            q, k_all, v_all, jnp.asarray(pages), jnp.asarray(mask), 0.25, i)), alone)
        np.testing.assert_array_equal(np.asarray(at_layer(
            q, k_all, v_all, jnp.asarray(pages), jnp.asarray(mask), 0.25, jnp.int32(i))), alone)
    with pytest.raises(Exception, match="layer index is outside"):
        np.asarray(pm.decode_attention(q, k_all, v_all, jnp.asarray(pages), jnp.asarray(mask),
                                       0.25, 3))


def test_decode_attention_dense_is_one_page_a_row(kernel):
    """The dense adapter (a cache [B, K, S, hd] as one page per (row, kv head)) against float64."""
    rs = np.random.RandomState(3)
    q, k, v = (rs.randn(*shape).astype(np.float32) for shape in
               ((3, 2, 4, 24), (3, 2, 37, 24), (3, 2, 37, 24)))
    mask = rs.rand(3, 37) > 0.5
    mask[1] = False
    got = np.asarray(jax.jit(pm.decode_attention_dense, static_argnums=4)(
        *map(jnp.asarray, (q, k, v, mask)), 0.3))
    np.testing.assert_allclose(got, reference_attention(q, k, v, mask, 0.3), atol=2e-6)


def test_decode_attention_checks_its_arguments(kernel):
    q = jnp.zeros((2, 2, 3, 8))
    pool = jnp.zeros((2, 5, 4, 8))
    pages = jnp.ones((2, 3), jnp.int32)
    mask = jnp.ones((2, 12), bool)
    pm.decode_attention(q, pool, pool, pages, mask, 1.0)
    for bad, match in [((q[:, :1], pool, pool, pages, mask), "K=1"),
                       ((q, pool, pool[..., :4], pages, mask), "hd=8"),
                       ((q, pool, pool, pages[:1], mask), "pages"),
                       ((q, pool, pool, pages.astype(float), mask), "integer"),
                       ((q, pool, pool, pages, jnp.ones((2, 13), bool)), "M \\* P = 12")]:
        with pytest.raises(ValueError, match=match):
            pm.decode_attention(*bad, 1.0)
    with pytest.raises(Exception, match="outside the pool"):
        np.asarray(pm.decode_attention(q, pool, pool, pages.at[1, 2].set(5), mask, 1.0))


@pytest.mark.parametrize("shape, n_in, lead", [((3, 8, 5), 1, 0), ((4, 6, 2, 7), 2, 0),
                                               ((2, 8, 3, 11), 1, 1), ((40, 70), 1, 0)])
def test_pack_round_trip(shape, n_in, lead):
    w = jnp.asarray(np.random.RandomState(1).randn(*shape).astype(np.float32))
    p = pm.pack(w, n_in, lead)
    assert p.data.shape[-1] == pm.WIDTH and p.size == w.size
    np.testing.assert_array_equal(np.asarray(p.unpack()), np.asarray(w))


def test_packed_embedding_rows():
    table = jnp.asarray(np.random.RandomState(2).randn(70, 24).astype(np.float32))
    packed = pm.pack(table.T, 1)  # as a tied head is packed
    tokens = jnp.asarray([[0, 31, 32, 69], [5, 5, 64, 33]])
    np.testing.assert_array_equal(np.asarray(pm.embed(packed, tokens)),
                                  np.asarray(table[tokens]))


@pytest.mark.parametrize("name", ["qwen2_tied_mha", "qwen2_untied_gqa", "gemma3_text"])
def test_float32_cpu_models_are_packed_and_agree_with_xla(tiny_models, name):
    path, _ = tiny_models[name]
    packed = load_model(path, "float32")
    plain = load_model(path, "float32", cpu_kernels=False)
    assert packed.config.execution.cpu_kernels and not plain.config.execution.cpu_kernels
    # The head is packed: the embedding itself when tied, else lm_head (the embedding stays).
    assert isinstance(packed.params["embed"], pm.Panels) == packed.config.tie_embeddings
    assert isinstance(packed.params.get("lm_head"), pm.Panels) != packed.config.tie_embeddings
    assert packed.num_params == plain.num_params
    np.testing.assert_allclose(packed.logits(IDS), plain.logits(IDS), rtol=1e-5, atol=1e-5)
    # Decode steps (the attention kernel's one-token path too), Gemma 3 well past its window.
    prompts = [IDS[0], IDS[0][:3]]
    ours, xla = generate(packed, prompts, 40), generate(plain, prompts, 40)
    assert ours.tokens == xla.tokens
    np.testing.assert_allclose(sum(ours.max_logits, []), sum(xla.max_logits, []), atol=1e-4)
    # Export (and sharding) see the plain layout again.
    a, b = hf_tensors(packed), hf_tensors(plain)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_scanned_layers_pack_too(tiny_models):
    path, _ = tiny_models["qwen2_untied_gqa"]
    scanned = load_model(path, "float32", scan_layers=True)
    plain = load_model(path, "float32", cpu_kernels=False)
    assert isinstance(scanned.params["layers"]["gate"], pm.Panels)
    np.testing.assert_allclose(scanned.logits(IDS), plain.logits(IDS), rtol=1e-5, atol=1e-5)
    # Decode steps under lax.scan: the stacked cache, the attention kernel on a sliced layer.
    assert generate(scanned, IDS, 12).tokens == generate(plain, IDS, 12).tokens


def test_only_float32_on_one_cpu_device_is_packed(tiny_models, monkeypatch):
    path, _ = tiny_models["qwen2_untied_gqa"]
    assert not load_model(path, "bfloat16").config.execution.cpu_kernels
    with pytest.raises(CheckpointError, match="float32 weights, not bfloat16"):
        load_model(path, "bfloat16", cpu_kernels=True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not load_model(path, "float32").config.execution.cpu_kernels
    with pytest.raises(CheckpointError, match="the backend is gpu, not cpu"):
        load_model(path, "float32", cpu_kernels=True)


def test_builds_from_an_empty_cache(tmp_path):
    lib = pm.build(os.environ.get("CXX") or shutil.which("c++") or "g++", tmp_path)
    assert lib.parent == tmp_path and lib.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no half-built leftovers


def test_build_failure_names_the_compiler(tmp_path):
    with pytest.raises(pm.KernelUnavailable, match="no-such-c"):
        pm.build(str(tmp_path / "no-such-c++"), tmp_path)
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'error: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(pm.KernelUnavailable, match="could not build panel_matmul.cc:\nerror: nope"):
        pm.build(str(fake), tmp_path)
