// lowbit's CPU int8 GEMM (int8_gemm.h). The AVX2 kernel widens int8 to int16 and multiplies with
// vpmaddwd (16 int16 products, summed in pairs into 8 int32 lanes): half the products per
// instruction of vpmaddubsw, but exact for the whole int8 range, with no offset or column-sum
// compensation (vpmaddubsw's u8 x s8 pair sums saturate int16: 255 * 127 * 2 > 32767).
//
// Blocking: a task is a block of rows and one panel of 16 weight columns, run in blocks of kKc steps
// (2 input features each) of the panel, each packed (int8_gemm.h) into a per-thread buffer that
// stays in L1/L2 while every row tile of the block runs over it. x is packed once per call into
// int16 pairs, 6 rows interleaved per step, so a tile reads one stream. A register tile is 6 rows x
// 16 columns: per step 2 weight loads widened to int16 (vpmovsxbw), 6 broadcasts, 12 vpmaddwd and
// 12 vpaddd into 12 accumulators. Measured on Zen 3 (2 threads): 75-80% of a register-only vpmaddwd
// + vpaddd loop. Widening a block of the panel into an int16 buffer once per K block and sharing it
// across row tiles (GotoBLAS' packed B) was measured slower. Up to kSmallRows rows the product runs
// along k on the row-major weight instead (gemm_small), and dots_avx2 is the weight-only product's
// kernel (fp32 x, int8 weight).
#include "int8_gemm.h"

#include "isa.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWBIT_HAVE_AVX2_BUILD 1
#endif

namespace lowbit::cpu::int8 {

constexpr int64_t kStepBytes = kPanel * kPair;  // 32: one step of a panel

#ifdef LOWBIT_HAVE_AVX2_BUILD

bool avx2_available() { return cpu_isa() >= Isa::kAvx2; }

namespace {

constexpr int kTile = 6;        // rows per register tile
constexpr int64_t kKc = 1024;   // steps per K block: 32 KB of a packed panel, in L1/L2
// At most this many rows take the few-rows product (gemm_small): measured 20-25% faster than
// packing at 4 and 8 rows, 10% slower at 16 (4096 x 4096, AVX2 host).
constexpr int64_t kSmallRows = 8;
constexpr int64_t kXBlock = 2 << 20;  // bytes of packed x per row block: in L3 beside the weight

#pragma GCC push_options
#pragma GCC target("avx2")

// One 16 x 16 transpose of int16 pairs: rows (weight rows n0..n0+15, 16 steps each) at src, rows
// `ld` bytes apart, into 16 steps of the panel layout at dst (unpack 16, 32, 64 bits, then
// swap 128-bit lanes).
inline void transpose16(const int8_t* src, int64_t ld, int8_t* dst) {
  __m256i a[16], b[16], c[16], e[8], f[8];
  for (int r = 0; r < 16; ++r) a[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * ld));
  for (int r = 0; r < 16; r += 2) {  // b[r] lane L: pairs of rows r, r+1 at steps 8L..8L+3; b[r+1]: 8L+4..
    b[r] = _mm256_unpacklo_epi16(a[r], a[r + 1]);
    b[r + 1] = _mm256_unpackhi_epi16(a[r], a[r + 1]);
  }
  for (int r = 0; r < 16; r += 4) {  // c[r + t] lane L: rows r..r+3 at steps 8L + 2t, 8L + 2t + 1
    c[r] = _mm256_unpacklo_epi32(b[r], b[r + 2]);
    c[r + 1] = _mm256_unpackhi_epi32(b[r], b[r + 2]);
    c[r + 2] = _mm256_unpacklo_epi32(b[r + 1], b[r + 3]);
    c[r + 3] = _mm256_unpackhi_epi32(b[r + 1], b[r + 3]);
  }
  for (int t = 0; t < 4; ++t) {  // e[u] (f[u]) lane L: rows 0-7 (8-15) at step 8L + u
    e[2 * t] = _mm256_unpacklo_epi64(c[t], c[4 + t]);
    e[2 * t + 1] = _mm256_unpackhi_epi64(c[t], c[4 + t]);
    f[2 * t] = _mm256_unpacklo_epi64(c[8 + t], c[12 + t]);
    f[2 * t + 1] = _mm256_unpackhi_epi64(c[8 + t], c[12 + t]);
  }
  __m256i* out = reinterpret_cast<__m256i*>(dst);
  for (int u = 0; u < 8; ++u) {
    _mm256_storeu_si256(out + u, _mm256_permute2x128_si256(e[u], f[u], 0x20));
    _mm256_storeu_si256(out + 8 + u, _mm256_permute2x128_si256(e[u], f[u], 0x31));
  }
}

// Packs steps [s0, s0 + n) of panel p of w [N, K] into dst (n * 32 bytes, the layout of
// int8_gemm.h). A full panel goes 32 steps (one 64-byte line of each of its 16 rows) at a time, as
// two 16 x 16 transposes; the rest goes element by element. Measured here: packing runs at about
// the speed of reading the weight from DRAM on one core, and adds 10-20% to the product at 16-256
// rows, the price of keeping no second copy of the weight.
void pack_block(const int8_t* w, int64_t N, int64_t K, int64_t p, int64_t s0, int64_t n, int8_t* dst) {
  const int64_t n0 = p * kPanel;
  int64_t s = 0;
  if (n0 + kPanel <= N) {
    for (; s + 32 <= n && (s0 + s + 32) * kPair <= K; s += 32) {
      const int8_t* src = w + n0 * K + (s0 + s) * kPair;
      transpose16(src, K, dst + s * kStepBytes);
      transpose16(src + 32, K, dst + (s + 16) * kStepBytes);
    }
  }
  for (; s < n; ++s) {
    for (int64_t c = 0; c < kPanel; ++c) {
      for (int64_t j = 0; j < kPair; ++j) {
        const int64_t row = n0 + c, k = (s0 + s) * kPair + j;
        dst[(s * kPanel + c) * kPair + j] = (row < N && k < K) ? w[row * K + k] : 0;
      }
    }
  }
}

// Adds (or stores, when !accumulate) one row of a tile: lanes lo (columns 0-7), hi (8-15), of which
// the first `cols` are inside the output.
inline void put_row(int32_t* c, __m256i lo, __m256i hi, int cols, bool accumulate) {
  if (cols == kPanel) {
    __m256i* p = reinterpret_cast<__m256i*>(c);
    if (accumulate) {
      lo = _mm256_add_epi32(lo, _mm256_loadu_si256(p));
      hi = _mm256_add_epi32(hi, _mm256_loadu_si256(p + 1));
    }
    _mm256_storeu_si256(p, lo);
    _mm256_storeu_si256(p + 1, hi);
    return;
  }
  alignas(32) int32_t lanes[kPanel];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8), hi);
  for (int i = 0; i < cols; ++i) c[i] = accumulate ? c[i] + lanes[i] : lanes[i];
}

