// C++ CPU kernels of the int8 family (LLM.int8() decomposition). The spec is
// python/lowbit/reference/int8.py. Contiguous row-major buffers; T is float, c10::BFloat16 or c10::Half.
#pragma once

#include <stdint.h>

namespace lowbit::cpu::int8 {

// The activation pre-pass. x [M, K] -> xq int8 [M, K], row_scale [M], col_flags [K] (overwritten),
// x_static [M, S] = x[:, static_idx].
template <typename T>
void prepass(const T* x, int64_t M, int64_t K, const uint8_t* static_mask, const int32_t* static_idx, int64_t S,
             float threshold, int8_t* xq, float* row_scale, uint8_t* col_flags, T* x_static);

// A side product sum_j x[m, j] * w_t[j, n] over a few input columns: x [M, cols], w_t [cols, N].
struct Side {
  const float* x;
  const float* w_t;
  int64_t cols;
};

// The GEMM's epilogue: y[m, n] = acc[m, n] * row_scale[m] * weight_scale[n]
// + dyn[m, n] * weight_scale[n] + stat[m, n] + bias[n], rounded once to T. bias may be null.
// Acc is int32_t or float (the accumulator's exact fp32 image).
template <typename Acc, typename T>
void epilogue(const Acc* acc, int64_t M, int64_t N, const float* row_scale, const float* weight_scale, Side dyn,
              Side stat, const T* bias, T* y);

// The epilogue above for one block of the accumulator: rows m0..m0+rows-1, columns n0..n0+cols-1
// (cols <= 32), row r of the block at c + r * ldc; bias as fp32, never null (zeros when absent).
// Gives the bits epilogue gives.
template <typename T>
void epilogue_block(const int32_t* c, int64_t ldc, int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N,
                    const float* row_scale, const float* weight_scale, Side dyn, Side stat, const float* bias, T* y);

// Weight-only product: y[m, n] = weight_scale[n] * sum_k x[m, k] weight[n, k] (+ extra[m, n])
// (+ bias[n]), fp32 accumulation. extra and bias may be null.
template <typename T>
void gemv(const T* x, int64_t M, int64_t K, const int8_t* weight, int64_t N, const float* weight_scale,
          const float* extra, const T* bias, T* y);

}  // namespace lowbit::cpu::int8
