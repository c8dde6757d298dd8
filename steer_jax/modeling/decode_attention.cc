// One query token's attention over a paged KV cache on a CPU, as an XLA FFI handler:
// out[b, h, g] = softmax over the unmasked slots s of scale * q[b, h, g] . k[b, h, s], times v,
// where slot s of row b lives in page pages[b, s / P] of the kv head's pool, at s % P.
//
// Why a kernel: for one new token XLA's CPU backend runs attention as ~8 small ops a layer
// (two batched dots of a few rows, the mask, the softmax's reductions, transposes), and on the
// development machine they took ~15% of a decode step, several times their arithmetic; over
// pages XLA would add a gather that copies every row's pages first. Here each (row, kv head) is
// one work item from a shared counter: its G query heads' scores, softmax and weighted sum of
// values in one pass over the row's valid slots, reading each page's P slots as one contiguous
// run; a masked slot (a short row's tail, a freed page, the null page) is never read unless the
// row has no valid slot at all.
// A row's output depends on nothing but its own q, pages and mask (the engine's batch invariance).
// A call of T > 1 tokens a row (a prefill, a read) passes each token as a row of its own.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxGroup = 64;  // query heads per kv head

#ifdef __AVX__
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef float VecU __attribute__((vector_size(kLanes * 4), aligned(4)));

Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }

float Dot(const float* a, const float* b, int64_t D) {
  Vec acc = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc += Load(a + d) * Load(b + d);
  float dot = 0.0f;
  for (int l = 0; l < kLanes; ++l) dot += acc[l];
  for (; d < D; ++d) dot += a[d] * b[d];
  return dot;
}

// out += p * v over D floats.
void Axpy(float p, const float* v, float* out, int64_t D) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    *reinterpret_cast<VecU*>(out + d) = Load(out + d) + p * Load(v + d);
  for (; d < D; ++d) out[d] += p * v[d];
}

// Asks for the first n floats (at most 4 KiB) of a page. Pages lie wherever the pool put them,
// so the hardware prefetcher, which follows addresses, stalls at every page change; fetching
// the next page while this one is read took the cost of shuffled 1 KiB pages (demo shapes) from
// ~1.7x the dense kernel's to ~1.15x. Past 4 KiB the hardware picks the stream up itself, and
// asking for whole 32 KiB pages measured slower.
void Prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < std::min<int64_t>(n, 1024); i += 64 / sizeof(float))
    __builtin_prefetch(p + i);
}

// out [G, D] for one (row, kv head): q [G, D]; k and v this kv head's pools [N, P, D]; table
// [ceil(S / P)] the row's page ids; valid [S]; scores [G, S] scratch. The softmax as XLA's:
// scores minus their max, exponentiated, divided by their sum. Slots are visited in logical
// order whatever the pages, so the sums' order (and bits) do not depend on where pages lie.
void Attend(const float* q, const float* k, const float* v, const int32_t* table,
            const bool* valid, int64_t G, int64_t S, int64_t P, int64_t D, float scale,
            float* out, float* scores) {
  float top[kMaxGroup], total[kMaxGroup] = {};
  std::fill(top, top + G, -std::numeric_limits<float>::infinity());
  std::fill(out, out + G * D, 0.0f);
  const int64_t pages = (S + P - 1) / P;
  int64_t n = 0;
  for (int64_t m = 0; m < pages; ++m) {
    const int64_t s0 = m * P, s1 = std::min(S, s0 + P);
    const float* page = k + table[m] * P * D;  // slots s0.. as P * D contiguous floats
    if (m + 1 < pages) Prefetch(k + table[m + 1] * P * D, P * D);
    for (int64_t s = s0; s < s1; ++s) {
      if (!valid[s]) continue;
      for (int64_t g = 0; g < G; ++g) {
        const float x = Dot(q + g * D, page + (s - s0) * D, D) * scale;
        scores[g * S + s] = x;
        top[g] = std::max(top[g], x);
      }
      ++n;
    }
  }
  if (n == 0) {  // as XLA's softmax over all-masked scores: a uniform average of every slot
    for (int64_t s = 0; s < S; ++s)
      for (int64_t g = 0; g < G; ++g)
        Axpy(1.0f / S, v + (table[s / P] * P + s % P) * D, out + g * D, D);
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    if (!valid[s]) continue;
    for (int64_t g = 0; g < G; ++g) {
      scores[g * S + s] = std::exp(scores[g * S + s] - top[g]);
      total[g] += scores[g * S + s];
    }
  }
  for (int64_t m = 0; m < pages; ++m) {
    const int64_t s0 = m * P, s1 = std::min(S, s0 + P);
    const float* page = v + table[m] * P * D;
    if (m + 1 < pages) Prefetch(v + table[m + 1] * P * D, P * D);
    for (int64_t s = s0; s < s1; ++s) {
      if (!valid[s]) continue;
      for (int64_t g = 0; g < G; ++g)
        Axpy(scores[g * S + s] / total[g], page + (s - s0) * D, out + g * D, D);
    }
  }
}

struct Job {
  std::atomic<int64_t> next{0}, done{0};
};

// k and v are every layer's pools [L, K, N, P, D], read at `layer`: a layer sliced out of a
// stacked pool would be an operand XLA copies whole at every call.
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> pages,
                               ffi::Buffer<ffi::PRED> mask, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             pd = pages.dimensions(), md = mask.dimensions(), od = out->dimensions();
  auto same = [](auto a, auto b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); };
  if (qd.size() != 4 || kd.size() != 5 || pd.size() != 2 || md.size() != 2 || !same(vd, kd) ||
      !same(od, qd) || qd[1] != kd[1] || qd[3] != kd[4] || pd[0] != qd[0] ||
      md[0] != qd[0] || md[1] > pd[1] * kd[3] || kd[3] < 1 || qd[2] > kMaxGroup ||
      layer.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "decode_attention wants q [B, K, G <= 64, D], k and v pools [L, K, N, P >= 1, D], one "
        "layer index, pages [B, M], mask [B, S <= M * P]");
  const int64_t B = qd[0], H = qd[1], G = qd[2], D = qd[3], N = kd[2], P = kd[3], M = pd[1],
                S = md[1], L = kd[0], at = layer.typed_data()[0];
  if (at < 0 || at >= L)
    return ffi::Error::InvalidArgument("decode_attention: the layer index is outside the pools");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data() + at * H * N * P * D;
  const float* vp = v.typed_data() + at * H * N * P * D;
  const int32_t* pp = pages.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  // A page id outside the pool would read outside the buffer: refuse the call (a few hundred
  // ints) rather than check inside the loops. Only the entries that slots < S map to count.
  const int64_t used = (S + P - 1) / P;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < used; ++m)
      if (pp[b * M + m] < 0 || pp[b * M + m] >= N)
        return ffi::Error::InvalidArgument("decode_attention: a page id is outside the pool");
  auto job = std::make_shared<Job>();
  const int64_t items = B * H;
  // Late pool tasks find the counter spent and return without touching the buffers.
  auto work = [=] {
    std::vector<float> scores(G * S);
    for (int64_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = i / H, h = i % H;
      Attend(qp + i * G * D, kp + h * N * P * D, vp + h * N * P * D, pp + b * M, mp + b * S, G,
             S, P, D, scale, op + i * G * D, scores.data());
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), items);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
