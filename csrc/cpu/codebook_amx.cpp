// The codebook product on AMX (bf16 tiles), for bf16 inputs on CPUs with AMX-BF16 (codebook.h).
//
// W's tiles are decoded from the codes as the product needs them, never stored whole. Up to 32 rows
// of x, a task owns a panel of 32 output rows and, step by step along K, decodes the step's two B
// tiles into an L1 buffer and multiplies them at once (2 KB of W in flight). Above 32 rows, a task
// owns a block of panels (~1 MB of decoded bf16), decodes them into B tiles in a per-thread buffer
// (in L2), then runs every 32-row block of x over them. Either way 2 x 2 tiles at a time
// (tdpbf16ps: 16 x 32 bf16 of x times 32 x 16 of W into 16 x 16 fp32), and each finished 32 x 32
// block goes through the epilogue (the column's scale, the bias, the cast to bf16).
//
// Decoding one B tile (32 input features x 16 output rows, as 16 rows of 16 feature pairs): for
// each of its 16 output rows, the 32 / g groups are copied from the decode table (W without its
// scales, bf16, one row of g values per combined code) or, in the blocked path for 8-bit codes,
// summed from the fp32 codebooks in registers (the table would share L2 with the 1 MB block), into
// one 64-byte register of 16 feature pairs; a 16 x 16 transpose of 32-bit pairs then gives the
// tile's rows. Decoding is what this kernel spends most of its time on up to about 64 rows of x.
// Measured on a Xeon with AMX, 4096 x 4096, 2x8, 2 threads, up to 32 rows: the table in the
// step-by-step path took 0.9-1.0 ms against 1.2-1.4 ms summing in registers (1x8, whose table sits
// in L1: 0.6 ms); a transpose-free variant (y^T = W x^T, W as the A operand) and prefetching the
// next steps' table lines were no faster.
#include "codebook.h"

#include <c10/util/BFloat16.h>
#include <omp.h>
#include <string.h>

#include <algorithm>

#include "int8_gemm.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include "aligned.h"
#include "amx_tiles.h"
#define LOWBIT_HAVE_AMX_BUILD 1
#endif

namespace lowbit::cpu::codebook {

#ifdef LOWBIT_HAVE_AMX_BUILD

namespace {

constexpr int64_t kPanel = 32;  // output rows per panel: two B tiles side by side
constexpr int64_t kStep = 32;   // input features per step: one bf16 tile row holds 32
constexpr int64_t kTileBytes = 1024;
constexpr int64_t kBlockBytes = 1 << 20;  // decoded W per task, kept in L2

bool host_has_amx_bf16() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 22) & 1)) return false;  // CPUID.(7, 0).EDX[22]: AMX-BF16
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
  return (a >> 5) & 1;  // CPUID.(7, 1).EAX[5]: AVX512_BF16 (the decode's conversion)
}

// The combined table index of group j of row n (decode_table_rows' rule).
template <int C, bool k16>
inline int64_t group_index(const Layer& w, int64_t n, int64_t j) {
  if constexpr (k16) {
    return w.codes16[n * w.G + j];
  } else if constexpr (C == 2) {
    uint16_t v;  // codes a, b as one little-endian word: a + 256 b
    memcpy(&v, w.codes8 + (n * w.G + j) * 2, 2);
    return v;
  } else {
    return w.codes8[n * w.G + j];
  }
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// gcc 12's intrinsics leave the upper half of a widened register undefined on purpose
// (_mm512_castsi256_si512), which its own -Wuninitialized then reports once per use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16 x 16 transpose of 32-bit elements: r[i] holds row i on entry, column i on exit.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now 128-bit lane L of r[4q + j] holds rows 4q..4q+3 of column 4L + j; column 4L + j is lane L
  // of r[j], r[4 + j], r[8 + j], r[12 + j], gathered by two rounds of lane shuffles.
  __m512i out[16];
  for (int j = 0; j < 4; ++j) {
    const __m512i u = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), v = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    out[j] = _mm512_shuffle_i32x4(u, u2, 0x88);
    out[4 + j] = _mm512_shuffle_i32x4(u, u2, 0xDD);
    out[8 + j] = _mm512_shuffle_i32x4(v, v2, 0x88);
    out[12 + j] = _mm512_shuffle_i32x4(v, v2, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}

// Row n's 32 features from step j0 (the first group) of 8-bit codes, summed from the fp32
// codebooks (kept in L1: 8 KB each) as the decode table would hold them, rounded to bf16 once:
// 16 feature pairs in one register.
template <int C, int G>
inline __m512i decode_row_books(const Layer& w, int64_t n, int64_t j0) {
  const uint8_t* code = w.codes8 + (n * w.G + j0) * C;
  const float* books = w.books;
  const float* books1 = w.books + w.E * G;
  __m512 half[2];
  for (int h = 0; h < 2; ++h) {
    constexpr int kPer = 16 / G;  // groups per 16 features
    __m512 v[C];
    for (int c = 0; c < C; ++c) {
      const float* b = c == 0 ? books : books1;
      const auto at = [&](int q) { return b + static_cast<int64_t>(code[(h * kPer + q) * C + c]) * G; };
      if constexpr (G == 8) {
        v[c] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(at(0))), _mm256_loadu_ps(at(1)), 1);
      } else {
        const __m256 lo = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(at(0))), _mm_loadu_ps(at(1)), 1);
        const __m256 hi = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(at(2))), _mm_loadu_ps(at(3)), 1);
        v[c] = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      }
    }
    half[h] = _mm512_add_ps(_mm512_setzero_ps(), v[0]);  // 0 + first: the reference's sum
    if constexpr (C == 2) half[h] = _mm512_add_ps(half[h], v[1]);
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(half[1], half[0]));
}

