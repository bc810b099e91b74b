// Torch glue of the kv family on the CPU: decode attention over a quantized layer's packed blocks
// and residual window, and the quantize+pack of whole blocks. Shapes and dtypes are checked in
// Python (lowbit/ops/kv.py) and again here (bindings/kv.h).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bindings/kv.h"
#include "cpu/kv.h"

namespace lowbit {
namespace {

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
  const at::Tensor mask =
      kv_checks::check_decode_attention(query_in, k_codes_in, k_scale_in, k_zero_in, v_codes_in, v_scale_in, v_zero_in,
                                        k_res_in, v_res_in, mask_in, bits, group);
  const int64_t B = query_in.size(0), Hq = query_in.size(1), L = query_in.size(2), D = query_in.size(3);
  const int64_t Hkv = k_res_in.size(1), r = k_res_in.size(2), nb = k_codes_in.size(2);
  const at::ScalarType dt = query_in.scalar_type();
  at::Tensor out = at::empty({B, Hq, L, D}, query_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  using kv_checks::inner_contiguous;
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
  kv_checks::check_quantize(keys_in, values_in, bits, group);
  const at::ScalarType dt = keys_in.scalar_type();
  const int64_t B = keys_in.size(0), H = keys_in.size(1), T = keys_in.size(2), D = keys_in.size(3);
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous();
  at::Tensor k_codes, k_scale, k_zero, v_codes, v_scale, v_zero;
  std::tie(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) = kv_checks::quantized_outputs(keys, bits, group);
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
