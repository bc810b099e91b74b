// Argument checks of the dfloat family's native ops, shared by its CPU and CUDA glue. They follow
// the format's limits (docs/formats.md, "dfloat") and the shape rules of the fakes in
// python/lowbit/ops/dfloat.py.
#pragma once

#include "bindings/common.h"

namespace lowbit {

// Limits of the format, as in python/lowbit/ops/dfloat.py: a GPU thread decodes one window and a
// block's windows share a thread block.
constexpr int64_t kMaxWindowBits = int64_t(1) << 20;
constexpr int64_t kMaxWindowsPerBlock = 1024;

// The dtypes a dfloat stream decodes to, as the messages list them.
constexpr const char* kDfloatDtypes = "bfloat16, float16, float32, uint8";

// Raw bytes per element (docs/formats.md, "dfloat"): the bits besides the 8-bit symbol. 0 for
// uint8, whose symbol is the whole byte. Only for the dtypes above.
inline int64_t dfloat_raw_bytes(at::ScalarType dtype) {
  return dtype == at::kFloat ? 3 : dtype == at::kByte ? 0 : 1;
}

// `what` prefixes the message: kCorrupted for a stored stream, "" for the encoder's arguments.
inline void check_window_shape(int64_t window_bits, int64_t windows_per_block, const char* what = kCorrupted) {
  TORCH_CHECK_VALUE(32 <= window_bits && window_bits <= kMaxWindowBits && window_bits % 32 == 0 &&
                        1 <= windows_per_block && windows_per_block <= kMaxWindowsPerBlock,
                    what, "dfloat stream: window_bits must be a multiple of 32 in [32, ", kMaxWindowBits,
                    "] and windows_per_block in [1, ", kMaxWindowsPerBlock, "], got ", window_bits, " and ",
                    windows_per_block);
}

// Sizes and dtypes of a dfloat stream (docs/formats.md); what the data says is checked by the
// decoders. A stream that breaks the format's rules is corrupted data ("corrupted ...", which lowbit
// raises as FormatError), as in the Python checks.
inline void check_dfloat_stream(const at::Tensor& codes, const at::Tensor& raw, const at::Tensor& gaps,
                                const at::Tensor& block_starts, const at::Tensor& table, int64_t n,
                                at::ScalarType dtype, int64_t total_bits, int64_t window_bits,
                                int64_t windows_per_block) {
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == at::kByte,
                   "dtype must be one of ", kDfloatDtypes, ", got ", dtype_name(dtype));
  const struct { const at::Tensor& t; const char* name; at::ScalarType type; } parts[] = {
      {codes, "codes", at::kByte}, {raw, "raw", at::kByte}, {gaps, "gaps", at::kByte},
      {block_starts, "block_starts", at::kLong}, {table, "table", at::kShort}};
  for (const auto& p : parts) {
    TORCH_CHECK_VALUE(p.t.scalar_type() == p.type && p.t.dim() == 1, kCorrupted, "dfloat stream: ", p.name,
                      " must be a 1-D ", dtype_name(p.type), " tensor, got ", dtype_name(p.t.scalar_type()), " of shape ", p.t.sizes());
    TORCH_CHECK_VALUE(p.t.is_contiguous(), p.name, " must be contiguous");
    TORCH_CHECK_VALUE(p.t.device() == codes.device(), p.name, " is on ", p.t.device(), ", codes on ",
                      codes.device());
  }
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(total_bits >= 0, kCorrupted, "dfloat stream: total_bits must be >= 0, got ", total_bits);
  check_window_shape(window_bits, windows_per_block);
  const int64_t windows = (total_bits + window_bits - 1) / window_bits;
  const int64_t blocks = (windows + windows_per_block - 1) / windows_per_block;
  const struct { const char* name; int64_t got, want; } sizes[] = {
      {"raw", raw.numel(), n * dfloat_raw_bytes(dtype)},
      {"gaps", gaps.numel(), (windows + 1) / 2},
      {"block_starts", block_starts.numel(), blocks + 1},
      {"table", table.numel(), 4096}};
  for (const auto& s : sizes) {
    TORCH_CHECK_VALUE(s.got == s.want, kCorrupted, "dfloat stream: ", s.name, " has ", s.got,
                      " elements, expected ", s.want, " for ", n, " values in ", total_bits, " code bits");
  }
  TORCH_CHECK_VALUE(codes.numel() >= (total_bits + 7) / 8 + 8, kCorrupted, "dfloat stream: codes has ",
                    codes.numel(), " bytes; ", total_bits, " code bits need ", (total_bits + 7) / 8 + 8,
                    " with the padding");
  TORCH_CHECK_VALUE(total_bits >= n && total_bits <= n * 12, kCorrupted, "dfloat stream: total_bits = ",
                    total_bits, " is impossible for ", n, " values");
}

}  // namespace lowbit
