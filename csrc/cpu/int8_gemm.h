// lowbit's own CPU int8 GEMM: acc[m, n] = sum_k xq[m, k] * w[n, k], exact int32, for hosts where
// no library kernel is both fast and exact (oneDNN on AVX2 without VNNI sums pairs of u8 x s8
// products in saturating int16). The weight is packed once per layer (pack_weight), the product
// runs on the packed form (gemm_avx2). The x86 ISA path is chosen at run time (avx2_available).
#pragma once

#include <stdint.h>

namespace lowbit::cpu::int8 {

// Columns per packed panel and input features per step of the packed layout.
constexpr int64_t kPanel = 16;
constexpr int64_t kPair = 2;

// Bytes of the packed form of an int8 weight [N, K]: ceil(N / 16) panels of ceil(K / 2) steps of
// 16 columns x 2 input features, zero-padded.
int64_t packed_bytes(int64_t N, int64_t K);

// Packs w [N, K] (row-major) into `packed` (packed_bytes(N, K) bytes):
//   packed[((p * steps + s) * 16 + c) * 2 + j] = w[p * 16 + c, s * 2 + j]   (0 outside w)
// so that one 32-byte step holds 16 columns x 2 features; each 16-byte half, widened to int16,
// is the weight operand of one vpmaddwd (8 columns, a pair of features each).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed);

// Whether this CPU runs the AVX2 kernel.
bool avx2_available();

// acc [M, N] (row-major int32) = xq [M, K] @ w^T, w given packed. Exact: every product of two int8
// in [-127, 127] and every pair sum fits int16 x int16 -> int32 (vpmaddwd never saturates), and
// the int32 sum holds up to 2^31 / 127^2 terms. Needs avx2_available(); OpenMP over panels and rows.
void gemm_avx2(const int8_t* xq, int64_t M, int64_t K, const int8_t* packed, int64_t N, int32_t* acc);

}  // namespace lowbit::cpu::int8