// One tile of R < 6 rows x 16 columns over `steps` steps. xp: the tile's packed x at its first step
// (xp[s * 6 + r] holds the int16 pair of row r at step s). w8: the panel at the first step. c: the
// tile's first output, rows ldc apart.
template <int R>
void tile(const int32_t* xp, const int8_t* w8, int64_t steps, int32_t* c, int64_t ldc, int cols, bool accumulate) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero;
  __m256i c30 = zero, c31 = zero, c40 = zero, c41 = zero, c50 = zero, c51 = zero;
#define LOWBIT_ROW(r)                                                \
  if constexpr (R > r) {                                             \
    const __m256i b = _mm256_set1_epi32(xp[s * kTile + r]);          \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(b, w0));   \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(b, w1));   \
  }
#pragma GCC unroll 2
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w8 + s * kStepBytes)));
    const __m256i w1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w8 + s * kStepBytes + 16)));
    LOWBIT_ROW(0)
    LOWBIT_ROW(1)
    LOWBIT_ROW(2)
    LOWBIT_ROW(3)
    LOWBIT_ROW(4)
    LOWBIT_ROW(5)
  }
#undef LOWBIT_ROW
  put_row(c, c00, c01, cols, accumulate);
  if constexpr (R > 1) put_row(c + ldc, c10, c11, cols, accumulate);
  if constexpr (R > 2) put_row(c + 2 * ldc, c20, c21, cols, accumulate);
  if constexpr (R > 3) put_row(c + 3 * ldc, c30, c31, cols, accumulate);
  if constexpr (R > 4) put_row(c + 4 * ldc, c40, c41, cols, accumulate);
  if constexpr (R > 5) put_row(c + 5 * ldc, c50, c51, cols, accumulate);
}

