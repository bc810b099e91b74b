// Argument checks of the int8 family's native ops, shared by the torch glue of every device (csrc/bindings/int8.cpp, int8_cuda.cpp). They
// mirror the Python checks in lowbit/ops/int8.py (the same exception types: TypeError for a dtype,
// ValueError for a shape), which run first on the public ops; these keep the private
// torch.ops.lowbit._int8_*_native ops safe when they are called directly.
#pragma once

#include "bindings/common.h"

#include <optional>
#include <string>

namespace lowbit::int8_checks {

// The int32 accumulator of the GEMM holds any sum of in_features products of two int8 in [-127, 127].
constexpr int64_t kMaxInFeatures = int64_t(2147483647) / (127 * 127);

inline void check_x(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "x must be bfloat16, float16 or float32, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [rows, in_features], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= kMaxInFeatures, "in_features must be at most ", kMaxInFeatures,
                    " (int32 accumulation), got ", x.size(1));
}

inline void check_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), ", x on ", x.device());
}

// On the CPU the columns are range-checked too (the CPU kernels index x with them; on a GPU the
// check would cost a host synchronization, and the CUDA kernels write NaN for a column out of range).
inline void check_static_idx(const at::Tensor& static_idx, const at::Tensor& x) {
  TORCH_CHECK_TYPE(static_idx.scalar_type() == at::kInt && static_idx.dim() == 1,
                   "static_idx must be a 1-D int32 tensor, got ", dtype_name(static_idx.scalar_type()), " of shape ",
                   static_idx.sizes());
  if (static_idx.numel() && static_idx.is_cpu()) {
    const auto [low, high] = at::aminmax(static_idx);
    TORCH_CHECK_VALUE(low.item<int32_t>() >= 0 && high.item<int32_t>() < x.size(1),
                      "static_idx must hold columns in [0, ", x.size(1), ")");
  }
}

// int8_prepass(x, static_mask, static_idx, threshold).
inline void check_prepass(const at::Tensor& x, const at::Tensor& static_mask, const at::Tensor& static_idx) {
  check_x(x);
  check_tensor("static_mask", static_mask, at::kByte, {x.size(1)});
  check_static_idx(static_idx, x);
  check_device("static_mask", static_mask, x);
  check_device("static_idx", static_idx, x);
}

// The layer's tensors, for an x of in_features columns and static_count static columns.
inline void check_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                         const at::Tensor& static_weight, int64_t static_count, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.size(1) == x.size(1),
                    "weight must be int8 [out_features, ", x.size(1), "], got ", dtype_name(weight.scalar_type()),
                    " of shape ", weight.sizes());
  const int64_t out_features = weight.size(0);
  check_tensor("weight_scale", weight_scale, at::kFloat, {out_features});
  check_tensor("static_weight", static_weight, x.scalar_type(), {out_features, static_count});
  check_device("weight", weight, x);
  check_device("weight_scale", weight_scale, x);
  check_device("static_weight", static_weight, x);
  if (bias.has_value() && bias->defined()) {
    check_tensor("bias", *bias, x.scalar_type(), {out_features});
    check_device("bias", *bias, x);
  }
}

// int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias).
inline void check_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const at::Tensor& static_idx, const at::Tensor& static_weight,
                       const std::optional<at::Tensor>& bias) {
  check_x(x);
  check_static_idx(static_idx, x);
  check_device("static_idx", static_idx, x);
  check_weight(x, weight, weight_scale, static_weight, static_idx.size(0), bias);
}

// int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold).
inline void check_matmul(const at::Tensor& x, const at::Tensor& xq, const at::Tensor& row_scale,
                         const at::Tensor& col_flags, const at::Tensor& x_static, const at::Tensor& weight,
                         const at::Tensor& weight_scale, const at::Tensor& static_weight,
                         const std::optional<at::Tensor>& bias) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1);
  check_tensor("xq", xq, at::kChar, {M, K});
  check_tensor("row_scale", row_scale, at::kFloat, {M});
  check_tensor("col_flags", col_flags, at::kByte, {K});
  TORCH_CHECK_VALUE(x_static.scalar_type() == x.scalar_type() && x_static.dim() == 2 && x_static.size(0) == M,
                    "x_static must be ", dtype_name(x.scalar_type()), " [", M, ", S], got ", dtype_name(x_static.scalar_type()), " of shape ",
                    x_static.sizes());
  check_weight(x, weight, weight_scale, static_weight, x_static.size(1), bias);
  for (const at::Tensor* t : {&xq, &row_scale, &col_flags, &x_static}) check_device("the pre-pass outputs", *t, x);
}

// The CPU GEMM's epilogue (csrc/bindings/int8.cpp, int8_epilogue_cpu).
inline void check_epilogue(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& dyn_x, const std::optional<at::Tensor>& dyn_w,
                           const at::Tensor& x_static, const at::Tensor& static_weight,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat,
                   "acc must be int32 or float32, got ", dtype_name(acc.scalar_type()));
  TORCH_CHECK_VALUE(acc.dim() == 2, "acc must be 2-D [rows, out_features], got shape ", acc.sizes());
  const int64_t rows = acc.size(0), out_features = acc.size(1);
  const at::ScalarType dtype = x_static.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "x_static must be bfloat16, float16 or float32 (x's dtype), got ", dtype);
  TORCH_CHECK_VALUE(x_static.dim() == 2, "x_static must be 2-D [rows, S], got shape ", x_static.sizes());
  check_tensor("row_scale", row_scale, at::kFloat, {rows});
  check_tensor("weight_scale", weight_scale, at::kFloat, {out_features});
  check_tensor("x_static", x_static, x_static.scalar_type(), {rows, x_static.size(1)});
  check_tensor("static_weight", static_weight, x_static.scalar_type(), {out_features, x_static.size(1)});
  if (bias.has_value()) check_tensor("bias", *bias, x_static.scalar_type(), {out_features});
  TORCH_CHECK_VALUE(dyn_x.has_value() == dyn_w.has_value(), "dyn_x and dyn_w come together");
  if (dyn_x.has_value()) {
    TORCH_CHECK_VALUE(dyn_x->dim() == 2, "dyn_x must be 2-D [rows, D], got shape ", dyn_x->sizes());
    check_tensor("dyn_x", *dyn_x, at::kFloat, {rows, dyn_x->size(1)});
    check_tensor("dyn_w", *dyn_w, at::kFloat, {dyn_x->size(1), out_features});
  }
  for (const at::Tensor* t : {&row_scale, &weight_scale, &x_static, &static_weight}) {
    check_device("the epilogue's inputs", *t, acc);
  }
}

}  // namespace lowbit::int8_checks

namespace lowbit {
// The path the CPU int8 GEMM takes on this host ("amx", "onednn", "avx2" or "int_mm"): what
// Int8Linear's CPU rule (lowbit/int8/linear.py) reads. Defined in bindings/int8.cpp.
std::string cpu_int8_gemm_path();
}  // namespace lowbit