// One B tile: output rows n0..n0+15, features s * 32 .. + 31, into dst (16 rows of 64 bytes).
template <int C, bool k16, int G, bool kTable>
inline void decode_tile(const Layer& w, const c10::BFloat16* table, int64_t n0, int64_t s, int8_t* dst) {
  const int64_t K = w.G * G, k0 = s * kStep;
  constexpr int kGroups = kStep / G;
  __m512i r[16];
  if (n0 + 16 <= w.N && k0 + kStep <= K) {
    // Straight from the table into registers: a store-then-load through memory would stall on
    // store forwarding (one 64-byte load over four 16-byte stores).
    for (int c = 0; c < 16; ++c) {
      const int64_t j0 = k0 / G;
      if constexpr (!kTable) {
        r[c] = decode_row_books<C, G>(w, n0 + c, j0);
      } else if constexpr (G == 8) {
        const auto part = [&](int q) {
          return _mm_loadu_si128(reinterpret_cast<const __m128i*>(table + group_index<C, k16>(w, n0 + c, j0 + q) * 8));
        };
        const __m512i lo = _mm512_castsi256_si512(_mm256_set_m128i(part(1), part(0)));
        r[c] = _mm512_inserti64x4(lo, _mm256_set_m128i(part(3), part(2)), 1);
      } else {
        int64_t v[8];
        for (int q = 0; q < 8; ++q) memcpy(&v[q], table + group_index<C, k16>(w, n0 + c, j0 + q) * 4, 8);
        r[c] = _mm512_set_epi64(v[7], v[6], v[5], v[4], v[3], v[2], v[1], v[0]);
      }
    }
  } else {  // the edges: features past K and rows past N are zeros
    for (int c = 0; c < 16; ++c) {
      alignas(64) uint16_t row[kStep] = {};
      if (n0 + c < w.N) {
        for (int q = 0; q < kGroups && k0 + q * G < K; ++q) {
          const int64_t j = k0 / G + q;
          if constexpr (k16) {
            memcpy(row + q * G, table + group_index<C, k16>(w, n0 + c, j) * G, G * 2);
          } else {
            // The table's value, summed here: 0 + the first codeword, plus the second, rounded once.
            const uint8_t* code = w.codes8 + ((n0 + c) * w.G + j) * C;
            for (int t = 0; t < G; ++t) {
              float v = 0.f + w.books[static_cast<int64_t>(code[0]) * G + t];
              if constexpr (C == 2) v += w.books[(w.E + code[1]) * G + t];
              const c10::BFloat16 b(v);
              memcpy(row + q * G + t, &b, 2);
            }
          }
        }
      }
      r[c] = _mm512_load_si512(row);
    }
  }
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + i * 64, r[i]);
}

template <int C, bool k16, int G, bool kTable>
void decode_block(const Layer& w, const c10::BFloat16* table, int64_t p0, int64_t p1, int64_t steps, int8_t* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t s = 0; s < steps; ++s) {
      int8_t* out = dst + ((p - p0) * steps + s) * 2 * kTileBytes;
      decode_tile<C, k16, G, kTable>(w, table, p * kPanel, s, out);
      decode_tile<C, k16, G, kTable>(w, table, p * kPanel + 16, s, out + kTileBytes);
    }
  }
}

