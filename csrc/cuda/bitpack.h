// Launchers of the CUDA bit-packing kernels (layout: csrc/common/bitpack.h).
// Plain CUDA C++: no torch headers, so the file compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lowbit::cuda {

// values: [rows, n] -> packed: [rows, packed_length(n, bits)], device pointers, contiguous. Rows of
// up to 2^31 - 9 values (cudaErrorInvalidValue above: a row's index math is 32-bit); bits 1, 2, 4, 8.
cudaError_t pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits,
                      cudaStream_t stream);

// packed: [rows, packed_length(n, bits)] -> values: [rows, n], device pointers, contiguous.
cudaError_t unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits,
                        cudaStream_t stream);

}  // namespace lowbit::cuda
