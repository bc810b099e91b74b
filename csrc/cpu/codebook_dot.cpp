// The codebook product for a few rows of bf16 x on AVX512-BF16's dot instruction (codebook.h).
//
// Each output row of W is decoded 32 features at a time through the decode table (W without its
// scales, bf16: one 16-byte copy per group of 8, from a 64-bit load of the step's codes) into one
// register, and vdpbf16ps multiplies it with the same 32 features of every row of x (kept in L1),
// accumulating in fp32. Four output rows run side by side, so that four accumulation chains are in
// flight and each load of x serves all four. No lookup table per row of x and no gather: a lookup
// per group instead of one per code, and no transpose (the AMX path's B tiles need one). The dot
// instruction, like the AMX tiles, flushes subnormal inputs and products to zero.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <omp.h>
#include <string.h>

#include <algorithm>

#include "codebook.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "aligned.h"
#define LOWBIT_HAVE_DOT_BUILD 1
#endif

namespace lowbit::cpu::codebook {

#ifdef LOWBIT_HAVE_DOT_BUILD

// gcc 12's intrinsics leave the upper half of a widened register undefined on purpose
// (_mm512_castsi256_si512), which its own -Wuninitialized then reports where the code is inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kStep = 32;  // features per dot: 32 bf16 in a register
constexpr int kRowsW = 4;      // output rows side by side (measured: 2 and 8 were slower)

bool host_has_avx512_bf16() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
  if (a < 7) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
  return (a >> 5) & 1;  // CPUID.(7, 1).EAX[5]: AVX512_BF16
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// Row n's features s * 32 .. + 31 (a full step inside K), as 32 bf16, from the table.
template <int C, bool k16, int G>
inline __m512i decode_step(const Layer& w, const c10::BFloat16* table, int64_t n, int64_t s) {
  constexpr int kGroups = kStep / G;
  const int64_t j0 = s * kGroups;
  if constexpr (G == 8) {
    // Four groups. Combined codes of 16 bits (two 8-bit codes, or one 16-bit code) come from one
    // 64-bit load; 8-bit codes one by one (measured faster than shifting them out of one load, on
    // the ports the decode fills).
    int64_t e[4];
    if constexpr (k16 || C == 2) {
      uint64_t codes;
      memcpy(&codes, k16 ? static_cast<const void*>(w.codes16 + n * w.G + j0)
                         : static_cast<const void*>(w.codes8 + (n * w.G + j0) * 2),
             8);
      for (int q = 0; q < 4; ++q) e[q] = (codes >> (16 * q)) & 0xFFFF;
    } else {
      for (int q = 0; q < 4; ++q) e[q] = w.codes8[n * w.G + j0 + q];
    }
    const auto part = [&](int q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(table + e[q] * 8)); };
    const __m512i lo = _mm512_castsi256_si512(_mm256_set_m128i(part(1), part(0)));
    return _mm512_inserti64x4(lo, _mm256_set_m128i(part(3), part(2)), 1);
  } else {
    int64_t v[kGroups];
    for (int q = 0; q < kGroups; ++q) {
      int64_t e;
      if constexpr (k16) {
        e = w.codes16[n * w.G + j0 + q];
      } else if constexpr (C == 2) {
        uint16_t pair;
        memcpy(&pair, w.codes8 + (n * w.G + j0 + q) * 2, 2);
        e = pair;
      } else {
        e = w.codes8[n * w.G + j0 + q];
      }
      memcpy(&v[q], table + e * 4, 8);
    }
    return _mm512_set_epi64(v[7], v[6], v[5], v[4], v[3], v[2], v[1], v[0]);
  }
}

// The last, partial step of row n (features past K are zeros).
template <int C, bool k16, int G>
inline __m512i decode_tail(const Layer& w, const c10::BFloat16* table, int64_t n, int64_t s) {
  alignas(64) uint16_t row[kStep] = {};
  const int64_t K = w.G * G;
  for (int64_t q = 0; q < kStep / G && s * kStep + q * G < K; ++q) {
    const int64_t j = s * (kStep / G) + q;
    int64_t e;
    if constexpr (k16) {
      e = w.codes16[n * w.G + j];
    } else if constexpr (C == 2) {
      e = w.codes8[(n * w.G + j) * 2] | (static_cast<int64_t>(w.codes8[(n * w.G + j) * 2 + 1]) << 8);
    } else {
      e = w.codes8[n * w.G + j];
    }
    memcpy(row + q * G, table + e * G, G * 2);
  }
  return _mm512_load_si512(row);
}

