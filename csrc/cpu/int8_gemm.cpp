// lowbit's CPU int8 GEMM (int8_gemm.h). The AVX2 kernel widens int8 to int16 and multiplies with
// vpmaddwd (16 int16 products, summed in pairs into 8 int32 lanes): half the products per
// instruction of vpmaddubsw, but exact for the whole int8 range, with no offset or column-sum
// compensation. A register tile is 4 rows x 16 columns: per step of 2 input features, 2 widened
// weight loads, 4 broadcasts of an x pair, 8 vpmaddwd and 8 vpaddd into 8 accumulators.
#include "int8_gemm.h"

#include <omp.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWBIT_HAVE_AVX2_BUILD 1
#endif

namespace lowbit::cpu::int8 {

int64_t packed_bytes(int64_t N, int64_t K) {
  return (N + kPanel - 1) / kPanel * ((K + kPair - 1) / kPair) * kPanel * kPair;
}

void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed) {
  const int64_t panels = (N + kPanel - 1) / kPanel, steps = (K + kPair - 1) / kPair;
#pragma omp parallel for schedule(static) if (N * K > (1 << 20))
  for (int64_t p = 0; p < panels; ++p) {
    int8_t* out = packed + p * steps * kPanel * kPair;
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t c = 0; c < kPanel; ++c) {
        for (int64_t j = 0; j < kPair; ++j) {
          const int64_t n = p * kPanel + c, k = s * kPair + j;
          out[(s * kPanel + c) * kPair + j] = (n < N && k < K) ? w[n * K + k] : 0;
        }
      }
    }
  }
}

#ifdef LOWBIT_HAVE_AVX2_BUILD

bool avx2_available() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

namespace {

constexpr int kRows = 4;    // rows of x per register tile (6 measured no faster on AVX2)
constexpr int kPanels = 2;  // panels (8 columns each) per register tile

// One tile: rows [m0, m0 + rows) x panels [p0, p0 + panels) (rows <= kRows, panels <= kPanels),
// x given as int32 words of int16 pairs (x2[m * steps + s] = x[m, 2s] | x[m, 2s + 1] << 16).
template <int kR, int kP>
__attribute__((target("avx2"))) void tile(const int32_t* x2, int64_t steps, const int8_t* packed, int64_t p0,
                                          int64_t m0, int64_t M, int64_t N, int32_t* acc) {
  __m256i sum[kR][kP];
  for (int r = 0; r < kR; ++r)
    for (int q = 0; q < kP; ++q) sum[r][q] = _mm256_setzero_si256();
  const int8_t* panel[kP];
  for (int q = 0; q < kP; ++q) panel[q] = packed + (p0 + q) * steps * kPanel * kPair;
  const int32_t* row[kR];
  for (int r = 0; r < kR; ++r) row[r] = x2 + (m0 + r) * steps;
  for (int64_t s = 0; s < steps; ++s) {
    __m256i w[kP];
    for (int q = 0; q < kP; ++q) {
      w[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel[q] + s * kPanel * kPair)));
    }
    for (int r = 0; r < kR; ++r) {
      const __m256i xb = _mm256_set1_epi32(row[r][s]);
      for (int q = 0; q < kP; ++q) sum[r][q] = _mm256_add_epi32(sum[r][q], _mm256_madd_epi16(xb, w[q]));
    }
  }
  for (int r = 0; r < kR; ++r) {
    for (int q = 0; q < kP; ++q) {
      const int64_t n0 = (p0 + q) * kPanel;
      int32_t* out = acc + (m0 + r) * N + n0;
      if (n0 + kPanel <= N) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sum[r][q]);
      } else {
        alignas(32) int32_t lanes[kPanel];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum[r][q]);
        for (int64_t c = 0; c < N - n0; ++c) out[c] = lanes[c];
      }
    }
  }
}

// Dispatches a tile of `rows` x `panels` to its instantiation.
template <int kR>
void tile_rows(int panels, const int32_t* x2, int64_t steps, const int8_t* packed, int64_t p0, int64_t m0, int64_t M,
               int64_t N, int32_t* acc) {
  if (panels == 2) {
    tile<kR, 2>(x2, steps, packed, p0, m0, M, N, acc);
  } else {
    tile<kR, 1>(x2, steps, packed, p0, m0, M, N, acc);
  }
}

}  // namespace

void gemm_avx2(const int8_t* xq, int64_t M, int64_t K, const int8_t* packed, int64_t N, int32_t* acc) {
  const int64_t steps = (K + kPair - 1) / kPair, panels = (N + kPanel - 1) / kPanel;
  // x as int16 pairs in int32 words, zero-padded to an even K: one broadcast per row and step.
  std::vector<int32_t> x2(static_cast<size_t>(M * steps));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = s * kPair;
      const int32_t lo = static_cast<int16_t>(xq[m * K + k]);
      const int32_t hi = k + 1 < K ? static_cast<int16_t>(xq[m * K + k + 1]) : 0;
      x2[m * steps + s] = static_cast<int32_t>((static_cast<uint32_t>(lo) & 0xFFFFu) | (static_cast<uint32_t>(hi) << 16));
    }
  }
  const int64_t panel_tiles = (panels + kPanels - 1) / kPanels, row_tiles = (M + kRows - 1) / kRows;
  const int64_t tiles = panel_tiles * row_tiles;
  // Panels outermost: a thread's tiles share a weight panel, which stays in cache across its rows.
#pragma omp parallel for schedule(static) if (M * N * K > (1 << 18))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t pt = t / row_tiles, rt = t % row_tiles;
    const int64_t p0 = pt * kPanels, m0 = rt * kRows;
    const int np = static_cast<int>(std::min<int64_t>(kPanels, panels - p0));
    const int nr = static_cast<int>(std::min<int64_t>(kRows, M - m0));
    switch (nr) {
      case 4: tile_rows<4>(np, x2.data(), steps, packed, p0, m0, M, N, acc); break;
      case 3: tile_rows<3>(np, x2.data(), steps, packed, p0, m0, M, N, acc); break;
      case 2: tile_rows<2>(np, x2.data(), steps, packed, p0, m0, M, N, acc); break;
      default: tile_rows<1>(np, x2.data(), steps, packed, p0, m0, M, N, acc); break;
    }
  }
}

#else

bool avx2_available() { return false; }

void gemm_avx2(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*) {}

#endif

}  // namespace lowbit::cpu::int8
