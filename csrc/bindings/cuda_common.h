// Torch glue shared by every family's CUDA bindings (csrc/bindings/*_cuda.cpp).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <stdint.h>

#include "bindings/common.h"

namespace lowbit {

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The kernels read some inputs as 16-byte vectors. Fresh allocations are aligned; a view at an odd
// offset into its storage is copied.
inline at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

}  // namespace lowbit
