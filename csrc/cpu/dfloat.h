// C++ CPU encoder and decoder of the dfloat format (docs/formats.md, "dfloat";
// spec: python/lowbit/reference/dfloat.py). Contiguous buffers; Bits is uint8_t (uint8: the symbol
// is the byte, no raw bits), uint16_t (bf16, fp16) or uint32_t (fp32).
#pragma once

#include <stdint.h>

namespace lowbit::cpu::dfloat {

// counts[256] = how often each symbol occurs among x[0 .. n).
template <typename Bits>
void histogram(const Bits* x, int64_t n, int64_t* counts);

struct Stream {
  uint8_t* codes;          // [>= ceil(total_bits / 8) + 8], zero-filled by the caller
  uint8_t* raw;            // [n * raw_bytes]; unused (may be null) for uint8, whose raw_bytes is 0
  uint8_t* gaps;           // [windows], one gap per byte (the caller packs them to 4 bits)
  int64_t* block_starts;   // [blocks + 1]
  int64_t total_bits;
  int64_t window_bits;
  int64_t windows_per_block;
};

// Encodes x[0 .. n) with the code `codewords[s]` (already bit-reversed, LSB first) of
// `lengths[s]` bits for symbol s. Returns nullptr, or what is wrong (a symbol without a code, or
// total_bits other than the sum of the lengths) before writing anything.
template <typename Bits>
const char* encode(const Bits* x, int64_t n, const uint8_t* lengths, const uint32_t* codewords, Stream out);

// Decodes into out[0 .. n). Returns nullptr on success, else a description of the corruption
// found; it never reads outside the given buffers (codes_bytes bytes of codes).
template <typename Bits>
const char* decode(const uint8_t* codes, int64_t codes_bytes, const uint8_t* raw, const uint8_t* gaps,
                   const int64_t* block_starts, const int16_t* table, int64_t n, int64_t total_bits,
                   int64_t window_bits, int64_t windows_per_block, Bits* out);

}  // namespace lowbit::cpu::dfloat
