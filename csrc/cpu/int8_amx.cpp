// lowbit's AMX int8 GEMM (int8_gemm.h). AMX multiplies signed int8 by signed int8 into int32
// (tdpbssd: a 16 x 64 tile of x times a 64 x 16 tile of the weight, 16384 products in 16 cycles),
// exact for the whole int8 range, so x goes in as it is, with no u8 offset, zero point or
// column-sum compensation (oneDNN's int8 interface needs those).
//
// The weight is packed once (amx_pack) into the B-tile layout: panels of 32 output columns, and
// for each step of 64 input features two 1 KB tiles (columns 0-15 and 16-31 of the panel), a tile
// row r holding features 4r..4r+3 of its 16 columns. A register block is 32 rows x 32 columns (2 x
// A tiles, 2 B tiles, 4 accumulator tiles: all 8 tile registers). Blocking: a task is a block of
// panels (its packed weight ~1 MB, in L2) and a range of rows; for each block of 32 rows it runs
// the K chunks (kKc features) outermost, so the chunk of x stays in L1 while every panel of the
// block multiplies it, and the block's accumulators stay in a per-thread buffer between chunks (the
// last chunk stores them straight into acc). x is first copied into A-tile order (int8_amx: rows
// of a tile read straight from x alias in L1 when K is a multiple of 4096).
#include "int8_gemm.h"

#include "isa.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include "amx_tiles.h"
#include "aligned.h"
#define LOWBIT_HAVE_AMX_BUILD 1
#endif

namespace lowbit::cpu::int8 {

int64_t amx_packed_bytes(int64_t N, int64_t K) {
  const int64_t np = (N + kAmxPanel - 1) / kAmxPanel, ks = (K + kAmxStep - 1) / kAmxStep;
  return np * ks * kAmxPanel * kAmxStep;
}

void amx_pack(const int8_t* w, int64_t N, int64_t K, int8_t* packed) {
  const int64_t np = (N + kAmxPanel - 1) / kAmxPanel, ks = (K + kAmxStep - 1) / kAmxStep;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < np; ++p) {
    int8_t* out = packed + p * ks * kAmxPanel * kAmxStep;
    for (int64_t s = 0; s < ks; ++s) {
      for (int t = 0; t < 2; ++t) {
        int8_t* tile = out + (s * 2 + t) * 1024;
        for (int64_t r = 0; r < 16; ++r) {
          for (int64_t c = 0; c < 16; ++c) {
            const int64_t n = p * kAmxPanel + t * 16 + c;
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t k = s * kAmxStep + 4 * r + j;
              tile[r * 64 + c * 4 + j] = (n < N && k < K) ? w[n * K + k] : 0;
            }
          }
        }
      }
    }
  }
}

#ifdef LOWBIT_HAVE_AMX_BUILD