// Output rows [n0, n1) for ROWS rows of x (xp: [ROWS][steps * 32] bf16, zero-padded).
template <int C, bool k16, int G, int ROWS>
void rows_of(const Layer& w, const c10::BFloat16* table, const c10::BFloat16* xp, int64_t steps, int64_t n0,
             int64_t n1, const float* bias, c10::BFloat16* y) {
  const int64_t K = w.G * G, full = K / kStep, kp = steps * kStep;
  for (int64_t n = n0; n < n1; n += kRowsW) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsW, n1 - n));
    __m512 acc[kRowsW][ROWS];
    for (int r = 0; r < kRowsW; ++r)
      for (int m = 0; m < ROWS; ++m) acc[r][m] = _mm512_setzero_ps();
    if (rows == kRowsW) {
      for (int64_t s = 0; s < full; ++s) {
        __m512bh xs[ROWS];
        for (int m = 0; m < ROWS; ++m) xs[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp + m * kp + s * kStep));
        for (int r = 0; r < kRowsW; ++r) {
          const __m512bh wr = reinterpret_cast<__m512bh>(decode_step<C, k16, G>(w, table, n + r, s));
          for (int m = 0; m < ROWS; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wr, xs[m]);
        }
      }
    } else {
      for (int r = 0; r < rows; ++r) {
        for (int64_t s = 0; s < full; ++s) {
          const __m512bh wr = reinterpret_cast<__m512bh>(decode_step<C, k16, G>(w, table, n + r, s));
          for (int m = 0; m < ROWS; ++m) {
            const __m512bh xs = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp + m * kp + s * kStep));
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wr, xs);
          }
        }
      }
    }
    if (full < steps) {
      for (int r = 0; r < rows; ++r) {
        const __m512bh wr = reinterpret_cast<__m512bh>(decode_tail<C, k16, G>(w, table, n + r, full));
        for (int m = 0; m < ROWS; ++m) {
          const __m512bh xs = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp + m * kp + full * kStep));
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wr, xs);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int m = 0; m < ROWS; ++m) {
        const float v = _mm512_reduce_add_ps(acc[r][m]) * w.scales[n + r];
        y[m * w.N + n + r] = static_cast<c10::BFloat16>(bias != nullptr ? v + bias[n + r] : v);
      }
    }
  }
}

#pragma GCC pop_options

template <int C, bool k16, int G>
void run(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
         c10::BFloat16* y) {
  const int64_t K = w.G * G, steps = (K + kStep - 1) / kStep, kp = steps * kStep;
  // x zero-padded to whole steps, so that the last step's products past K are zeros.
  static thread_local Aligned<c10::BFloat16> padded;
  c10::BFloat16* const xp = padded.at_least(M * kp);
  for (int64_t m = 0; m < M; ++m) {
    memcpy(xp + m * kp, x + m * K, static_cast<size_t>(K) * 2);
    memset(xp + m * kp + K, 0, static_cast<size_t>(kp - K) * 2);
  }
  // Whole blocks of kRowsW output rows per thread.
  const int64_t quads = (w.N + kRowsW - 1) / kRowsW;
  const int threads = w.N * K >= (1 << 16) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), count = omp_get_num_threads();
    const int64_t n0 = std::min(w.N, quads * t / count * kRowsW);
    const int64_t n1 = std::min(w.N, quads * (t + 1) / count * kRowsW);
    switch (M) {
      case 1: rows_of<C, k16, G, 1>(w, table, xp, steps, n0, n1, bias, y); break;
      case 2: rows_of<C, k16, G, 2>(w, table, xp, steps, n0, n1, bias, y); break;
      case 3: rows_of<C, k16, G, 3>(w, table, xp, steps, n0, n1, bias, y); break;
      default: rows_of<C, k16, G, 4>(w, table, xp, steps, n0, n1, bias, y); break;
    }
  }
}

}  // namespace

bool dot_bf16_available() {
  static const bool ok = host_has_avx512_bf16();
  return ok && cpu_isa() >= Isa::kAvx512;
}

void matmul_dot_bf16(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
                     c10::BFloat16* y) {
  TORCH_CHECK(M <= kDotMaxRows, "lowbit: the codebook dot product takes at most ", kDotMaxRows, " rows, got ", M);
  with_configuration(w, [&](auto c, auto k16, auto g) { run<c(), k16(), g()>(x, M, w, table, bias, y); });
}

#pragma GCC diagnostic pop

#else

bool dot_bf16_available() { return false; }

void matmul_dot_bf16(const c10::BFloat16*, int64_t, const Layer&, const c10::BFloat16*, const float*,
                     c10::BFloat16*) {}

#endif

}  // namespace lowbit::cpu::codebook
