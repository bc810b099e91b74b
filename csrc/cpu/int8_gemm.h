// lowbit's own CPU int8 GEMM: acc[m, n] = sum_k xq[m, k] * w[n, k], exact int32, for hosts where
// no library kernel is both fast and exact (oneDNN on AVX2 without VNNI sums pairs of u8 x s8
// products in saturating int16). The x86 ISA path is chosen at run time (avx2_available).
#pragma once

#include <stdint.h>

#include <functional>

namespace lowbit::cpu::int8 {

// Columns per packed panel and input features per step of the packed layout.
constexpr int64_t kPanel = 16;
constexpr int64_t kPair = 2;

// The panel layout the kernel reads: a panel is 16 weight rows (output columns), and a step of it
// holds those 16 columns x 2 input features (32 bytes),
//   panel[(s * 16 + c) * 2 + j] = w[p * 16 + c, s * 2 + j]   (0 outside w)
// so that each 16-byte half, widened to int16, is the weight operand of one vpmaddwd (8 columns,
// a pair of features each). The weight stays row-major in memory (its stored form): each call
// packs a block of a panel into a small buffer (a 16 x 16 transpose of int16 pairs per 16 steps)
// just before the tiles that use it, so no second copy of the weight is kept.

// Whether the AVX2 kernels run: cpu_isa() (isa.h) is AVX2 or wider.
bool avx2_available();

// acc [M, N] (row-major int32) = xq [M, K] @ w [N, K]^T (both row-major). Exact: every product of two int8
// in [-127, 127] and every pair sum fits int16 x int16 -> int32 (vpmaddwd never saturates), and
// the int32 sum holds up to 2^31 / 127^2 terms. Needs avx2_available(); OpenMP over panels and rows.
void gemm_avx2(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc);

// The weight-only product's sums: out [M, N] (fp32) = x [M, K] (fp32) @ w [N, K]^T (int8), both
// row-major, w read as it is stored. Each sum runs over 8 lanes of k (k = 8i + lane), then adds the
// lanes and the last K % 8 terms. Needs avx2_available() (and FMA); OpenMP over output columns.
void dots_avx2(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, float* out);

// ---- AMX (int8_amx.cpp) ----
// The packed weight of the AMX GEMM: panels of kAmxPanel output columns; each step of kAmxStep
// input features holds two 16 x 64-byte B tiles (the panel's columns 0-15, then 16-31), a tile row
// r holding features 4r..4r+3 of its 16 columns:
//   packed[((p * steps + s) * 2 + t) * 1024 + r * 64 + c * 4 + j] = w[p * 32 + t * 16 + c, s * 64 + 4 * r + j]
// (0 outside w), steps = ceil(K / 64): amx_packed_bytes(N, K) bytes in all.
constexpr int64_t kAmxPanel = 32;
constexpr int64_t kAmxStep = 64;
int64_t amx_packed_bytes(int64_t N, int64_t K);
void amx_pack(const int8_t* w, int64_t N, int64_t K, int8_t* packed);

// Whether the AMX GEMM runs: the CPU has AMX-TILE and AMX-INT8, Linux grants this process the tile
// state, and cpu_isa() is AVX-512 (LOWBIT_CPU_ISA=avx2 turns it off with the rest).
bool amx_available();

// acc [M, N] (row-major int32) = xq [M, K] @ w [N, K]^T, w given as amx_pack made it. Exact (int8 x
// int8 products summed in int32). Needs amx_available(); OpenMP over blocks of panels and rows.
// With `finish`, acc is not written (it may be null): each finished block of at most 32 rows x 32
// columns goes to finish(m0, rows, n0, cols, c, ldc) instead (row r of the block at c + r * ldc),
// called on the thread that made it, so the epilogue runs while the block is in L1.
using AmxBlockFn = std::function<void(int64_t m0, int64_t rows, int64_t n0, int64_t cols, const int32_t* c,
                                      int64_t ldc)>;
void gemm_amx(const int8_t* xq, int64_t M, int64_t K, const int8_t* packed, int64_t N, int32_t* acc,
              const AmxBlockFn* finish = nullptr);

}  // namespace lowbit::cpu::int8
