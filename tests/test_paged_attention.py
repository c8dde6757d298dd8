"""Paged one-token attention: the XLA reference against float64 numpy, and JAX's own Pallas
kernels (TPU paged_attention, GPU paged_attention) against the reference in interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steer_jax.modeling import paged_attention as pa

BF16 = jnp.bfloat16


def make_case(seed, lengths, page_size, kv_heads, group, head_dim, dtype=jnp.float32,
              per_row=None):
    """A random pool whose rows hold shuffled pages; unused table entries name the null page 0."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    per_row = per_row or max(-(-n // page_size) for n in lengths) + 1  # a spare: null page
    num_pages = 1 + b * per_row + 3  # a few pages no row owns
    ids = rng.permutation(np.arange(1, num_pages))
    pages = np.zeros((b, per_row), np.int32)
    for r, n in enumerate(lengths):
        used = -(-n // page_size)
        pages[r, :used], ids = ids[:used], ids[used:]

    def draw(shape, spread=1.0):
        # Rounded through bfloat16 so that the TPU kernel's internal bf16 cast of K/V is exact.
        return jnp.asarray(rng.standard_normal(shape) * spread, BF16).astype(dtype)

    pool = (kv_heads, num_pages, page_size, head_dim)
    # Large keys make any read past a row's length (stale slots, the null page) show in the output.
    k, v = draw(pool, 3.0), draw(pool)
    q = draw((b, kv_heads * group, head_dim))
    return q, k, v, jnp.asarray(pages), jnp.asarray(lengths, jnp.int32)


def numpy_attention(q, k, v, pages, lengths, scale, soft_cap=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, hd = q.shape
    kvh, _, ps, _ = k.shape
    out = np.zeros((b, h, hd))
    for r in range(b):
        n = int(lengths[r])
        if n == 0:
            continue
        slots = [(int(pages[r, p // ps]), p % ps) for p in range(n)]
        for head in range(h):
            kv = head // (h // kvh)
            keys = np.stack([k[kv, pg, off] for pg, off in slots])
            vals = np.stack([v[kv, pg, off] for pg, off in slots])
            s = keys @ q[r, head] * scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            w = np.exp(s - s.max())
            out[r, head] = w @ vals / w.sum()
    return out


@pytest.mark.parametrize(
    "page_size,lengths,kv_heads,group",
    [
        (4, [1, 8, 13, 7], 2, 1),   # 8 fills two pages exactly, 13 and 7 end mid-page
        (4, [1, 8, 13, 7], 1, 3),   # GQA, one kv head
        (5, [10, 1, 11], 2, 4),     # a page size that is not a power of two
        (16, [33, 1, 0], 3, 2),     # a padding row of length 0 gives zeros
    ],
)
def test_reference_matches_float64(page_size, lengths, kv_heads, group):
    q, k, v, pages, lens = make_case(0, lengths, page_size, kv_heads, group, 8)
    scale = 8 ** -0.5
    got = pa.reference(q, k, v, pages, lens, scale)
    want = numpy_attention(q, k, v, pages, lens, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    # float32 dot products of 8 terms and sums of <= 33 weights: errors stay near 1e-6.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    capped = pa.reference(q, k, v, pages, lens, scale, soft_cap=5.0)
    np.testing.assert_allclose(
        np.asarray(capped), numpy_attention(q, k, v, pages, lens, scale, 5.0),
        rtol=1e-5, atol=1e-5)


KERNEL_CASES = {
    # name: (kv_heads, group, lengths); page_size 16, head_dim 128, 8 pages per row.
    "mha": (2, 1, [37, 1, 96, 0]),
    "gqa3": (2, 3, [96, 17, 1, 50]),   # TPU: groups % 8 != 0 path; GPU: heads padded to 16
    "gqa8": (1, 8, [5, 64, 1, 80]),    # TPU: groups % 8 == 0 path
}


@pytest.fixture
def small_blocks(monkeypatch):
    # At tiny shapes the default blocks would cover a whole row; smaller ones make both kernels
    # run their online softmax over several blocks of 2 pages (TPU: 4 blocks a row; GPU: two
    # k-splits of 2 blocks each, merged outside the kernel).
    monkeypatch.setattr(pa, "_TPU_BLOCK_TOKENS", 32)
    monkeypatch.setattr(pa, "_GPU_MAX_K_SPLITS", 2)
    monkeypatch.setattr(pa, "_GPU_BLOCK_ELEMENTS", 32 * 128)


def run_kernel(backend, case, dtype, soft_cap=None, seed=1):
    kv_heads, group, lengths = KERNEL_CASES[case]
    q, k, v, pages, lens = make_case(seed, lengths, 16, kv_heads, group, 128, dtype, per_row=8)
    assert (pa._tpu_pages_per_block(16, 8), pa._gpu_blocks(16, 128, 8)) == (2, (2, 2))
    scale = 128 ** -0.5
    # Under jit, as the engine calls it (the TPU interpret context must act at trace time).
    kernel = jax.jit(functools.partial(
        pa.pallas_decode, scale=scale, backend=backend, interpret=True, soft_cap=soft_cap))
    got = kernel(q, k, v, pages, lens)
    want = pa.reference(q, k, v, pages, lens, scale, soft_cap=soft_cap)
    assert got.shape == want.shape and got.dtype == want.dtype
    return np.asarray(got, np.float32), np.asarray(want, np.float32)


@pytest.mark.parametrize("backend", pa.BACKENDS)
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_interpret_float32(backend, case, small_blocks):
    got, want = run_kernel(backend, case, jnp.float32)
    # Inputs are bfloat16-exact, so both sides compute the same float32 sums, only in another
    # order (blocked online softmax vs one softmax): |out| <= max|v| ~ 4 and a few float32 ulps
    # per block rescale give ~1e-6 (<= 3.1e-6 seen). 2e-5 is 10x that and far below the 1e-2 that
    # a bfloat16 rounding or one misplaced token would cost.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", pa.BACKENDS)
def test_kernel_interpret_soft_cap(backend, small_blocks):
    got, want = run_kernel(backend, "gqa3", jnp.float32, soft_cap=4.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", pa.BACKENDS)
def test_kernel_interpret_bfloat16(backend, small_blocks):
    got, want = run_kernel(backend, "gqa3", BF16)
    # Both round a float32 result to bfloat16 (8 bits: one ulp is <= 2^-7 relative), and the
    # kernel path also rounds the pre-scaled q to bfloat16 (the GPU kernel its probabilities too).
    # Seen: one ulp, 2^-6 at |out| ~ 3.2; a misread token costs far more (3.5 for length + 1).
    np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2 ** -6)


QWEN = dict(num_heads=12, num_kv_heads=2, head_dim=128)     # Qwen2.5-1.5B
GEMMA = dict(num_heads=8, num_kv_heads=4, head_dim=256)     # Gemma-3 4B


@pytest.mark.parametrize("backend", pa.BACKENDS)
def test_pallas_applies_real_shapes(backend):
    # 4096 tokens in pages of 64: 64 pages per row.
    assert pa.pallas_applies(backend, **QWEN, page_size=64, pages_per_row=64, dtype=BF16) is None
    assert pa.pallas_applies(backend, **GEMMA, page_size=64, pages_per_row=64, dtype=BF16) is None
    local = pa.pallas_applies(backend, **GEMMA, page_size=64, pages_per_row=16, dtype=BF16,
                              sliding_window=1024)
    assert local and "sliding window" in local
    assert "multiple of num_kv_heads" in pa.pallas_applies(
        backend, 12, 5, 128, 64, 64, BF16)
    assert "head_dim 96" in pa.pallas_applies(backend, 12, 2, 96, 64, 64, BF16)


def test_pallas_applies_backend_rules():
    f32 = jnp.float32
    assert "bfloat16" in pa.pallas_applies("tpu", **QWEN, page_size=64, pages_per_row=64,
                                           dtype=f32)
    assert pa.pallas_applies("gpu", **QWEN, page_size=64, pages_per_row=64, dtype=f32) is None
    assert "page_size 8" in pa.pallas_applies("tpu", **QWEN, page_size=8, pages_per_row=8,
                                              dtype=BF16)
    assert "power of two" in pa.pallas_applies("gpu", **QWEN, page_size=48, pages_per_row=8,
                                               dtype=BF16)
    assert "under Triton's 16" in pa.pallas_applies("gpu", **QWEN, page_size=8,
                                                    pages_per_row=1, dtype=BF16)
    assert "backend 'cpu'" in pa.pallas_applies("cpu", **QWEN, page_size=64, pages_per_row=64,
                                                dtype=BF16)


def test_chosen_blocks_meet_the_kernels_asserts():
    for page_size in (16, 32, 64, 128):
        for per_row in range(1, 70):
            tpu = pa._tpu_pages_per_block(page_size, per_row)
            assert per_row % tpu == 0
            for head_dim in (64, 128, 256):
                splits, block = pa._gpu_blocks(page_size, head_dim, per_row)
                assert per_row % splits == 0 and (per_row // splits) % block == 0
                assert block & (block - 1) == 0 and block * page_size >= 16