// A full tile (6 rows x 16 columns) in assembly: GCC spills some of the 12 accumulators of the
// intrinsics version to the stack in the loop. ymm0-11 accumulate, ymm12-13 hold the step's
// weights widened to int16, ymm14 the broadcast x pair, ymm15 a product. Writes the 12 sums
// (row-major, lo then hi) to out.
#define LOWBIT_ROW(r, lo, hi)                              \
  "vpbroadcastd " #r "*4(%[x]), %%ymm14\n\t"               \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                  \
  "vpaddd %%ymm15, %%ymm" #lo ", %%ymm" #lo "\n\t"          \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                  \
  "vpaddd %%ymm15, %%ymm" #hi ", %%ymm" #hi "\n\t"
#define LOWBIT_TILE6(load_lo, load_hi, stride)                                                            \
  asm volatile(                                                                                            \
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"                                                                    \
      "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"                                                                    \
      "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"                                                                    \
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"                                                                    \
      "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"                                                                    \
      "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"                                                                    \
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"                                                                    \
      "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"                                                                    \
      "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"                                                                    \
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"                                                                    \
      "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"                                                                 \
      "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"                                                                 \
      "test %[n], %[n]\n\t"                                                                                 \
      "jz 2f\n\t"                                                                                           \
      ".p2align 5\n"                                                                                        \
      "1:\n\t" load_lo "\n\t" load_hi "\n\t" LOWBIT_ROW(0, 0, 1) LOWBIT_ROW(1, 2, 3) LOWBIT_ROW(2, 4, 5)      \
          LOWBIT_ROW(3, 6, 7) LOWBIT_ROW(4, 8, 9) LOWBIT_ROW(5, 10, 11) "add $" #stride ", %[w]\n\t"        \
                                                                    "add $24, %[x]\n\t"                      \
                                                                    "dec %[n]\n\t"                           \
                                                                    "jnz 1b\n"                                \
                                                                    "2:\n\t"                                 \
                                                                    "vmovdqu %%ymm0, 0(%[out])\n\t"          \
                                                                    "vmovdqu %%ymm1, 32(%[out])\n\t"         \
                                                                    "vmovdqu %%ymm2, 64(%[out])\n\t"         \
                                                                    "vmovdqu %%ymm3, 96(%[out])\n\t"         \
                                                                    "vmovdqu %%ymm4, 128(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm5, 160(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm6, 192(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm7, 224(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm8, 256(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm9, 288(%[out])\n\t"        \
                                                                    "vmovdqu %%ymm10, 320(%[out])\n\t"       \
                                                                    "vmovdqu %%ymm11, 352(%[out])\n\t"       \
                                                                    "vzeroupper\n\t"                         \
      : [w] "+r"(w), [x] "+r"(xp), [n] "+r"(steps)                                                         \
      : [out] "r"(out)                                                                                     \
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",      \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

void tile6(const int32_t* xp, const int8_t* w, int64_t steps, __m256i* out) {
  LOWBIT_TILE6("vpmovsxbw (%[w]), %%ymm12", "vpmovsxbw 16(%[w]), %%ymm13", 32);
}
#undef LOWBIT_TILE6
#undef LOWBIT_ROW

// A tile of `rows` rows.
void tile_rows(int rows, const int32_t* xp, const int8_t* w, int64_t steps, int32_t* c, int64_t ldc, int cols,
               bool accumulate) {
  switch (rows) {
    case 6: {
      __m256i sums[2 * kTile];
      tile6(xp, w, steps, sums);
      for (int r = 0; r < kTile; ++r) put_row(c + r * ldc, sums[2 * r], sums[2 * r + 1], cols, accumulate);
      return;
    }
    case 5: return tile<5>(xp, w, steps, c, ldc, cols, accumulate);
    case 4: return tile<4>(xp, w, steps, c, ldc, cols, accumulate);
    case 3: return tile<3>(xp, w, steps, c, ldc, cols, accumulate);
    case 2: return tile<2>(xp, w, steps, c, ldc, cols, accumulate);
    default: return tile<1>(xp, w, steps, c, ldc, cols, accumulate);
  }
}

// The few-rows product, without packing: each sum runs along k in vpmaddwd lanes (x widened to
// int16 once per call, 16 weights of a row widened per step), MR x rows by NR weight rows, and the
// 8 int32 lanes are added at the end (exact). Per step 3 weight widenings, 3 x loads and 9
// vpmaddwd: more instructions per product than the packed tile, but no 16 x 16 transposes; the
// faster of the two up to kSmallRows rows. `next`: as in dots_tile.
template <int MR, int NR>
void small_tile(const int16_t* x, int64_t ldx, int64_t K, const int8_t* w, const int8_t* next, int32_t* out,
                int64_t ldo) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const int64_t k16 = K / 16 * 16;
  for (int64_t k = 0; k < k16; k += 16) {
    if (next != nullptr && (k & 63) == 0) {
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T1);
    }
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(acc[i][j]), _mm256_extracti128_si256(acc[i][j], 1));
      const __m128i d = _mm_add_epi32(q, _mm_unpackhi_epi64(q, q));
      int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(d, _mm_shuffle_epi32(d, 1)));
      for (int64_t k = k16; k < K; ++k) sum += static_cast<int32_t>(x[i * ldx + k]) * w[j * K + k];
      out[i * ldo + j] = sum;
    }
  }
}

