// C++ CPU kernels for bit packing. Threads split the flattened output into contiguous ranges.
#include "bitpack.h"

#include <algorithm>

#include "../common/bitpack.h"

namespace lowbit::cpu {

void pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits) {
  const int per_byte = 8 / bits;
  const int64_t nbytes = packed_length(n, bits);
  const int64_t total = rows * nbytes;
#pragma omp parallel for schedule(static) if (total > (1 << 16))
  for (int64_t i = 0; i < total; ++i) {
    const int64_t row = i / nbytes;
    const int64_t col = (i % nbytes) * per_byte;
    const int count = static_cast<int>(std::min<int64_t>(per_byte, n - col));
    packed[i] = pack_byte(values + row * n + col, count, bits);
  }
}

void unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits) {
  const int per_byte = 8 / bits;
  const int64_t nbytes = packed_length(n, bits);
#pragma omp parallel for schedule(static) if (rows * n > (1 << 16))
  for (int64_t row = 0; row < rows; ++row) {
    const uint8_t* in = packed + row * nbytes;
    uint8_t* out = values + row * n;
    for (int64_t col = 0; col < n; ++col) {
      out[col] = unpack_value(in[col / per_byte], static_cast<int>(col % per_byte), bits);
    }
  }
}

}  // namespace lowbit::cpu
