// CUDA kernels for bit packing. One thread per output element, grid-stride loop.
#include "bitpack.h"

#include "../common/bitpack.h"

namespace lowbit::cuda {
namespace {

constexpr int kThreads = 256;

// Thread i owns output byte i: it reads the PER_BYTE values behind it (coalesced per warp).
template <int BITS>
__global__ void pack_bits_kernel(const uint8_t* __restrict__ values, uint8_t* __restrict__ packed,
                                 int64_t total, int64_t n, int64_t nbytes) {
  constexpr int kPerByte = 8 / BITS;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / nbytes;
    const int64_t col = (i % nbytes) * kPerByte;
    const int64_t left = n - col;
    const int count = left < kPerByte ? static_cast<int>(left) : kPerByte;
    packed[i] = pack_byte(values + row * n + col, count, BITS);
  }
}

// Thread i owns output value i; neighbouring threads read the same packed byte.
template <int BITS>
__global__ void unpack_bits_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ values,
                                   int64_t total, int64_t n, int64_t nbytes) {
  constexpr int kPerByte = 8 / BITS;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / n;
    const int64_t col = i % n;
    values[i] = unpack_value(packed[row * nbytes + col / kPerByte], static_cast<int>(col % kPerByte), BITS);
  }
}

int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

template <template <int> class Launch, typename... Args>
cudaError_t dispatch_bits(int bits, Args... args) {
  switch (bits) {
    case 1: return Launch<1>::run(args...);
    case 2: return Launch<2>::run(args...);
    case 4: return Launch<4>::run(args...);
    case 8: return Launch<8>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

template <int BITS>
struct LaunchPack {
  static cudaError_t run(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n,
                         cudaStream_t stream) {
    const int64_t nbytes = packed_length(n, BITS);
    const int64_t total = rows * nbytes;
    if (total == 0) return cudaSuccess;
    pack_bits_kernel<BITS><<<blocks_for(total), kThreads, 0, stream>>>(values, packed, total, n, nbytes);
    return cudaGetLastError();
  }
};

template <int BITS>
struct LaunchUnpack {
  static cudaError_t run(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n,
                         cudaStream_t stream) {
    const int64_t total = rows * n;
    if (total == 0) return cudaSuccess;
    unpack_bits_kernel<BITS><<<blocks_for(total), kThreads, 0, stream>>>(
        packed, values, total, n, packed_length(n, BITS));
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits,
                      cudaStream_t stream) {
  return dispatch_bits<LaunchPack>(bits, values, packed, rows, n, stream);
}

cudaError_t unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits,
                        cudaStream_t stream) {
  return dispatch_bits<LaunchUnpack>(bits, packed, values, rows, n, stream);
}

}  // namespace lowbit::cuda