template <int NR>
void small_rows(int rows, const int16_t* x, int64_t ldx, int64_t K, const int8_t* w, const int8_t* next,
                int32_t* out, int64_t ldo) {
  switch (rows) {
    case 3: return small_tile<3, NR>(x, ldx, K, w, next, out, ldo);
    case 2: return small_tile<2, NR>(x, ldx, K, w, next, out, ldo);
    default: return small_tile<1, NR>(x, ldx, K, w, next, out, ldo);
  }
}

#pragma GCC pop_options

void gemm_small(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, int threads) {
  constexpr int64_t kCols = 3, kRows = 3;  // 9 accumulators, 3 weight vectors, x: no spills
  std::vector<int16_t> x16(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) x16[i] = xq[i];
  const int64_t tiles = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kCols;
    const int cols = static_cast<int>(std::min(kCols, N - n0));
    const int8_t* wn = w + n0 * K;
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {  // the tile's weight rows stay in L1 across x rows
      const int rows = static_cast<int>(std::min(kRows, M - m0));
      const int8_t* next = m0 == 0 && n0 + 2 * kCols <= N ? wn + kCols * K : nullptr;
      const int16_t* xm = x16.data() + m0 * K;
      int32_t* o = acc + m0 * N + n0;
      switch (cols) {
        case 3: small_rows<3>(rows, xm, K, K, wn, next, o, N); break;
        case 2: small_rows<2>(rows, xm, K, K, wn, next, o, N); break;
        default: small_rows<1>(rows, xm, K, K, wn, next, o, N); break;
      }
    }
  }
}

}  // namespace

