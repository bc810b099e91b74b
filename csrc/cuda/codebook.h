// Launcher of the CUDA codebook kernels (additive vector quantization in AQLM's layout): the
// product y = x W^T + bias straight from the codes. Spec: python/lowbit/reference/codebook.py;
// format: docs/formats.md ("codebook"). Plain CUDA C++: no torch headers, so the file compiles with
// nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lowbit::cuda::codebook {

enum class DType { kBFloat16, kFloat16, kFloat32 };

// Rows of x up to which matmul takes the GEMV (codewords looked up straight into tensor-core
// operands, x read from global memory, one pass over the codes); more rows take the tiled GEMM.
constexpr int64_t kGemvMaxRows = 16;

// One layer's stored form, device pointers to contiguous buffers:
//   W[n, j * g + t] = scales[n] * sum_c codebooks[c, code(n, j, c), 0, t]
// with code(n, j, c) = codes[n, j, c] (uint8 for nbits 8; int16 read as uint16 for nbits 16).
struct Weight {
  const void* codes;      // [out_features, in_groups, num_codebooks]: uint8 or int16
  const void* codebooks;  // [num_codebooks, 2^nbits, 1, group_size] of codebook_dtype, 16-byte aligned
  const void* scales;     // [out_features] of scale_dtype
  int64_t out_features;
  int64_t in_groups;
  int num_codebooks;  // 1 or 2
  int nbits;          // 8 or 16
  int group_size;     // 4 or 8
  DType codebook_dtype;
  DType scale_dtype;
};

// y [rows, out_features] = x [rows, in_groups * group_size] W^T + bias, in dtype (that of x, bias
// and y), every product and sum in fp32 (tensor cores with fp32 accumulation on operands that
// hold x and the codewords exactly: split into 2 or 3 bf16 terms where their dtypes differ), one
// rounding to dtype at the end. x 16-byte aligned; bias [out_features] or null; codes of any
// alignment (8-byte vector loads where every row allows them). No host synchronization: the
// launches can be captured in a CUDA graph. Returns cudaErrorInvalidValue for a configuration
// without kernels and cudaErrorMisalignedAddress for x or codebooks not 16-byte aligned.
cudaError_t matmul(DType dtype, const void* x, int64_t rows, const Weight& w, const void* bias, void* y,
                   cudaStream_t stream);

}  // namespace lowbit::cuda::codebook
