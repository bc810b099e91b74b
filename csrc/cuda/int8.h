// Launchers of the CUDA int8 kernels (LLM.int8() decomposition): the activation pre-pass and the
// weight-only small-batch GEMV. Spec: python/lowbit/reference/int8.py; the per-element steps of the
// pre-pass are shared with the CPU kernel in csrc/common/int8.h. Plain CUDA C++: no torch headers,
// so the file compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lowbit::cuda::int8 {

enum class DType { kBFloat16, kFloat16, kFloat32 };

// Rows of x per pass over the weight in gemv; larger batches take several passes.
constexpr int64_t kGemvMaxRows = 16;

// The pre-pass: one read of x [rows, cols] (dtype) gives
//   xq [rows, cols] int8, row_scale [rows] fp32, col_flags [cols] uint8 (1 at the columns holding
//   an outlier element; zeroed by the caller, only ever set here), x_static [rows, statics] (dtype):
//   x_static[m, j] = x[m, static_idx[j]], NaN where static_idx[j] is not in [0, cols).
// static_mask [cols] uint8 (non-zero at the static columns) and static_idx [statics] int32 name the
// static columns. |x| is compared with the threshold in fp32 (the threshold rounded to fp32);
// threshold <= 0 (or NaN) turns the dynamic split off. Device pointers to
// contiguous buffers (16-byte loads and stores when cols and the alignment of x, static_mask and xq
// allow). No host synchronization: the launch can be captured in a CUDA graph.
cudaError_t prepass(DType dtype, const void* x, const uint8_t* static_mask, const int32_t* static_idx, int64_t rows,
                    int64_t cols, int64_t statics, double threshold, int8_t* xq, float* row_scale, uint8_t* col_flags,
                    void* x_static, cudaStream_t stream);

// y [rows, out_features] = (x @ weight^T) * weight_scale + x[:, static_idx] @ static_weight^T + bias,
// fp32 accumulation and one cast to dtype, the dtype of x, static_weight, bias and y.
// x [rows, in_features]; weight int8 [out_features, in_features]; weight_scale fp32 [out_features];
// static_idx int32 [statics] (an index not in [0, in_features) reads as NaN); static_weight
// [out_features, statics]; bias [out_features] or null. Device pointers to contiguous buffers (vector
// loads when in_features % 8 == 0, x is 16-byte and weight 8-byte aligned; a slower element-wise
// path otherwise). The weight is read once per kGemvMaxRows rows of x.
cudaError_t gemv(DType dtype, const void* x, const int8_t* weight, const float* weight_scale,
                 const int32_t* static_idx, const void* static_weight, const void* bias, int64_t rows,
                 int64_t in_features, int64_t out_features, int64_t statics, void* y, cudaStream_t stream);

}  // namespace lowbit::cuda::int8
