// y[M, N] = x[M, K] @ w on a CPU, with w stored as panels [N / 32, K, 32]: an XLA FFI handler.
//
// Why a kernel of our own: a decode step multiplies a few rows (the batch) by every weight once,
// so at best it runs at the rate the weights stream in. At 16 rows XLA's CPU dot and torch's
// matmul reach ~80 GFLOP/s on the development machine's two cores, and so did this loop over the
// plain [K, N] layout (each k row read 32 columns at a time, a short strided read). Packed once,
// at load, each 32-column panel is one contiguous stream, and this loop reaches ~2x that
// (benchmarks/matmul16.py, RESULTS.md). Each output is one fused multiply-add chain over k in
// order, whatever the thread count or the other rows: it depends on nothing but its row.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kWidth = 32;  // panel width: two 16-float vectors
// Rows per register block, each reading the panel once. With AVX-512, 16 rows' accumulators take
// all 32 vector registers and the compiler spills a few, yet measured faster from memory than 12
// rows that fit (benchmarks/RESULTS.md); elsewhere a vector of 16 floats spans 2 (AVX2) or 4
// (NEON) registers.
#ifdef __AVX512F__
constexpr int kMaxRows = 16;
#else
constexpr int kMaxRows = 2;
#endif
constexpr int64_t kRowTile = 128;  // rows whose activations stay in L2 while panels stream by
// Panel rows fetched ahead: the hardware prefetcher alone left a 16-row matmul at ~12 GB/s from
// memory; 16 rows (2 KB) ahead took it to ~19 (a plain read streams ~28).
constexpr int64_t kAhead = 16;

typedef float Vec __attribute__((vector_size(64)));
typedef float VecU __attribute__((vector_size(64), aligned(4)));

template <int R>
void Block(const float* x, int64_t K, const float* panel, float* y, int64_t N) {
  Vec acc[R][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + kAhead) * kWidth);
    __builtin_prefetch(panel + (k + kAhead) * kWidth + 16);
    const Vec w0 = *reinterpret_cast<const VecU*>(panel + k * kWidth);
    const Vec w1 = *reinterpret_cast<const VecU*>(panel + k * kWidth + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      acc[r][0] += xr * w0;
      acc[r][1] += xr * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    *reinterpret_cast<VecU*>(y + r * N) = acc[r][0];
    *reinterpret_cast<VecU*>(y + r * N + 16) = acc[r][1];
  }
}

// Rows [r0, r1) times one panel, in the largest register blocks that fit.
void Rows(const float* x, int64_t K, const float* panel, float* y, int64_t N, int64_t r0,
          int64_t r1) {
  int64_t r = r0;
  for (; r1 - r >= kMaxRows; r += kMaxRows) Block<kMaxRows>(x + r * K, K, panel, y + r * N, N);
#ifdef __AVX512F__
  if (r1 - r >= 8) Block<8>(x + r * K, K, panel, y + r * N, N), r += 8;
  if (r1 - r >= 4) Block<4>(x + r * K, K, panel, y + r * N, N), r += 4;
#endif
  if (r1 - r >= 2) Block<2>(x + r * K, K, panel, y + r * N, N), r += 2;
  if (r1 - r >= 1) Block<1>(x + r * K, K, panel, y + r * N, N);
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
  // XLA's intra-op pool helps; a spinning thread of our own took the second core from XLA's
  // ops and made a decode step slower (17.5 against 14.9 ms, benchmarks/RESULTS.md).
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
