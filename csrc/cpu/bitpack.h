// C++ CPU kernels for bit packing (layout: csrc/common/bitpack.h). Contiguous row-major buffers.
#pragma once

#include <stdint.h>

namespace lowbit::cpu {

// values: [rows, n] -> packed: [rows, packed_length(n, bits)]
void pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits);

// packed: [rows, packed_length(n, bits)] -> values: [rows, n]
void unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits);

}  // namespace lowbit::cpu
