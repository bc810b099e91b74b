// Packing of 1/2/4/8-bit unsigned integers into bytes, shared by the CPU and CUDA kernels.
//
// A byte holds PER_BYTE = 8 / bits values, the value with the lowest index in the lowest bits.
// For bits = 2:
//
//   bit      7 6    5 4    3 2    1 0
//         | v[3] | v[2] | v[1] | v[0] |
//
// A row of n values takes ceil(n * bits / 8) bytes; the unused high slots of its last byte are 0.
// Only the low `bits` bits of each value are stored.
#pragma once

#include <stdint.h>

#include "macros.h"

namespace lowbit {

LOWBIT_HD int64_t packed_length(int64_t n, int bits) {
  const int64_t per_byte = 8 / bits;
  return (n + per_byte - 1) / per_byte;
}

// Packs values[0 .. count) (count <= 8 / bits) into one byte.
LOWBIT_HD uint8_t pack_byte(const uint8_t* values, int count, int bits) {
  const unsigned mask = (1u << bits) - 1u;
  unsigned byte = 0;
  for (int slot = 0; slot < count; ++slot) {
    byte |= (values[slot] & mask) << (slot * bits);
  }
  return static_cast<uint8_t>(byte);
}

// The value in slot `slot` (0 .. 8 / bits) of a packed byte.
LOWBIT_HD uint8_t unpack_value(uint8_t byte, int slot, int bits) {
  const unsigned mask = (1u << bits) - 1u;
  return static_cast<uint8_t>((byte >> (slot * bits)) & mask);
}

}  // namespace lowbit
