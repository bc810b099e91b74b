// CUDA kernels for bit packing: one thread per packed byte, on a 2-D grid (y: rows, x: a row's
// bytes) so that the index math inside a row is 32-bit, and each thread moves its 8 / bits values
// with one vector load or store where the row allows it (n a multiple of 8 / bits and the values
// aligned to it); the last, partial byte of a row and unaligned rows go value by value.
#include "bitpack.h"

#include <string.h>

#include "../common/bitpack.h"

namespace lowbit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// The unsigned type of N bytes (one byte to eight).
template <int N>
struct Word;
template <>
struct Word<1> { using T = uint8_t; };
template <>
struct Word<2> { using T = uint16_t; };
template <>
struct Word<4> { using T = uint32_t; };
template <>
struct Word<8> { using T = uint64_t; };

template <int BITS>
__global__ void pack_bits_kernel(const uint8_t* __restrict__ values, uint8_t* __restrict__ packed, int64_t rows,
                                 int n, int nbytes, bool whole_words) {
  constexpr int kPerByte = 8 / BITS;
  using W = typename Word<kPerByte>::T;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const uint8_t* in = values + row * n;
    uint8_t* out = packed + row * nbytes;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nbytes; i += gridDim.x * blockDim.x) {
      const int col = i * kPerByte;
      if (whole_words) {
        const W word = *reinterpret_cast<const W*>(in + col);
        uint8_t v[kPerByte];
        memcpy(v, &word, kPerByte);
        out[i] = pack_byte(v, kPerByte, BITS);
      } else {
        const int left = n - col;
        out[i] = pack_byte(in + col, left < kPerByte ? left : kPerByte, BITS);
      }
    }
  }
}

template <int BITS>
__global__ void unpack_bits_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ values, int64_t rows,
                                   int n, int nbytes, bool whole_words) {
  constexpr int kPerByte = 8 / BITS;
  using W = typename Word<kPerByte>::T;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const uint8_t* in = packed + row * nbytes;
    uint8_t* out = values + row * n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nbytes; i += gridDim.x * blockDim.x) {
      const uint8_t byte = in[i];
      const int col = i * kPerByte;
      uint8_t v[kPerByte];
#pragma unroll
      for (int slot = 0; slot < kPerByte; ++slot) v[slot] = unpack_value(byte, slot, BITS);
      if (whole_words) {
        W word;
        memcpy(&word, v, kPerByte);
        *reinterpret_cast<W*>(out + col) = word;
      } else {
        const int left = n - col;
        for (int slot = 0; slot < kPerByte && slot < left; ++slot) out[col + slot] = v[slot];
      }
    }
  }
}

dim3 grid_for(int64_t rows, int64_t nbytes) {
  const int64_t x = (nbytes + kThreads - 1) / kThreads;
  const int64_t y = rows < kMaxGridY ? rows : kMaxGridY;
  // Enough CTAs in all (rows x row chunks) without a huge grid: a thread may take several bytes.
  const int64_t x_cap = y >= 1024 ? 1 : (4096 + y - 1) / y;
  return dim3(static_cast<unsigned>(x < x_cap ? x : x_cap), static_cast<unsigned>(y));
}

// Whether every row's values lie in whole, aligned words of 8 / bits bytes.
bool whole_words(const uint8_t* values, int64_t n, int per_byte) {
  return n % per_byte == 0 && reinterpret_cast<uintptr_t>(values) % per_byte == 0;
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
    if (rows == 0 || nbytes == 0) return cudaSuccess;
    if (n > INT32_MAX - 8) return cudaErrorInvalidValue;  // a row's index math is 32-bit
    pack_bits_kernel<BITS><<<grid_for(rows, nbytes), kThreads, 0, stream>>>(
        values, packed, rows, static_cast<int>(n), static_cast<int>(nbytes), whole_words(values, n, 8 / BITS));
    return cudaGetLastError();
  }
};

template <int BITS>
struct LaunchUnpack {
  static cudaError_t run(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n,
                         cudaStream_t stream) {
    const int64_t nbytes = packed_length(n, BITS);
    if (rows == 0 || nbytes == 0) return cudaSuccess;
    if (n > INT32_MAX - 8) return cudaErrorInvalidValue;
    unpack_bits_kernel<BITS><<<grid_for(rows, nbytes), kThreads, 0, stream>>>(
        packed, values, rows, static_cast<int>(n), static_cast<int>(nbytes), whole_words(values, n, 8 / BITS));
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
