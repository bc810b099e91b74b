// C++ CPU kernels of the codebook family; see codebook.h. codebook_kernels.inc is built once per
// ISA (plain x86-64, AVX2, AVX-512) and the build of cpu_isa() runs.
#include "codebook.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <c10/util/Exception.h>

namespace lowbit::cpu::codebook {
namespace {

using lowbit::cpu::Isa;
using lowbit::cpu::cpu_isa;

constexpr int64_t kNearestBlock = 16;  // points per block of the search
constexpr int64_t kNearestWidth = 1024;  // entries per block of the search: 16 x 4 KB of distances in L1/L2
// Code bytes per chunk of the lookup-table product (a cache line of each output row's codes; 64 KB
// of tables per row of x), and the most rows of x it takes.
constexpr int kChunkCodes = 64;
constexpr int kMaxLutRows = 4;
constexpr int64_t kPrefetchRows = 16;

namespace generic {
#define LOWBIT_CODEBOOK_ISA 0
#include "codebook_kernels.inc"
#undef LOWBIT_CODEBOOK_ISA
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)  // the builds LOWBIT_ISA_CALL (isa.h) calls
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define LOWBIT_CODEBOOK_ISA 2
#include "codebook_kernels.inc"
#undef LOWBIT_CODEBOOK_ISA
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define LOWBIT_CODEBOOK_ISA 1
#include "codebook_kernels.inc"
#undef LOWBIT_CODEBOOK_ISA
}  // namespace avx2
#pragma GCC pop_options
#endif

// A codebook [E][g] transposed to [g][E], so that the search's loop over entries is contiguous.
std::vector<float> transposed(const float* book, int64_t E, int64_t g) {
  std::vector<float> t(static_cast<size_t>(E * g));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t k = 0; k < g; ++k) t[k * E + e] = book[e * g + k];
  return t;
}

}  // namespace

void lut_matmul(const float* lut, int64_t M, const Layer& w, const float* bias, float* y) {
  TORCH_CHECK(M <= kMaxLutRows, "lowbit: the lookup-table product takes at most ", kMaxLutRows, " rows, got ", M);
  const int64_t N = w.N, G = w.G, C = w.C;
  // (thread_local: OpenMP's threads reach it through the pointer, not by name.)
  static thread_local std::vector<float> acc_kept;
  acc_kept.assign(static_cast<size_t>(M * N), 0.f);
  float* const acc = acc_kept.data();
  const int threads = N * G * M >= (1 << 14) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), count = omp_get_num_threads();
    const int64_t n0 = N * t / count, n1 = N * (t + 1) / count;
    LOWBIT_ISA_CALL(gather_rows, lut, static_cast<int>(M), G * C, w.codes8, N, n0, n1, acc);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      y[m * N + n] = acc[m * N + n] * w.scales[n] + (bias != nullptr ? bias[n] : 0.f);
    }
  }
}

void fma_matmul(const float* x, int64_t M, const Layer& w, const float* bias, float* y) {
  const int64_t N = w.N, K = w.G * w.g;
  const int threads = N * K * std::min<int64_t>(M, kFmaMaxBlock) >= (1 << 16) ? omp_get_max_threads() : 1;
  for (int64_t m0 = 0; m0 < M; m0 += kFmaMaxBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kFmaMaxBlock, M - m0));
    const float* xb = x + m0 * K;
    float* yb = y + m0 * N;
#pragma omp parallel num_threads(threads)
    {
      // Whole blocks of 4 output rows per thread (the widest build's side-by-side rows).
      const int t = omp_get_thread_num(), count = omp_get_num_threads();
      const int64_t quads = (N + 3) / 4;
      const int64_t n0 = std::min(N, quads * t / count * 4), n1 = std::min(N, quads * (t + 1) / count * 4);
      LOWBIT_ISA_CALL(fma_rows, xb, rows, w, n0, n1, bias, yb);
    }
  }
}

template <typename T>
void decode_rows(const Layer& w, int64_t n0, int64_t n1, T* out) {
  LOWBIT_ISA_CALL(decode_rows<T>, w, n0, n1, out);
}

template <typename T>
void decode_table_rows(const Layer& w, const T* table, int64_t n0, int64_t n1, T* out) {
  LOWBIT_ISA_CALL(decode_table_rows<T>, w, table, n0, n1, out);
}

void nearest(const float* points, const float* weights, int64_t P, int64_t g, const float* book, int64_t E,
             int32_t* out) {
  const std::vector<float> book_t = transposed(book, E, g);
  // Whether every input is finite: then no distance is NaN, and the search skips looking for one.
  const auto all_finite = [](const float* v, int64_t n) {
    return v == nullptr || std::all_of(v, v + n, [](float f) { return std::isfinite(f); });
  };
  const bool finite = all_finite(points, P * g) && all_finite(weights, P * g) && all_finite(book, E * g);
  const int64_t blocks = (P + kNearestBlock - 1) / kNearestBlock;
  const int threads = P * E * g >= (1 << 16) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> dist(static_cast<size_t>(kNearestBlock * std::min(E, kNearestWidth)));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t p0 = b * kNearestBlock, count = std::min(kNearestBlock, P - p0);
      float best[kNearestBlock];
      std::fill(best, best + kNearestBlock, std::numeric_limits<float>::infinity());
      std::fill(out + p0, out + p0 + count, 0);
      for (int64_t e0 = 0; e0 < E; e0 += kNearestWidth) {
        LOWBIT_ISA_CALL(nearest_block, points + p0 * g, weights != nullptr ? weights + p0 * g : nullptr, count,
                        g, book_t.data(), E, e0, std::min(E, e0 + kNearestWidth), finite, dist.data(), best,
                        out + p0);
      }
    }
  }
}

template void decode_table_rows<float>(const Layer&, const float*, int64_t, int64_t, float*);
template void decode_table_rows<c10::BFloat16>(const Layer&, const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*);
template void decode_table_rows<c10::Half>(const Layer&, const c10::Half*, int64_t, int64_t, c10::Half*);
template void decode_rows<float>(const Layer&, int64_t, int64_t, float*);
template void decode_rows<c10::BFloat16>(const Layer&, int64_t, int64_t, c10::BFloat16*);
template void decode_rows<c10::Half>(const Layer&, int64_t, int64_t, c10::Half*);

}  // namespace lowbit::cpu::codebook
