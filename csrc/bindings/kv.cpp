// Torch glue of the kv family on the CPU: decode attention over a quantized layer's packed blocks
// and residual window. Shapes and dtypes are checked in Python (lowbit/ops/kv.py) and again here.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bindings/common.h"
#include "cpu/kv.h"

namespace lowbit {
namespace {

// t with each (batch row, head)'s data contiguous from its start: a view that slices the token or
// block dimension of a larger buffer (the cache's, which grows by doubling) is taken as it is; any
// other layout is copied.
at::Tensor inner_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}

template <typename P>
cpu::kv::Strided<P> strided(const at::Tensor& t) {
  cpu::kv::Strided<P> s;
  s.p = reinterpret_cast<const P*>(t.const_data_ptr());
  s.sb = t.size(0) == 1 ? 0 : t.stride(0);
  s.sh = t.size(1) == 1 ? 0 : t.stride(1);
  return s;
}

at::Tensor kv_decode_attention_cpu(const at::Tensor& query_in, const at::Tensor& k_codes_in, const at::Tensor& k_scale_in,
                                   const at::Tensor& k_zero_in, const at::Tensor& v_codes_in, const at::Tensor& v_scale_in,
                                   const at::Tensor& v_zero_in, const at::Tensor& k_res_in, const at::Tensor& v_res_in,
                                   const std::optional<at::Tensor>& mask_in, int64_t bits, int64_t group, double scaling) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, "bits must be one of 2, 4, 8, got ", bits);
  TORCH_CHECK_VALUE(group >= 1 && group % (8 / bits) == 0, "group must be a positive multiple of ", 8 / bits,
                    " (the codes a byte holds at ", bits, " bits), got ", group);
  TORCH_CHECK_VALUE(query_in.dim() == 4 && k_res_in.dim() == 4 && k_codes_in.dim() == 5,
                    "query, k_residual and k_codes must be 4-, 4- and 5-dimensional");
  const int64_t B = query_in.size(0), Hq = query_in.size(1), L = query_in.size(2), D = query_in.size(3);
  const int64_t Hkv = k_res_in.size(1), r = k_res_in.size(2), nb = k_codes_in.size(2);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0 && D % group == 0, "query heads (", Hq, ") must be a multiple of the kv heads (",
                    Hkv, ") and head_dim (", D, ") of group (", group, ")");
  const auto per = 8 / bits;
  const auto expect = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  };
  const at::ScalarType dt = query_in.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "query must be bfloat16, float16 or float32, got ", dtype_name(dt));
  expect(k_codes_in, "k_codes", at::kByte, {B, Hkv, nb, D, (group + per - 1) / per});
  expect(k_scale_in, "k_scale", dt, {B, Hkv, nb, D});
  expect(k_zero_in, "k_zero", dt, {B, Hkv, nb, D});
  expect(v_codes_in, "v_codes", at::kByte, {B, Hkv, nb * group, (D + per - 1) / per});
  expect(v_scale_in, "v_scale", dt, {B, Hkv, nb * group, D / group});
  expect(v_zero_in, "v_zero", dt, {B, Hkv, nb * group, D / group});
  expect(k_res_in, "k_residual", dt, {B, Hkv, r, D});
  expect(v_res_in, "v_residual", dt, {B, Hkv, r, D});
  const int64_t total = nb * group + r;
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = inner_contiguous(*mask_in);
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be bool, got ", dtype_name(mask.scalar_type()));
    TORCH_CHECK_VALUE(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) && (mask.size(1) == 1 || mask.size(1) == Hq) &&
                          mask.size(2) == L && mask.size(3) == total,
                      "mask must be [1 or ", B, ", 1 or ", Hq, ", ", L, ", ", total, "], got ", mask.sizes());
  }
  at::Tensor out = at::empty({B, Hq, L, D}, query_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor query = inner_contiguous(query_in), k_codes = inner_contiguous(k_codes_in),
                   k_scale = inner_contiguous(k_scale_in), k_zero = inner_contiguous(k_zero_in),
                   v_codes = inner_contiguous(v_codes_in), v_scale = inner_contiguous(v_scale_in),
                   v_zero = inner_contiguous(v_zero_in), k_res = inner_contiguous(k_res_in), v_res = inner_contiguous(v_res_in);
  dispatch_float_dtype(dt, "query", [&](auto type) {
    using T = typename decltype(type)::type;
    cpu::kv::DecodeArgs<T> a;
    a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.L = L, a.D = D, a.G = group, a.bits = bits, a.nb = nb, a.r = r;
    a.query = strided<T>(query);
    a.k_codes = strided<uint8_t>(k_codes), a.v_codes = strided<uint8_t>(v_codes);
    a.k_scale = strided<T>(k_scale), a.k_zero = strided<T>(k_zero);
    a.v_scale = strided<T>(v_scale), a.v_zero = strided<T>(v_zero);
    a.k_res = strided<T>(k_res), a.v_res = strided<T>(v_res);
    if (mask.defined()) a.mask = strided<bool>(mask);
    a.scaling = static_cast<float>(scaling);
    a.out = out.data_ptr<T>();
    cpu::kv::decode_attention<T>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kv_quantize_cpu(
    const at::Tensor& keys_in, const at::Tensor& values_in, int64_t bits, int64_t group) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, "bits must be one of 2, 4, 8, got ", bits);
  TORCH_CHECK_VALUE(group >= 1 && group % (8 / bits) == 0, "group must be a positive multiple of ", 8 / bits,
                    " (the codes a byte holds at ", bits, " bits), got ", group);
  const at::ScalarType dt = keys_in.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "keys must be bfloat16, float16 or float32, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(keys_in.dim() == 4, "keys must be [batch, heads, tokens, head_dim], got ", keys_in.sizes());
  TORCH_CHECK_VALUE(values_in.scalar_type() == dt && values_in.sizes() == keys_in.sizes(),
                    "values must match keys (", dtype_name(dt), " ", keys_in.sizes(), "), got ",
                    dtype_name(values_in.scalar_type()), " ", values_in.sizes());
  const int64_t B = keys_in.size(0), H = keys_in.size(1), T = keys_in.size(2), D = keys_in.size(3);
  TORCH_CHECK_VALUE(T % group == 0, "keys hold ", T, " tokens, not a multiple of group (", group,
                    "): keys are quantized in whole blocks");
  TORCH_CHECK_VALUE(D % group == 0, "head_dim (", D, ") must be a multiple of group (", group, ")");
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous();
  const auto u8 = keys.options().dtype(at::kByte);
  at::Tensor k_codes = at::empty({B, H, T / group, D, group * bits / 8}, u8);
  at::Tensor k_scale = at::empty({B, H, T / group, D}, keys.options()), k_zero = at::empty_like(k_scale);
  at::Tensor v_codes = at::empty({B, H, T, D * bits / 8}, u8);
  at::Tensor v_scale = at::empty({B, H, T, D / group}, keys.options()), v_zero = at::empty_like(v_scale);
  if (keys.numel() > 0) {
    dispatch_float_dtype(dt, "keys", [&](auto type) {
      using S = typename decltype(type)::type;
      cpu::kv::quantize<S>(keys.const_data_ptr<S>(), values.const_data_ptr<S>(), B, H, T, D, group,
                           static_cast<int>(bits), k_codes.data_ptr<uint8_t>(), k_scale.data_ptr<S>(),
                           k_zero.data_ptr<S>(), v_codes.data_ptr<uint8_t>(), v_scale.data_ptr<S>(),
                           v_zero.data_ptr<S>());
    });
  }
  return {k_codes, k_scale, k_zero, v_codes, v_scale, v_zero};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("kv_decode_attention", &kv_decode_attention_cpu);
  m.impl("kv_quantize", &kv_quantize_cpu);
}

}  // namespace lowbit
