// Argument checks shared by the torch glue of every device (bindings.cpp, bindings_cuda.cpp).
// The Python router checks the same things first; these keep the native ops safe when called
// directly through torch.ops.lowbit._*_native.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/bitpack.h"

namespace lowbit {

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8,
              "bits must be one of 1, 2, 4, 8, got ", bits);
}

inline void check_uint8(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got a 0-dim tensor");
}

// Rows of the last dimension.
inline int64_t leading_rows(const at::Tensor& t) {
  return t.numel() == 0 ? 0 : t.numel() / t.size(-1);
}

inline std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t n) {
  check_bits(bits);
  check_uint8(packed, "packed");
  TORCH_CHECK(n >= 0, "n must be >= 0, got ", n);
  const int64_t expected = packed_length(n, static_cast<int>(bits));
  TORCH_CHECK(packed.size(-1) == expected, "packed has ", packed.size(-1),
              " bytes in its last dimension; ", n, " values of ", bits, " bits take ", expected);
}

// Sizes and dtypes of a dfloat stream (docs/formats.md); what the data says is checked by the decoders.
inline void check_dfloat_stream(const at::Tensor& codes, const at::Tensor& raw, const at::Tensor& gaps,
                                const at::Tensor& block_starts, const at::Tensor& table, int64_t n,
                                at::ScalarType dtype, int64_t total_bits, int64_t window_bits,
                                int64_t windows_per_block) {
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "dtype must be bfloat16, float16 or float32, got ", dtype);
  const struct { const at::Tensor& t; const char* name; at::ScalarType type; } parts[] = {
      {codes, "codes", at::kByte}, {raw, "raw", at::kByte}, {gaps, "gaps", at::kByte},
      {block_starts, "block_starts", at::kLong}, {table, "table", at::kShort}};
  for (const auto& p : parts) {
    TORCH_CHECK(p.t.scalar_type() == p.type && p.t.dim() == 1 && p.t.is_contiguous(), p.name,
                " must be a contiguous 1-D ", p.type, " tensor");
    TORCH_CHECK(p.t.device() == codes.device(), p.name, " is on ", p.t.device(), ", codes on ", codes.device());
  }
  TORCH_CHECK(n >= 0 && total_bits >= 0, "n and total_bits must be >= 0");
  TORCH_CHECK(window_bits >= 32 && window_bits % 32 == 0 && windows_per_block >= 1,
              "window_bits must be a positive multiple of 32 and windows_per_block >= 1");
  const int64_t windows = (total_bits + window_bits - 1) / window_bits;
  const int64_t blocks = (windows + windows_per_block - 1) / windows_per_block;
  TORCH_CHECK(raw.numel() == n * (dtype == at::kFloat ? 3 : 1), "raw has ", raw.numel(), " bytes for ", n, " values");
  TORCH_CHECK(gaps.numel() == (windows + 1) / 2, "gaps has ", gaps.numel(), " bytes for ", windows, " windows");
  TORCH_CHECK(block_starts.numel() == blocks + 1, "block_starts has ", block_starts.numel(), " entries for ",
              blocks, " blocks");
  TORCH_CHECK(table.numel() == 4096, "table must have 4096 entries");
  TORCH_CHECK(codes.numel() >= (total_bits + 7) / 8 + 8, "codes is shorter than total_bits and its padding");
  TORCH_CHECK(total_bits >= n && total_bits <= n * 12, "total_bits = ", total_bits, " is impossible for ", n,
              " values");
}

}  // namespace lowbit
