// Argument checks of the codebook family's native ops. They mirror check_weight / check_matmul in
// python/lowbit/ops/codebook.py (TypeError for a dtype, ValueError for a shape), which run first on
// the public wrappers; these keep torch.ops.lowbit.codebook_* safe when called directly. Every
// configuration indexes its codebooks in range by construction: 8-bit codes (uint8) with 2^8
// entries, 16-bit codes (int16, read as unsigned) with 2^16.
#pragma once

#include "bindings/common.h"

#include <optional>

namespace lowbit::codebook_checks {

inline bool is_float_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat; }

// codes [N, G, C], codebooks [C, 2^B, 1, g], scales [N, 1, 1, 1].
inline void check_weight(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  const at::ScalarType ct = codes.scalar_type();
  TORCH_CHECK_TYPE(ct == at::kByte || ct == at::kShort,
                   "codes must be uint8 (8-bit codes) or int16 (16-bit codes), got ", dtype_name(ct));
  TORCH_CHECK_VALUE(codes.dim() == 3, "codes must be 3-D [out_features, in_groups, num_codebooks], got shape ",
                    codes.sizes());
  const int64_t C = codes.size(2), entries = ct == at::kByte ? 256 : 65536;
  TORCH_CHECK_VALUE(C == 1 || C == 2, "codes' last dimension (num_codebooks) must be 1 or 2, got ", C);
  TORCH_CHECK_TYPE(is_float_dtype(codebooks.scalar_type()), "codebooks must be bfloat16, float16 or float32, got ",
                   dtype_name(codebooks.scalar_type()));
  TORCH_CHECK_VALUE(codebooks.dim() == 4, "codebooks must be 4-D [num_codebooks, 2^nbits, out_group_size = 1, "
                    "group_size], got shape ", codebooks.sizes());
  const int64_t g = codebooks.size(3);
  TORCH_CHECK_VALUE(g == 4 || g == 8, "codebooks' group_size (last dimension) must be one of (4, 8), got ", g);
  TORCH_CHECK_VALUE(codebooks.size(2) == 1, "codebooks' out_group_size (dimension 2) must be 1, got ",
                    codebooks.size(2));
  TORCH_CHECK_VALUE(codebooks.size(0) == C && codebooks.size(1) == entries, "codebooks must have shape [", C, ", ",
                    entries, ", 1, ", g, "] for ", dtype_name(ct), " codes of ", C, " codebook(s), got ",
                    codebooks.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(scales.scalar_type()), "scales must be bfloat16, float16 or float32, got ",
                   dtype_name(scales.scalar_type()));
  TORCH_CHECK_VALUE(scales.dim() == 4 && scales.size(0) == codes.size(0) && scales.numel() == codes.size(0),
                    "scales must have shape [", codes.size(0), ", 1, 1, 1] (one per output row of codes), got ",
                    scales.sizes());
  TORCH_CHECK_VALUE(codebooks.device() == codes.device() && scales.device() == codes.device(),
                    "codes, codebooks and scales must be on one device");
}

inline void check_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be bfloat16, float16 or float32, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [rows, in_features], got shape ", x.sizes());
  check_weight(codes, codebooks, scales);
  TORCH_CHECK_VALUE(x.size(1) == codes.size(1) * codebooks.size(3), "x's last dimension must be in_groups * "
                    "group_size = ", codes.size(1) * codebooks.size(3), ", got ", x.size(1));
  TORCH_CHECK_VALUE(x.device() == codes.device(), "x is on ", x.device(), ", codes on ", codes.device());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must be ", dtype_name(x.scalar_type()),
                     " (x's dtype), got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == codes.size(0), "bias must have shape [", codes.size(0),
                      "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), ", x on ", x.device());
  }
}

}  // namespace lowbit::codebook_checks
