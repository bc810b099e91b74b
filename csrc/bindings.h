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

// ---- int8 (shapes and dtypes of python/lowbit/ops.py's int8 ops) ---------------------------------

inline void check_int8_x(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x must be bfloat16, float16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [rows, in_features], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(1) <= ((int64_t{1} << 31) - 1) / (127 * 127), "in_features ", x.size(1),
              " is too large for int32 accumulation");
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType type, at::IntArrayRef shape,
                         const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", x on ", like.device());
}

inline void check_int8_static_idx(const at::Tensor& static_idx, const at::Tensor& x) {
  TORCH_CHECK_TYPE(static_idx.scalar_type() == at::kInt && static_idx.dim() == 1,
                   "static_idx must be a 1-D int32 tensor");
  TORCH_CHECK(static_idx.device() == x.device(), "static_idx is on ", static_idx.device(), ", x on ", x.device());
  if (static_idx.numel() && static_idx.is_cpu()) {  // on the CPU the range check costs nothing
    const auto range = at::aminmax(static_idx);
    TORCH_CHECK(std::get<0>(range).item<int32_t>() >= 0 && std::get<1>(range).item<int32_t>() < x.size(1),
                "static_idx must hold columns in [0, ", x.size(1), ")");
  }
}

inline void check_int8_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                              const at::Tensor& static_weight, const std::optional<at::Tensor>& bias,
                              int64_t static_count) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [out_features, ", x.size(1), "]");
  const int64_t n = weight.size(0);
  check_tensor(weight, "weight", at::kChar, {n, x.size(1)}, x);
  check_tensor(weight_scale, "weight_scale", at::kFloat, {n}, x);
  check_tensor(static_weight, "static_weight", x.scalar_type(), {n, static_count}, x);
  if (bias.has_value()) check_tensor(*bias, "bias", x.scalar_type(), {n}, x);
}

inline void check_int8_prepass(const at::Tensor& x, const at::Tensor& static_mask, const at::Tensor& static_idx) {
  check_int8_x(x);
  check_tensor(static_mask, "static_mask", at::kByte, {x.size(1)}, x);
  check_int8_static_idx(static_idx, x);
}

// The int8 GEMM's inputs other than xq.
inline void check_int8_epilogue(const at::Tensor& x, const at::Tensor& row_scale, const at::Tensor& col_flags,
                                const at::Tensor& x_static, const at::Tensor& weight, const at::Tensor& weight_scale,
                                const at::Tensor& static_weight, const std::optional<at::Tensor>& bias) {
  check_int8_x(x);
  const int64_t m = x.size(0), k = x.size(1);
  check_tensor(row_scale, "row_scale", at::kFloat, {m}, x);
  check_tensor(col_flags, "col_flags", at::kByte, {k}, x);
  TORCH_CHECK(x_static.dim() == 2 && x_static.size(0) == m, "x_static must be [", m, ", S]");
  check_tensor(x_static, "x_static", x.scalar_type(), {m, x_static.size(1)}, x);
  check_int8_weight(x, weight, weight_scale, static_weight, bias, x_static.size(1));
}

inline void check_int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& static_idx, const at::Tensor& static_weight,
                            const std::optional<at::Tensor>& bias) {
  check_int8_x(x);
  check_int8_static_idx(static_idx, x);
  check_int8_weight(x, weight, weight_scale, static_weight, bias, static_idx.numel());
}

}  // namespace lowbit