namespace {


bool host_has_amx() {
  // CPUID.(7, 0).EDX: bit 24 AMX-TILE, bit 25 AMX-INT8; the OS must enable the tile state (XCR0
  // bits 17 and 18) and grant it to this process.
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  if (!((c >> 27) & 1)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  return amx::request_tile_data();
}

// Input features per K chunk: x's chunk for 32 rows (16 KB) stays in L1 while each panel of the
// block multiplies it. A block's packed weight (~1 MB) stays in L2 while every 32 rows run over it.
// Measured on 2 cores of a Xeon with AMX: chunks of 256..4096 features and blocks of 512 KB..1 MB
// within noise of each other, 2.8-4.4 int8 TOP/s in all at 256..2048 x 4096 x 4096. A bare 2 x 2
// tile loop (bench/native/amx_tile_rates.cpp) runs ~6 per core with no loads, 3.9-5.2 with its
// operands in L1 or L2, and 1.6 when their rows are not 64-byte aligned (see Aligned).
constexpr int64_t kKc = 512;
constexpr int64_t kBlockBytes = 1 << 20;

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")

// Tile registers (amx::configure_16x64): 0-3 accumulators (rows 0-15 x cols 0-15, rows 0-15 x 16-31,
// rows 16-31 x 0-15, rows 16-31 x 16-31), 4-5 x (rows 0-15, 16-31), 6-7 weight (cols 0-15, 16-31).
// One block of 32 (or 16, `two` false) rows x 32 columns over `steps` steps of 64 features: x's
// packed tiles at `a` (per step 2048 bytes: rows 0-15, then rows 16-31), the
// panel's packed steps at `b`, the accumulators at `c` (rows 32 int32 apart = 128 bytes), loaded
// first unless `first`.
inline void block(const int8_t* a, const int8_t* b, int64_t steps, int32_t* c, bool first, bool two,
                  int32_t* out, int64_t ldo, const int8_t* pf, int64_t pf_lines) {
  // Prefetch pf_lines cache lines at pf into L2 (the next chunk of x, a share per panel), a few per step.
  const int64_t per_step = (pf_lines + steps - 1) / steps;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, 128);
    _tile_loadd(1, c + 16, 128);
    if (two) {
      _tile_loadd(2, c + 16 * 32, 128);
      _tile_loadd(3, c + 16 * 32 + 16, 128);
    }
  }
  if (two) {
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t l = s * per_step; l < std::min(pf_lines, (s + 1) * per_step); ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + l * 64), _MM_HINT_T1);
      }
      _tile_loadd(4, a + s * 2048, 64);
      _tile_loadd(6, b + s * 2048, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_loadd(7, b + s * 2048 + 1024, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_loadd(5, a + s * 2048 + 1024, 64);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, a + s * 2048, 64);
      _tile_loadd(6, b + s * 2048, 64);
      _tile_loadd(7, b + s * 2048 + 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
    }
  }
  if (out != nullptr) {  // the last chunk of a whole block: straight into acc, rows ldo bytes apart
    c = out;
  } else {
    ldo = 128;
  }
  _tile_stored(0, c, ldo);
  _tile_stored(1, c + 16, ldo);
  if (two) {
    _tile_stored(2, reinterpret_cast<int32_t*>(reinterpret_cast<char*>(c) + 16 * ldo), ldo);
    _tile_stored(3, reinterpret_cast<int32_t*>(reinterpret_cast<char*>(c) + 16 * ldo) + 16, ldo);
  }
}

void release() { _tile_release(); }

#pragma GCC pop_options

}  // namespace

bool amx_available() {
  static const bool ok = host_has_amx();
  return ok && cpu_isa() >= Isa::kAvx512;
}

void gemm_amx(const int8_t* xq, int64_t M, int64_t K, const int8_t* packed, int64_t N, int32_t* acc,
              const AmxBlockFn* finish) {
  const int64_t np = (N + kAmxPanel - 1) / kAmxPanel, ks = (K + kAmxStep - 1) / kAmxStep;
  const int64_t kp = ks * kAmxStep, mp = (M + 15) / 16 * 16;
  // x in A tiles: for each 32 rows and step of 64 features, two 1 KB tiles (rows 0-15, 16-31; rows
  // 64 bytes apart), zero-padded, so that a block's chunk of x is one contiguous run that the loop
  // below can prefetch, and no tile's rows fall in the same L1 sets (rows K bytes apart do when K
  // is a multiple of 4096: tiles read that way ran about half as fast in a standalone test).
  const int64_t mp32 = (mp + 31) / 32 * 32;
  // Kept between calls (grown as needed): a fresh buffer costs a page fault per 4 KB.
  static thread_local Aligned<int8_t> tiles;
  int8_t* const tile_data = tiles.at_least(mp32 * kp);  // (a thread_local: OpenMP's threads must not name it)
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < mp; ++m) {
    int8_t* out = tile_data + (m / 32) * 32 * kp + ((m % 32) / 16) * 1024 + (m % 16) * 64;
    for (int64_t s = 0; s < ks; ++s) {
      int8_t* dst = out + s * 2048;
      const int64_t k0 = s * kAmxStep, n = m < M ? std::min<int64_t>(kAmxStep, K - k0) : 0;
      if (n > 0) memcpy(dst, xq + m * K + k0, static_cast<size_t>(n));
      if (n < kAmxStep) memset(dst + n, 0, static_cast<size_t>(kAmxStep - n));
    }
  }
  const int8_t* a = tile_data;
  const int64_t panel_bytes = ks * kAmxPanel * kAmxStep;
  const int64_t block_panels = std::clamp<int64_t>(kBlockBytes / panel_bytes, 1, np);
  const int64_t nblocks = (np + block_panels - 1) / block_panels;
  const int threads = omp_get_max_threads();
  // Rows split too when there are fewer blocks of panels than threads (in multiples of 32 rows).
  const int64_t row_blocks32 = (mp + 31) / 32;
  const int64_t msplit = std::clamp<int64_t>((threads + nblocks - 1) / nblocks, 1, row_blocks32);
  const int64_t rows_per_task = (row_blocks32 + msplit - 1) / msplit * 32;
  const int64_t tasks = nblocks * msplit;