void gemm_avx2(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc) {
  const int64_t steps = (K + kPair - 1) / kPair, panels = (N + kPanel - 1) / kPanel;
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  const bool parallel = M * N * K > (1 << 18);
  const int threads = parallel ? omp_get_max_threads() : 1;
  if (M <= kSmallRows) return gemm_small(xq, M, K, w, N, acc, threads);
  // x as int16 pairs in int32 words, 6 rows interleaved per step, zero-padded (odd K, last tile).
  std::vector<int32_t> xp(static_cast<size_t>(row_tiles * steps * kTile), 0);
#pragma omp parallel for schedule(static) if (parallel && M > 1)
  for (int64_t m = 0; m < M; ++m) {
    int32_t* out = xp.data() + (m / kTile) * steps * kTile + m % kTile;
    const int8_t* x = xq + m * K;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = s * kPair;
      const uint32_t lo = static_cast<uint16_t>(static_cast<int16_t>(x[k]));
      const uint32_t hi = k + 1 < K ? static_cast<uint16_t>(static_cast<int16_t>(x[k + 1])) : 0;
      out[s * kTile] = static_cast<int32_t>(lo | (hi << 16));
    }
  }
  // Tasks: a block of row tiles and a panel, row blocks outermost. A row block's packed x is at most
  // kXBlock bytes, so it stays in L3 while the thread's panels stream past it (all of x read per
  // panel measured 1.5x slower at 2048 rows); rows are split further when there are too few panels
  // to keep every thread busy. Each (row block, panel) packs its panel again: cheap next to the
  // rows' products.
  const int64_t x_blocks = (row_tiles * steps * kTile * 4 + kXBlock - 1) / kXBlock;
  const int64_t row_blocks =
      std::min(row_tiles, std::max<int64_t>(x_blocks, (4 * threads + panels - 1) / panels));
  const int64_t tiles_per_block = (row_tiles + row_blocks - 1) / row_blocks;
  const int64_t tasks = panels * row_blocks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int8_t> panel(static_cast<size_t>(std::min(kKc, steps) * kStepBytes));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t rb = t / panels, p = t % panels;
      const int64_t rt0 = rb * tiles_per_block, rt1 = std::min(row_tiles, rt0 + tiles_per_block);
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
      for (int64_t s0 = 0; s0 < steps; s0 += kKc) {
        const int64_t n = std::min(kKc, steps - s0);
        pack_block(w, N, K, p, s0, n, panel.data());
        for (int64_t rt = rt0; rt < rt1; ++rt) {
          const int rows = static_cast<int>(std::min<int64_t>(kTile, M - rt * kTile));
          const int32_t* x = xp.data() + (rt * steps + s0) * kTile;
          int32_t* c = acc + rt * kTile * N + p * kPanel;
          tile_rows(rows, x, panel.data(), n, c, N, cols, s0 > 0);
        }
      }
    }
  }
}

namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline float hsum(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// Sums of MR x rows (ld K) with NR weight rows: 8 int8 of each weight row widened to fp32 once per
// step and used by every x row; out rows ldo apart.
// `next`: the weight rows of the thread's next tile (or null), fetched into L2 while this tile runs,
// a line of each row every 64 input features: a row of 4096 int8 is one 4 KB page, across which the
// hardware prefetchers do not follow a stream (measured: 11 GB/s from DRAM without, 16 with).
template <int MR, int NR>
void dots_tile(const float* x, int64_t K, const int8_t* w, const int8_t* next, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = K / 8 * 8;
  for (int64_t k = 0; k < k8; k += 8) {
    if (next != nullptr && (k & 63) == 0) {
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T1);
    }
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * K + k));
      wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float sum = hsum(acc[i][j]);
      for (int64_t k = k8; k < K; ++k) sum += x[i * K + k] * static_cast<float>(w[j * K + k]);
      out[i * ldo + j] = sum;
    }
  }
}

template <int NR>
void dots_rows(int rows, const float* x, int64_t K, const int8_t* w, const int8_t* next, float* out, int64_t ldo) {
  if (rows == 2) return dots_tile<2, NR>(x, K, w, next, out, ldo);
  return dots_tile<1, NR>(x, K, w, next, out, ldo);
}

#pragma GCC pop_options

}  // namespace

void dots_avx2(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, float* out) {
  constexpr int64_t kCols = 4, kRows = 2;  // 8 accumulators, 4 weight vectors, x: no spills
  const int64_t tiles = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (M * N * K > (1 << 16))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kCols;
    const int cols = static_cast<int>(std::min(kCols, N - n0));
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {  // the tile's 4 weight rows stay in L1 across x rows
      const int rows = static_cast<int>(std::min(kRows, M - m0));
      const float* xm = x + m0 * K;
      const int8_t* wn = w + n0 * K;
      // Only the first x rows prefetch; the tile's weight is in L1/L2 for the others.
      const int8_t* next = m0 == 0 && n0 + 2 * kCols <= N ? wn + kCols * K : nullptr;
      float* o = out + m0 * N + n0;
      switch (cols) {
        case 4: dots_rows<4>(rows, xm, K, wn, next, o, N); break;
        case 3: dots_rows<3>(rows, xm, K, wn, next, o, N); break;
        case 2: dots_rows<2>(rows, xm, K, wn, next, o, N); break;
        default: dots_rows<1>(rows, xm, K, wn, next, o, N); break;
      }
    }
  }
}

#else

bool avx2_available() { return false; }

void gemm_avx2(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*) {}

void dots_avx2(const float*, int64_t, int64_t, const int8_t*, int64_t, float*) {}

#endif

}  // namespace lowbit::cpu::int8
