// y[M, N] = x[M, K] @ w on a CPU, with w stored as panels [N / 32, K, 32]: an XLA FFI handler.
//
// Why a kernel of our own: a decode step multiplies a few rows (the batch) by every weight once,
// so at best it runs at the rate the weights stream in. At 16 rows XLA's CPU dot and torch's
// matmul reached ~80 GFLOP/s on an AVX-512 development machine's two cores, and so did this loop
// over the plain [K, N] layout (each k row read 32 columns at a time, a short strided read).
// Packed once, at load, each 32-column panel is one contiguous stream, and this loop reaches ~2x
// that (1.4-2.4x torch's on an AVX2 machine too; benchmarks/matmul16.py, RESULTS.md). Each output
// is one fused multiply-add chain over k in order, whatever the thread count or the other rows:
// it depends on nothing but its row.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kWidth = 32;  // panel width
// Vectors of the machine's own width: GCC lowers a vector wider than the target's registers
// through the stack, which made an AVX2 machine's decode step 7x slower than with XLA's dot.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE, NEON
#endif
constexpr int kVecs = kWidth / kLanes;
// A register block: R rows by kBlockVecs vectors of columns. With AVX-512 (32 registers), 16 rows
// by the whole panel take them all and the compiler spills a few, yet measured faster from memory
// than 12 rows that fit (benchmarks/RESULTS.md). With 16 registers, 6 rows by 2 vectors (12
// accumulators, 2 weight vectors, a broadcast) as in BLIS's AVX2 kernels: an AVX2 machine ran
// 512-row products ~1.5x faster this way than in blocks of 3 rows by the whole panel.
#if defined(__AVX512F__)
constexpr int kMaxRows = 16, kBlockVecs = 2;
constexpr int64_t kChunk = int64_t{1} << 40;  // the whole of K
constexpr bool kFetchNextChunk = false;
#else
constexpr int kMaxRows = 6, kBlockVecs = 2;
// Panel rows in a chunk: each row block re-reads the chunk, which at 128 rows (16 KB) stays in L1.
constexpr int64_t kChunk = 128;
// While the passes over a chunk run from L1, each asks at its start for its share of the next
// 16 KB of the weight stream, so that memory keeps working while the core computes: on an AVX2
// machine a decode step took ~5% less time (medians of six pairs of runs, benchmarks/RESULTS.md).
constexpr bool kFetchNextChunk = true;
#endif
constexpr int64_t kRowTile = 128;  // rows whose activations stay in L2 while panels stream by
// Panel rows fetched ahead by a chunk's first pass: the hardware prefetcher alone left a 16-row
// matmul at ~12 GB/s from memory; 16 rows (2 KB) ahead took it to ~19 (a plain read streams ~28).
constexpr int64_t kAhead = 16;

typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef float VecU __attribute__((vector_size(kLanes * 4), aligned(4)));

// One pass of a register block over a chunk: rows of x (row stride K) times panel rows [k0, k1)
// of one column block, into y (row stride N).
struct Pass {
  const float* x;
  int64_t K, k0, k1;
  const float* panel;
  float* y;
  int64_t N;
  bool fetch;                 // prefetch this chunk kAhead rows ahead (its first pass)
  const float *next0, *next1;  // this pass's share of the next chunk, to prefetch
};

// y += R rows of x times the pass's panel rows; y starts from zero at k0 == 0. Stored and
// reloaded between chunks, each output is still one fused multiply-add chain over k in order.
template <int R>
void Block(const Pass& p) {
  for (const float* line = p.next0; line < p.next1; line += 16) __builtin_prefetch(line);
  const float *x = p.x, *panel = p.panel;
  const int64_t K = p.K, N = p.N;
  Vec acc[R][kBlockVecs] = {};
  if (p.k0 > 0)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kBlockVecs; ++v)
        acc[r][v] = *reinterpret_cast<const VecU*>(p.y + r * N + v * kLanes);
  for (int64_t k = p.k0; k < p.k1; ++k) {
    if (p.fetch) {
      __builtin_prefetch(panel + (k + kAhead) * kWidth);
      __builtin_prefetch(panel + (k + kAhead) * kWidth + 16);
    }
    Vec w[kBlockVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kBlockVecs; ++v)
      w[v] = *reinterpret_cast<const VecU*>(panel + k * kWidth + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
#pragma GCC unroll 8
      for (int v = 0; v < kBlockVecs; ++v) acc[r][v] += xr * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kBlockVecs; ++v)
      *reinterpret_cast<VecU*>(p.y + r * N + v * kLanes) = acc[r][v];
}

// Block<R> for the largest R <= kMaxRows not above `rows`.
template <int R = kMaxRows>
void BlockOf(int64_t rows, const Pass& p) {
  if constexpr (R > 1)
    if (rows < R) return BlockOf<R - 1>(rows, p);
  Block<R>(p);
}

// Rows [r0, r1) times one panel, chunk by chunk of K, in as few register blocks as fit, of even
// sizes: an AVX2 machine ran a 4-row block at under half the rate of a 6-row one (fewer
// accumulators to hide the loads behind), so 16 rows go as 6 + 5 + 5, not 6 + 6 + 4.
void Rows(const float* x, int64_t K, const float* panel, float* y, int64_t N, int64_t r0,
          int64_t r1) {
  const int64_t blocks = (r1 - r0 + kMaxRows - 1) / kMaxRows;
  const int64_t passes = blocks * (kVecs / kBlockVecs);
  // What follows a chunk in memory: the panel's next chunk, or the next panel's first. Past the
  // end of the weight it is never read, and a prefetch does not fault.
  const int64_t ahead = kFetchNextChunk ? kChunk * kWidth : 0;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    const float* next = panel + k1 * kWidth;
    for (int64_t c = 0, pass = 0; c < kVecs; c += kBlockVecs) {
      for (int64_t b = 0, r = r0; b < blocks; ++b, ++pass) {
        const int64_t rows = (r1 - r + blocks - b - 1) / (blocks - b);  // of what is left
        BlockOf(rows, Pass{x + r * K, K, k0, k1, panel + c * kLanes, y + r * N + c * kLanes, N,
                           c == 0 && b == 0, next + ahead * pass / passes,
                           next + ahead * (pass + 1) / passes});
        r += rows;
      }
    }
  }
}

// Work items (a row tile by a group of panels) handed out from one counter, so that threads
// which start late, or never, leave their share to the others.
struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, panels, group, items;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    const int64_t groups = (panels + group - 1) / group;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t r0 = i / groups * kRowTile, p0 = i % groups * group;
      const int64_t r1 = std::min(M, r0 + kRowTile), p1 = std::min(panels, p0 + group);
      for (int64_t p = p0; p < p1; ++p)
        Rows(x, K, w + p * K * kWidth, y + p * kWidth, N, r0, r1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kWidth ||
      wd[1] != xd[1] || yd[0] != xd[0] || yd[1] != wd[0] * kWidth)
    return ffi::Error::InvalidArgument(
        "panel_matmul wants x [M, K], w [N/32, K, 32] and y [M, N]");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->M = xd[0], job->K = xd[1], job->panels = wd[0], job->N = wd[0] * kWidth;
  // ~8 items a core balance the load; a group of >= 2 panels amortizes the shared counter.
  job->group = std::max<int64_t>(2, job->panels / 16);
  job->items = (job->M + kRowTile - 1) / kRowTile * ((job->panels + job->group - 1) / job->group);
  // XLA's intra-op pool helps; a spinning thread of our own takes a core from XLA's own ops,
  // and the decode step is slower for it (benchmarks/RESULTS.md).
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), job->items);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