#pragma omp parallel
  {
    amx::configure_16x64();
    Aligned<int32_t> cbuf;
    cbuf.at_least(32 * 32 * block_panels);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t nb = task / msplit, ms = task % msplit;
      const int64_t p0 = nb * block_panels, p1 = std::min(np, p0 + block_panels);
      const int64_t m_begin = ms * rows_per_task, m_end = std::min(mp, m_begin + rows_per_task);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += 32) {
        const bool two = m0 + 16 < mp;
        const int64_t rows = std::min<int64_t>(two ? 32 : 16, M - m0);
        for (int64_t k0 = 0; k0 < kp; k0 += kKc) {
          const int64_t steps = std::min(kKc, kp - k0) / kAmxStep;
          const bool last = k0 + kKc >= kp;
          // x's next chunk (this block's next K chunk, or the next block's first), fetched into L2
          // a share per panel while these panels run; tile loads do not wake the prefetchers.
          const int64_t next_m = last ? m0 + 32 : m0, next_k = last ? 0 : k0 + kKc;
          const bool fetch = next_m < m_end;
          const int64_t next_steps = std::min(kKc, kp - next_k) / kAmxStep;
          const int64_t next_lines = fetch ? next_steps * 32 : 0;
          const int64_t share = (next_lines + (p1 - p0) - 1) / (p1 - p0);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t n0 = p * kAmxPanel;
            const bool whole = finish == nullptr && rows == (two ? 32 : 16) && n0 + kAmxPanel <= N;
            block(a + m0 * kp + (k0 / kAmxStep) * 2048, packed + p * panel_bytes + (k0 / kAmxStep) * 2048,
                  steps, cbuf.data() + (p - p0) * 32 * 32, k0 == 0, two, last && whole ? acc + m0 * N + n0 : nullptr,
                  N * static_cast<int64_t>(sizeof(int32_t)),
                  a + next_m * kp + (next_k / kAmxStep) * 2048 + (p - p0) * share * 64,
                  std::clamp<int64_t>(next_lines - (p - p0) * share, 0, share));
            if (last && !whole) {
              const int64_t cols = std::min<int64_t>(kAmxPanel, N - n0);
              if (finish != nullptr) {
                (*finish)(m0, rows, n0, cols, cbuf.data() + (p - p0) * 32 * 32, 32);
                continue;
              }
              for (int64_t r = 0; r < rows; ++r) {
                memcpy(acc + (m0 + r) * N + n0, cbuf.data() + (p - p0) * 32 * 32 + r * 32, cols * sizeof(int32_t));
              }
            }
          }
        }
      }
    }
    release();
  }
}

#else

bool amx_available() { return false; }

void gemm_amx(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*, const AmxBlockFn*) {}

#endif

}  // namespace lowbit::cpu::int8
