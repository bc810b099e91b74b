// Argument checks of the kv family's native ops, shared by the CPU and CUDA glue. They mirror
// check_decode_attention / check_quantize in python/lowbit/ops/kv.py (TypeError for a dtype,
// ValueError for a shape, a value or a device), which run first on the public wrappers; these keep
// torch.ops.lowbit.kv_* safe when called directly.
#pragma once

#include <optional>
#include <tuple>

#include "bindings/common.h"

namespace lowbit::kv_checks {

// t with each (batch row, head)'s data contiguous from its start: a view that slices the token or
// block dimension of a larger buffer (the cache's, which grows by doubling) is taken as it is; any
// other layout is copied.
inline at::Tensor inner_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}

inline void check_bits_group(int64_t bits, int64_t group) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, "bits must be one of 2, 4, 8, got ", bits);
  TORCH_CHECK_VALUE(group >= 1 && group % (8 / bits) == 0, "group must be a positive multiple of ", 8 / bits,
                    " (the codes a byte holds at ", bits, " bits), got ", group);
}

// Checks every argument of kv_decode_attention; returns the mask (undefined when absent) with each
// (batch row, head)'s [L][T] contiguous.
inline at::Tensor check_decode_attention(const at::Tensor& query, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                         const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                         const at::Tensor& v_zero, const at::Tensor& k_res, const at::Tensor& v_res,
                                         const std::optional<at::Tensor>& mask_in, int64_t bits, int64_t group) {
  check_bits_group(bits, group);
  const at::ScalarType dt = query.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "query must be bfloat16, float16 or float32, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(query.dim() == 4, "query must be [batch, query heads, queries, head_dim], got shape ",
                    query.sizes());
  TORCH_CHECK_VALUE(k_res.dim() == 4, "k_residual must be [batch, kv heads, tokens, head_dim], got shape ",
                    k_res.sizes());
  TORCH_CHECK_VALUE(k_codes.dim() == 5, "k_codes must be [batch, kv heads, blocks, head_dim, bytes], got shape ",
                    k_codes.sizes());
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), D = query.size(3);
  const int64_t Hkv = k_res.size(1), r = k_res.size(2), nb = k_codes.size(2);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of the kv heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D % group == 0, "head_dim (", D, ") must be a multiple of group (", group, ")");
  const int64_t per = 8 / bits;
  const auto expect = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == query.device(), name, " is on ", t.device(), ", query on ", query.device());
  };
  expect(k_codes, "k_codes", at::kByte, {B, Hkv, nb, D, (group + per - 1) / per});
  expect(k_scale, "k_scale", dt, {B, Hkv, nb, D});
  expect(k_zero, "k_zero", dt, {B, Hkv, nb, D});
  expect(v_codes, "v_codes", at::kByte, {B, Hkv, nb * group, (D + per - 1) / per});
  expect(v_scale, "v_scale", dt, {B, Hkv, nb * group, D / group});
  expect(v_zero, "v_zero", dt, {B, Hkv, nb * group, D / group});
  expect(k_res, "k_residual", dt, {B, Hkv, r, D});
  expect(v_res, "v_residual", dt, {B, Hkv, r, D});
  if (!mask_in.has_value() || !mask_in->defined()) return at::Tensor();
  const int64_t total = nb * group + r;
  const at::Tensor& m = *mask_in;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "mask must be bool, got ", dtype_name(m.scalar_type()));
  TORCH_CHECK_VALUE(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && (m.size(1) == 1 || m.size(1) == Hq) &&
                        m.size(2) == L && m.size(3) == total,
                    "mask must be [1 or ", B, ", 1 or ", Hq, ", ", L, ", ", total, "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == query.device(), "mask is on ", m.device(), ", query on ", query.device());
  return inner_contiguous(m);
}

inline void check_quantize(const at::Tensor& keys, const at::Tensor& values, int64_t bits, int64_t group) {
  check_bits_group(bits, group);
  const at::ScalarType dt = keys.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "keys must be bfloat16, float16 or float32, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(keys.dim() == 4, "keys must be [batch, heads, tokens, head_dim], got ", keys.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == dt && values.sizes() == keys.sizes() && values.device() == keys.device(),
                    "values must match keys (", dtype_name(dt), " ", keys.sizes(), " on ", keys.device(), "), got ",
                    dtype_name(values.scalar_type()), " ", values.sizes(), " on ", values.device());
  const int64_t T = keys.size(2), D = keys.size(3);
  TORCH_CHECK_VALUE(T % group == 0, "keys hold ", T, " tokens, not a multiple of group (", group,
                    "): keys are quantized in whole blocks");
  TORCH_CHECK_VALUE(D % group == 0, "head_dim (", D, ") must be a multiple of group (", group, ")");
}

// kv_quantize's outputs for keys [B, H, T, D] (checked), uninitialized on keys' device: k_codes
// [B, H, T/G, D, G bits/8] uint8, k_scale / k_zero [B, H, T/G, D], v_codes [B, H, T, D bits/8]
// uint8, v_scale / v_zero [B, H, T, D/G], scales and zeros of keys' dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantized_outputs(
    const at::Tensor& keys, int64_t bits, int64_t group) {
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), D = keys.size(3);
  const auto u8 = keys.options().dtype(at::kByte);
  at::Tensor k_scale = at::empty({B, H, T / group, D}, keys.options());
  at::Tensor v_scale = at::empty({B, H, T, D / group}, keys.options());
  return {at::empty({B, H, T / group, D, group * bits / 8}, u8), k_scale, at::empty_like(k_scale),
          at::empty({B, H, T, D * bits / 8}, u8), v_scale, at::empty_like(v_scale)};
}

}  // namespace lowbit::kv_checks