// 32 rows x 32 columns over `steps` steps into c (rows 32 fp32 apart): a at x's packed tiles of the
// row block (per step 2 KB: rows 0-15, then 16-31), b at the panel's decoded tiles.
inline void block(const int8_t* a, const int8_t* b, int64_t steps, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * 2048, 64);
    _tile_loadd(6, b + s * 2048, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + s * 2048 + 1024, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + s * 2048 + 1024, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// Up to 32 rows of x (`two`: more than 16): panel n0's 32 output columns into c (rows 32 fp32 apart),
// each step's two B tiles decoded through the table into an L1 buffer (two, alternating) and
// multiplied at once. The table is read even for two 8-bit codebooks (1 MB, in L2 here: nothing
// else is kept there): one 16-byte copy per group, against a sum and a conversion in registers.
template <int C, bool k16, int G, bool kTable>
inline void stream_panel(const Layer& w, const c10::BFloat16* table, const int8_t* a, int64_t steps, int64_t n0,
                         bool two, int8_t* buf, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    int8_t* b = buf + (s & 1) * 2 * kTileBytes;
    decode_tile<C, k16, G, kTable>(w, table, n0, s, b);
    decode_tile<C, k16, G, kTable>(w, table, n0 + 16, s, b + kTileBytes);
    _tile_loadd(4, a + s * 2048, 64);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + kTileBytes, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, a + s * 2048 + 1024, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (two) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

void release() { _tile_release(); }

#pragma GCC diagnostic pop
#pragma GCC pop_options

// The epilogue of a finished block c (rows x cols, rows 32 fp32 apart) of output columns n0.. into y
// (rows N apart): each column's scale, the bias, one rounding to bf16.
inline void finish(const float* c, int64_t rows, int64_t cols, const Layer& w, const float* bias, int64_t n0,
                   c10::BFloat16* y) {
  for (int64_t r = 0; r < rows; ++r) {
    c10::BFloat16* out = y + r * w.N;
    for (int64_t i = 0; i < cols; ++i) {
      const float v = c[r * 32 + i] * w.scales[n0 + i];
      out[i] = static_cast<c10::BFloat16>(bias != nullptr ? v + bias[n0 + i] : v);
    }
  }
}

template <int C, bool k16, int G>
void run(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
         c10::BFloat16* y) {
  const int64_t N = w.N, K = w.G * G;
  const int64_t steps = (K + kStep - 1) / kStep, kp = steps * kStep;
  const int64_t mp = (M + 31) / 32 * 32, panels = (N + kPanel - 1) / kPanel;
  // x in A tiles: per 32 rows and step, rows 0-15 then 16-31, 64 bytes each, zero-padded.
  static thread_local Aligned<int8_t> a_tiles;
  int8_t* const a = a_tiles.at_least(mp * kp * 2);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < mp; ++m) {
    int8_t* out = a + (m / 32) * 32 * kp * 2 + ((m % 32) / 16) * kTileBytes + (m % 16) * 64;
    for (int64_t s = 0; s < steps; ++s) {
      int8_t* dst = out + s * 2048;
      const int64_t k0 = s * kStep, n = m < M ? std::min<int64_t>(kStep, K - k0) : 0;
      if (n > 0) memcpy(dst, x + m * K + k0, static_cast<size_t>(n) * 2);
      if (n < kStep) memset(dst + n * 2, 0, static_cast<size_t>(kStep - n) * 2);
    }
  }
  if (mp == 32) {  // up to 32 rows: decode each step's tiles as they are multiplied
#pragma omp parallel
    {
      amx::configure_16x64();
      Aligned<int8_t> b_tiles;
      Aligned<float> cbuf;
      int8_t* const b = b_tiles.at_least(4 * kTileBytes);
      float* const c = cbuf.at_least(32 * 32);
#pragma omp for schedule(static)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
        if (k16 || table != nullptr) {
          stream_panel<C, k16, G, true>(w, table, a, steps, n0, M > 16, b, c);
        } else if constexpr (!k16) {
          stream_panel<C, k16, G, false>(w, table, a, steps, n0, M > 16, b, c);
        }
        finish(c, M, cols, w, bias, n0, y + n0);
      }
      release();
    }
    return;
  }
  const int64_t panel_bytes = steps * 2 * kTileBytes;
  const int64_t block_panels = std::clamp<int64_t>(kBlockBytes / panel_bytes, 1, panels);
  const int64_t blocks = (panels + block_panels - 1) / block_panels;
#pragma omp parallel
  {
    amx::configure_16x64();
    Aligned<int8_t> b_tiles;
    Aligned<float> cbuf;
    int8_t* const b = b_tiles.at_least(block_panels * panel_bytes);
    float* const c = cbuf.at_least(32 * 32);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t p0 = blk * block_panels, p1 = std::min(panels, p0 + block_panels);
      decode_block<C, k16, G, k16>(w, table, p0, p1, steps, b);
      for (int64_t m0 = 0; m0 < mp; m0 += 32) {
        const int64_t rows = std::min<int64_t>(32, M - m0);
        for (int64_t p = p0; p < p1; ++p) {
          block(a + m0 * kp * 2, b + (p - p0) * panel_bytes, steps, c);
          const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
          finish(c, rows, cols, w, bias, n0, y + m0 * N + n0);
        }
      }
    }
    release();
  }
}

}  // namespace

bool amx_bf16_available() {
  static const bool ok = lowbit::cpu::int8::amx_available() && host_has_amx_bf16();
  return ok;
}

void matmul_amx_bf16(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
                     c10::BFloat16* y) {
  with_configuration(w, [&](auto c, auto k16, auto g) { run<c(), k16(), g()>(x, M, w, table, bias, y); });
}

#else

bool amx_bf16_available() { return false; }

void matmul_amx_bf16(const c10::BFloat16*, int64_t, const Layer&, const c10::BFloat16*, const float*,
                     c10::BFloat16*) {}

#endif

}  // namespace lowbit::cpu::codebook
