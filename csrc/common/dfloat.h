// The dfloat decode step, shared by the C++ CPU decoder and the CUDA kernels.
// Format: docs/formats.md ("dfloat") and python/lowbit/reference/dfloat.py (the spec).
//
// Code stream, least-significant bit first:
//
//   byte:      |     byte 0      |     byte 1      | ...
//   bit:        0 1 2 3 4 5 6 7   8 9 ...
//   stream:    [code 0 ][code 1    ][code 2] ...     a code's first bit is its canonical MSB
//
// A decoder peeks kMaxCodeLen bits at its position and looks them up in the decode table, whose
// entry is symbol | length << 8 (length 0: the bits start no code, the stream is corrupt).
#pragma once

#include <stdint.h>

#include "macros.h"

namespace lowbit::dfloat {

constexpr int kMaxCodeLen = 12;
constexpr int kTableSize = 1 << kMaxCodeLen;
constexpr uint32_t kPeekMask = kTableSize - 1;

// kMaxCodeLen stream bits from bit `pos`; reads bytes pos/8 .. pos/8 + 2 (the stream is padded).
LOWBIT_HD uint32_t peek(const uint8_t* codes, int64_t pos) {
  const uint8_t* p = codes + (pos >> 3);
  const uint32_t word = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
  return (word >> (pos & 7)) & kPeekMask;
}

LOWBIT_HD uint32_t entry_symbol(uint16_t entry) { return entry & 0xFFu; }
LOWBIT_HD uint32_t entry_length(uint16_t entry) { return entry >> 8; }

// Gap of window `window` from the 4-bit packed gaps (low nibble first, as lowbit::pack_bits).
LOWBIT_HD uint32_t gap_of(const uint8_t* gaps, int64_t window) {
  return (gaps[window >> 1] >> ((window & 1) * 4)) & 0xFu;
}

// bf16 / fp16 bits from symbol (bits 14..7) and raw byte (bit 15, bits 6..0).
LOWBIT_HD uint16_t merge16(uint32_t symbol, uint32_t raw) {
  return static_cast<uint16_t>(((raw & 0x80u) << 8) | (symbol << 7) | (raw & 0x7Fu));
}

// fp32 bits from symbol (bits 30..23) and 3 raw bytes, little-endian (bit 31, bits 22..0).
LOWBIT_HD uint32_t merge32(uint32_t symbol, const uint8_t* raw3) {
  const uint32_t raw = uint32_t(raw3[0]) | (uint32_t(raw3[1]) << 8) | (uint32_t(raw3[2]) << 16);
  return ((raw & 0x800000u) << 8) | (symbol << 23) | (raw & 0x7FFFFFu);
}

}  // namespace lowbit::dfloat
