"""One-token decode attention over a paged KV cache: the XLA reference and JAX's Pallas kernels.

Layout (that of JAX's paged kernels): per layer k_pages, v_pages [num_kv_heads, num_pages,
page_size, head_dim]; row b's token at position p lives in page pages[b, p // page_size] at offset
p % page_size; page 0 is the null page that unused table entries point at. A decode step has one
query per row, q [B, num_heads, head_dim], query head h reading kv head h // G, and attends to
positions 0 .. lengths[b] - 1. Rows of length 0 (bucket padding) give zeros, as both kernels do.

Which kernels (jax 0.10.2, read from jax/experimental/pallas/ops):
- TPU: `ops.tpu.paged_attention.paged_attention` takes this layout as is and is made for one query
  per row (the G query heads of a kv head share one block). `ops.tpu.ragged_paged_attention` is the
  more general kernel (several queries per row, so prefill and catch-up reads too, plus
  sm_scale and sliding_window), but it reads one combined pool [num_pages, page_size,
  2 * num_kv_heads, head_dim] with K and V interleaved; feeding it our pool would copy the whole
  pool every step. So paged_attention applies for one-token decode on this layout; ragged is the
  one to adopt if the engine ever stores the combined layout (it would also cover Gemma's
  sliding-window layers). Ragged does not run in interpret mode in this JAX (InterpretParams:
  "'ReshapeTransform' object has no attribute 'indices'"; interpret=True: "'TypedInt' object has
  no attribute 'shape'"), so it could not be tested here either.
- GPU: `ops.gpu.paged_attention.paged_attention` (Triton). `ops.gpu.decode_attention` wants
  contiguous K/V per row with no page table, i.e. the gather the XLA path already does: not used.
- Neither paged kernel takes a softmax scale (q is pre-scaled here) or a sliding window (refused
  by `pallas_applies`); both take a logit soft cap (`attn_logits_soft_cap`), passed through.
- Precision: the TPU kernel casts every K/V block to bfloat16 inside the kernel, even from a
  float32 pool, so `pallas_applies` refuses float32 there rather than lose precision silently. On
  GPU, Triton's dot with float32 inputs at default precision uses TF32, as XLA's GPU matmuls do.

Interpret mode on the CPU (what runs here):
- GPU kernel: its function exposes `interpret=True` (Pallas' HLO interpreter). The Triton shape
  rules (power-of-two block sizes) are not checked by the interpreter; `pallas_applies` holds them.
- TPU kernel: its function has no `interpret` argument, and this JAX has no `jax_pallas_interpret`
  flag. `pltpu.force_tpu_interpret_mode(pltpu.InterpretParams())` sets the config
  `pallas_tpu_interpret_mode_context_manager` (part of the jit key) for every pallas_call traced
  under it, and simulates VMEM, DMAs and semaphores; it runs the kernel unmodified.
The block-size rules below come from reading the kernels, not from a run on TPU or GPU hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BACKENDS = ("tpu", "gpu")
# Tokens per compute block: the TPU kernel's VMEM double buffer is 2 x block x head_dim per K and
# V; 512 tokens keeps that at 1 MiB for head_dim 256. The GPU K block is capped at the size of the
# kernel's default (8 pages of 16 tokens at head_dim 128), meant to keep Triton's staged K and V
# blocks within shared memory at larger head_dim too (not measured on a GPU yet).
_TPU_BLOCK_TOKENS = 512
_GPU_BLOCK_ELEMENTS = 128 * 128
_GPU_MAX_K_SPLITS = 16


def reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, pages: jax.Array,
              lengths: jax.Array, scale: float, *, soft_cap: float | None = None) -> jax.Array:
    """Portable XLA one-token attention over pages: [B, H, hd] in q's dtype, float32 softmax."""
    b, h, hd = q.shape
    kvh = k_pages.shape[0]
    k = k_pages[:, pages].reshape(kvh, b, -1, hd).astype(jnp.float32)  # [KV, B, T, hd]
    v = v_pages[:, pages].reshape(kvh, b, -1, hd).astype(jnp.float32)
    qg = q.reshape(b, kvh, h // kvh, hd).astype(jnp.float32) * scale
    hi = jax.lax.Precision.HIGHEST  # the reference must not drop to bf16 passes on TPU
    s = jnp.einsum("bkgd,kbtd->bkgt", qg, k, precision=hi)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    p = jax.nn.softmax(jnp.where(valid[:, None, None, :], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgt,kbtd->bkgd", p, v, precision=hi).reshape(b, h, hd)
    # A length-0 row's softmax is NaN; the kernels return zeros there, and so does this path.
    return jnp.where(lengths[:, None, None] > 0, o, 0.0).astype(q.dtype)


def _largest_divisor(n: int, at_most: int, power_of_two: bool = False) -> int:
    best = 1
    for d in range(1, min(n, at_most) + 1):
        if n % d == 0 and (not power_of_two or d & (d - 1) == 0):
            best = d
    return best


def _tpu_pages_per_block(page_size: int, pages_per_row: int) -> int:
    # The kernel needs pages_per_row % pages_per_compute_block == 0.
    return _largest_divisor(pages_per_row, max(1, _TPU_BLOCK_TOKENS // page_size))


def _gpu_blocks(page_size: int, head_dim: int, pages_per_row: int) -> tuple[int, int]:
    # The kernel asserts pages_per_row % k_splits == 0 and that the partition is a multiple of
    # pages_per_compute_block; Triton needs the K block (pages x page_size) a power of two.
    k_splits = _largest_divisor(pages_per_row, _GPU_MAX_K_SPLITS)
    limit = max(1, _GPU_BLOCK_ELEMENTS // (page_size * head_dim))
    return k_splits, _largest_divisor(pages_per_row // k_splits, limit, power_of_two=True)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pallas_applies(backend: str, num_heads: int, num_kv_heads: int, head_dim: int,
                   page_size: int, pages_per_row: int, dtype: jnp.dtype | type | str, *,
                   sliding_window: int | None = None) -> str | None:
    """None when JAX's paged kernel for `backend` can run these shapes, else why not.

    dtype is the KV cache's; sliding_window is the layer's window (None: global attention).
    """
    dtype = jnp.dtype(dtype)
    if backend not in BACKENDS:
        return f"no Pallas paged-attention kernel for backend {backend!r}"
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        return f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if sliding_window is not None:
        return f"the {backend} paged kernel has no sliding window ({sliding_window} asked)"
    if page_size <= 0 or pages_per_row <= 0:
        return "page_size and pages_per_row must be positive"
    if backend == "tpu":
        if dtype != jnp.bfloat16:
            return (f"the TPU kernel rounds K/V to bfloat16 inside; a {dtype.name} cache would "
                    "silently lose precision")
        if head_dim % 128:
            return f"head_dim {head_dim} is not a multiple of 128 (the TPU lane width)"
        if page_size % 16:
            # Each block [pages, page_size, head_dim] is collapsed to [tokens, head_dim] in VMEM;
            # that is free only when a page fills whole bfloat16 (16, 128) tiles.
            return f"page_size {page_size} is not a multiple of 16 (bfloat16 sublane tile)"
        return None
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"the GPU kernel takes float32/bfloat16/float16, not {dtype.name}"
    # Triton arrays must have power-of-two sizes, and tl.dot wants every dimension >= 16.
    if not _is_pow2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16 (Triton block)"
    if not _is_pow2(page_size):
        return f"page_size {page_size} is not a power of two (Triton block)"
    _, per_block = _gpu_blocks(page_size, head_dim, pages_per_row)
    if per_block * page_size < 16:
        return (f"a K block of {per_block * page_size} tokens is under Triton's 16 for a dot "
                f"(page_size {page_size}, {pages_per_row} pages per row)")
    return None


def pallas_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, pages: jax.Array,
                  lengths: jax.Array, scale: float, *, backend: str, interpret: bool = False,
                  soft_cap: float | None = None) -> jax.Array:
    """`reference` through JAX's own Pallas kernel for `backend`; ask `pallas_applies` first.

    interpret=True runs the kernel in Pallas interpret mode (any platform, CPU included).
    """
    _, pages_per_row = pages.shape
    _, _, page_size, head_dim = k_pages.shape
    # Neither kernel takes a softmax scale. Scaling in float32 rounds q once to its dtype.
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    pages, lengths = pages.astype(jnp.int32), lengths.astype(jnp.int32)  # both kernels want i32
    # Imported here so that the CPU engine never loads the Mosaic and Triton kernel modules.
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        call = functools.partial(
            paged_attention, qs, k_pages, v_pages, lengths, pages,
            pages_per_compute_block=_tpu_pages_per_block(page_size, pages_per_row),
            attn_logits_soft_cap=soft_cap,
            # megacore_mode stays None: the kernel's docs warn it may hang on single-core chips.
        )
        if not interpret:
            return call()
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            return call()
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        k_splits, per_block = _gpu_blocks(page_size, head_dim, pages_per_row)
        return paged_attention(
            qs, k_pages, v_pages, pages, lengths, k_splits=k_splits,
            pages_per_compute_block=per_block, attn_logits_soft_cap=soft_cap,
            interpret=interpret)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BACKENDS", "pallas_applies", "pallas_decode", "reference"]
