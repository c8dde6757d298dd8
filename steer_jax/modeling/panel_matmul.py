"""Weights packed into 32-column panels, multiplied by a CPU kernel of our own (panel_matmul.cc).

On a CPU a decode step is a few rows times every weight, which XLA's dot multiplies at ~80
GFLOP/s on two cores for 16 rows; packed once, at load, each panel is one contiguous stream and
the kernel runs a 16-row matmul ~2x faster (benchmarks/matmul16.py). A decode step's attention
(one query token against a paged KV cache: pools of pages and a page table per row) has a kernel
too, `decode_attention.cc` (`decode_attention_dense` runs it over a dense cache). Where they run
is `execution.py`'s choice: float32 weights on a lone CPU device; everywhere else the models run
XLA's ops over the plain layout. The kernels are compiled on first use with the system's C++
compiler against the XLA FFI headers jaxlib ships, cached per source, jaxlib and CPU, and
registered as FFI targets."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WIDTH = 32  # columns per panel; panel_matmul.cc's kWidth
_SOURCE = Path(__file__).with_name("panel_matmul.cc")
_TARGET = "steer_jax_panel_matmul"
ATTENTION_TARGET = "steer_jax_decode_attention"
# (source, handler symbol, FFI target) of each CPU kernel `load` builds and registers.
_KERNELS = ((_SOURCE, "PanelMatmul", _TARGET),
            (_SOURCE.with_name("decode_attention.cc"), "DecodeAttention", ATTENTION_TARGET))


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or used here; the message says why."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Panels:
    """A weight [*lead, *in_shape, *out_shape] stored as panels [*lead, ceil(N / 32), K, 32].

    K is the product of `in_shape` (the contracted axes), N of `out_shape`; the last panel is
    padded with zero columns. `lead` is the stacked layer axis when there is one.
    """

    data: jax.Array
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def size(self) -> int:  # the weight's own size, without the padding
        return math.prod(self.data.shape[:-3]) * math.prod(self.in_shape + self.out_shape)

    def unpack(self) -> jax.Array:
        """The weight in its plain layout."""
        *lead, panels, k, _ = self.data.shape
        plain = jnp.moveaxis(self.data, -3, -2).reshape(*lead, k, panels * WIDTH)
        return plain[..., : math.prod(self.out_shape)].reshape(
            *lead, *self.in_shape, *self.out_shape)


def pack(w: jax.Array, n_in: int, lead: int = 0) -> Panels:
    """Panels of `w` [*lead, in (n_in axes)..., out...], contracting its `n_in` input axes."""
    shape = w.shape
    in_shape, out_shape = tuple(shape[lead: lead + n_in]), tuple(shape[lead + n_in:])
    k, n = math.prod(in_shape), math.prod(out_shape)
    panels = -(-n // WIDTH)
    flat = w.reshape(*shape[:lead], k, n)
    flat = jnp.pad(flat, [(0, 0)] * (lead + 1) + [(0, panels * WIDTH - n)])
    data = jnp.moveaxis(flat.reshape(*shape[:lead], k, panels, WIDTH), -2, -3)
    return Panels(data, in_shape, out_shape)


def embed(table: Panels, tokens: jax.Array) -> jax.Array:
    """Rows of an embedding table [V, D] packed as a head (its [D, V] transpose)."""
    return table.data[tokens // WIDTH, :, tokens % WIDTH]


def matmul(x: jax.Array, w: Panels) -> jax.Array:
    """x [M, K] @ w as float32 [M, N], by the CPU kernel."""
    load()  # at trace time; cached
    panels, k, _ = w.data.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"matmul wants x [M, {k}], got {x.shape}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], panels * WIDTH),
                                                          jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), w.data)[:, : math.prod(w.out_shape)]


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, pages: jax.Array,
                     mask: jax.Array, scale: float, layer: jax.Array | int | None = None
                     ) -> jax.Array:
    """One query token per row against its paged cache, by the CPU kernel (decode_attention.cc).

    q [B, K, G, hd] (G query heads share each of the K kv heads); k_pool, v_pool [K, N, P, hd]
    (N pages of P slots), or every layer's [L, K, N, P, hd] with `layer` the one to read (the
    kernel reads it in place: a slice of the stack would be copied first); pages [B, M] int32,
    row b's page ids: its slot s is pool[:, pages[b, s // P], s % P]; mask [B, S] over those
    logical slots, S <= M * P (the last page may be partly used). Returns float32
    [B, K, G, hd]. A row with no unmasked slot averages all S of its slots (XLA's softmax of
    all-masked scores), so even its unused entries must name a page of the pool (page 0, the
    null page, does); a page id or layer outside the pools is an error.
    """
    if k_pool.ndim == 4 and layer is None:
        k_pool, v_pool, layer = k_pool[None], v_pool[None], 0
    if q.ndim != 4 or k_pool.ndim != 5 or layer is None:
        raise ValueError(f"decode_attention wants q [B, K, G, hd] and k_pool [K, N, P, hd] (or "
                         f"[L, K, N, P, hd] and a layer), got q {q.shape} and k_pool "
                         f"{k_pool.shape}, layer {layer}")
    B, K, G, hd = q.shape
    _, _, N, P, _ = k_pool.shape
    if v_pool.shape != k_pool.shape or k_pool.shape[1] != K or k_pool.shape[4] != hd:
        raise ValueError(f"decode_attention wants k_pool and v_pool [L, K={K}, N, P, hd={hd}] "
                         f"for q {q.shape}, got {k_pool.shape} and {v_pool.shape}")
    if pages.ndim != 2 or pages.shape[0] != B or not jnp.issubdtype(pages.dtype, jnp.integer):
        raise ValueError(f"decode_attention wants pages [B={B}, M] of integer page ids, got "
                         f"{pages.dtype}{list(pages.shape)}")
    M = pages.shape[1]
    if mask.ndim != 2 or mask.shape[0] != B or not 1 <= mask.shape[1] <= M * P:
        raise ValueError(f"decode_attention wants mask [B={B}, S] with 1 <= S <= M * P = {M * P} "
                         f"(M={M} pages of P={P} slots), got {mask.shape}")
    if G > 64 or P < 1:
        raise ValueError(f"decode_attention handles at most 64 query heads a kv head and pages "
                         f"of at least one slot, got G={G}, P={P}")
    load()
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return call(f32(q), f32(k_pool), f32(v_pool), jnp.asarray(layer, jnp.int32),
                pages.astype(jnp.int32), mask.astype(bool), scale=np.float32(scale))


def decode_attention_dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           scale: float) -> jax.Array:
    """`decode_attention` over a dense cache k, v [B, K, S, hd], mask [B, S]: the same bits.

    Each (row, kv head) becomes a row of its own with one kv head and one page of S slots, so
    the cache is passed as it lies (a reshape, no copy); only the mask is repeated per kv head.
    """
    B, K, G, hd = q.shape
    if k.ndim != 4 or k.shape[:2] != (B, K) or k.shape[3] != hd or v.shape != k.shape:
        raise ValueError(f"decode_attention_dense wants k and v [B={B}, K={K}, S, hd={hd}], got "
                         f"{k.shape} and {v.shape}")
    S = k.shape[2]
    pool = lambda x: x.reshape(1, B * K, S, hd)  # noqa: E731
    table = jnp.arange(B * K, dtype=jnp.int32)[:, None]
    out = decode_attention(q.reshape(B * K, 1, G, hd), pool(k), pool(v), table,
                           jnp.repeat(mask, K, axis=0), scale)
    return out.reshape(B, K, G, hd)


def _cache_dir() -> Path:
    root = os.environ.get("STEER_JAX_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "steer_jax" if root else Path.home() / ".cache" / "steer_jax"


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in info if ln.split(":")[0].strip() in
                                 ("model name", "flags", "Features")}))
    except OSError:
        return platform.processor() + platform.machine()


@functools.cache
def load() -> None:
    """Compile (or find compiled) the CPU kernels, this matmul and `decode_attention`, and
    register them with XLA; KernelUnavailable if they cannot be."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (set CXX) to build the CPU kernels")
    for source, symbol, target in _KERNELS:
        handler = getattr(ctypes.CDLL(str(build(cxx, _cache_dir(), source))), symbol)
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def build(cxx: str, cache_dir: Path, source: Path = _SOURCE) -> Path:
    """A kernel's shared library, compiled by `cxx` into `cache_dir` unless already there."""
    import jaxlib

    flags = ["-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-w"]
    key = hashlib.sha256("\0".join([source.read_text(), jaxlib.__version__, cxx, *flags,
                                     _cpu_id()]).encode()).hexdigest()[:16]
    lib = cache_dir / f"{source.stem}-{key}.so"
    if lib.is_file():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = Path(tmp) / lib.name
        try:
            run = subprocess.run([cxx, *flags, "-I", jax.ffi.include_dir(), str(source),
                                  "-o", str(out)], capture_output=True, text=True)
        except OSError as e:
            raise KernelUnavailable(f"cannot run the C++ compiler {cxx!r}: {e}") from e
        if run.returncode != 0:
            raise KernelUnavailable(f"{cxx} could not build {source.name}:\n"
                                    f"{run.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: a concurrent build never sees half a file
    return lib
