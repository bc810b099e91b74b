// C++ CPU kernels for bit packing. Threads split the rows (or, for few rows, the bytes of a row);
// the width is a template argument so the per-byte loops unroll and vectorize.
#include "bitpack.h"

#include <algorithm>

#include "../common/bitpack.h"

namespace lowbit::cpu {
namespace {

// Whole bytes of one row segment [byte_begin, byte_end), the last byte possibly partial.
template <int BITS>
void pack_segment(const uint8_t* row_values, uint8_t* row_packed, int64_t n, int64_t byte_begin,
                  int64_t byte_end) {
  constexpr int kPerByte = 8 / BITS;
  const int64_t full = std::min(byte_end, n / kPerByte);
  for (int64_t b = byte_begin; b < full; ++b) {
    row_packed[b] = pack_byte(row_values + b * kPerByte, kPerByte, BITS);
  }
  for (int64_t b = std::max(full, byte_begin); b < byte_end; ++b) {
    row_packed[b] = pack_byte(row_values + b * kPerByte, static_cast<int>(n - b * kPerByte), BITS);
  }
}

template <int BITS>
void unpack_segment(const uint8_t* row_packed, uint8_t* row_values, int64_t n, int64_t byte_begin,
                    int64_t byte_end) {
  constexpr int kPerByte = 8 / BITS;
  const int64_t full = std::min(byte_end, n / kPerByte);
  for (int64_t b = byte_begin; b < full; ++b) {
    for (int slot = 0; slot < kPerByte; ++slot) {
      row_values[b * kPerByte + slot] = unpack_value(row_packed[b], slot, BITS);
    }
  }
  for (int64_t b = std::max(full, byte_begin); b < byte_end; ++b) {
    for (int64_t col = b * kPerByte; col < n; ++col) {
      row_values[col] = unpack_value(row_packed[b], static_cast<int>(col - b * kPerByte), BITS);
    }
  }
}

constexpr int64_t kBytesPerTask = 1 << 14;

// Runs segment(row, byte_begin, byte_end) over every row in tasks of about kBytesPerTask bytes.
template <typename Segment>
void for_each_segment(int64_t rows, int64_t nbytes, Segment segment) {
  if (rows == 0 || nbytes == 0) return;
  const int64_t per_row = (nbytes + kBytesPerTask - 1) / kBytesPerTask;
  const int64_t tasks = rows * per_row;
#pragma omp parallel for schedule(static) if (rows * nbytes > (1 << 16))
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row = task / per_row;
    const int64_t begin = (task % per_row) * kBytesPerTask;
    segment(row, begin, std::min(nbytes, begin + kBytesPerTask));
  }
}

template <int BITS>
void pack_rows(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n) {
  const int64_t nbytes = packed_length(n, BITS);
  for_each_segment(rows, nbytes, [&](int64_t row, int64_t begin, int64_t end) {
    pack_segment<BITS>(values + row * n, packed + row * nbytes, n, begin, end);
  });
}

template <int BITS>
void unpack_rows(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n) {
  const int64_t nbytes = packed_length(n, BITS);
  for_each_segment(rows, nbytes, [&](int64_t row, int64_t begin, int64_t end) {
    unpack_segment<BITS>(packed + row * nbytes, values + row * n, n, begin, end);
  });
}

}  // namespace

void pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits) {
  switch (bits) {
    case 1: return pack_rows<1>(values, packed, rows, n);
    case 2: return pack_rows<2>(values, packed, rows, n);
    case 4: return pack_rows<4>(values, packed, rows, n);
    case 8: return pack_rows<8>(values, packed, rows, n);
  }
}

void unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits) {
  switch (bits) {
    case 1: return unpack_rows<1>(packed, values, rows, n);
    case 2: return unpack_rows<2>(packed, values, rows, n);
    case 4: return unpack_rows<4>(packed, values, rows, n);
    case 8: return unpack_rows<8>(packed, values, rows, n);
  }
}

}  // namespace lowbit::cpu
