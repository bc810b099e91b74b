// Torch glue of the kv family's CUDA kernels: checks, output and workspace allocation, the current
// stream, registration. Built only when torch has CUDA and nvcc is found (setup.py).
#include <optional>
#include <tuple>

#include "bindings/cuda_common.h"
#include "bindings/kv.h"
#include "cuda/kv.h"

namespace lowbit {
namespace {

cuda::kv::DType kv_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return cuda::kv::DType::kBFloat16;
    case at::kHalf: return cuda::kv::DType::kFloat16;
    default: return cuda::kv::DType::kFloat32;  // the checks admit bfloat16, float16 and float32 only
  }
}

cuda::kv::Strided strided(const at::Tensor& t) {
  cuda::kv::Strided s;
  s.p = t.const_data_ptr();
  s.sb = t.size(0) == 1 ? 0 : t.stride(0);
  s.sh = t.size(1) == 1 ? 0 : t.stride(1);
  return s;
}

// Two launches (split, merge) and one workspace allocation from torch's caching allocator, no host
// synchronization: usable under CUDA graph capture. Cache views that slice the token or block
// dimension of larger buffers are read in place.
at::Tensor kv_decode_attention_cuda(const at::Tensor& query_in, const at::Tensor& k_codes_in,
                                    const at::Tensor& k_scale_in, const at::Tensor& k_zero_in,
                                    const at::Tensor& v_codes_in, const at::Tensor& v_scale_in,
                                    const at::Tensor& v_zero_in, const at::Tensor& k_res_in, const at::Tensor& v_res_in,
                                    const std::optional<at::Tensor>& mask_in, int64_t bits, int64_t group,
                                    double scaling) {
  const at::Tensor mask = kv_checks::check_decode_attention(query_in, k_codes_in, k_scale_in, k_zero_in, v_codes_in,
                                                            v_scale_in, v_zero_in, k_res_in, v_res_in, mask_in, bits,
                                                            group);
  TORCH_CHECK_VALUE(query_in.is_cuda(), "query must be a CUDA tensor, got one on ", query_in.device());
  const int64_t D = query_in.size(3);
  TORCH_CHECK_VALUE(D <= cuda::kv::kMaxHeadDim, "head_dim must be at most ", cuda::kv::kMaxHeadDim,
                    " for the CUDA kernel, got ", D, "; use backend 'triton' or 'reference'");
  const c10::cuda::CUDAGuard guard(query_in.device());
  at::Tensor out = at::empty(query_in.sizes(), query_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  using kv_checks::inner_contiguous;
  const at::Tensor query = inner_contiguous(query_in), k_codes = inner_contiguous(k_codes_in),
                   k_scale = inner_contiguous(k_scale_in), k_zero = inner_contiguous(k_zero_in),
                   v_codes = inner_contiguous(v_codes_in), v_scale = inner_contiguous(v_scale_in),
                   v_zero = inner_contiguous(v_zero_in), k_res = inner_contiguous(k_res_in),
                   v_res = inner_contiguous(v_res_in);
  cuda::kv::DecodeArgs a;
  a.dtype = kv_dtype(query.scalar_type());
  a.B = query.size(0), a.Hq = query.size(1), a.L = query.size(2), a.D = D;
  a.Hkv = k_res.size(1), a.r = k_res.size(2), a.nb = k_codes.size(2), a.G = group;
  a.bits = static_cast<int>(bits);
  a.query = strided(query);
  a.k_codes = strided(k_codes), a.k_scale = strided(k_scale), a.k_zero = strided(k_zero);
  a.v_codes = strided(v_codes), a.v_scale = strided(v_scale), a.v_zero = strided(v_zero);
  a.k_res = strided(k_res), a.v_res = strided(v_res);
  if (mask.defined()) a.mask = strided(mask);
  a.scaling = static_cast<float>(scaling);
  a.out = out.data_ptr();
  cuda::kv::DecodePlan plan;
  check_cuda(cuda::kv::decode_plan(a, &plan), "lowbit::kv_decode_attention (cuda) plan");
  at::Tensor workspace = at::empty({plan.workspace_floats}, query.options().dtype(at::kFloat));
  check_cuda(cuda::kv::decode_attention(a, plan, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "lowbit::kv_decode_attention (cuda)");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(
    const at::Tensor& keys_in, const at::Tensor& values_in, int64_t bits, int64_t group) {
  kv_checks::check_quantize(keys_in, values_in, bits, group);
  TORCH_CHECK_VALUE(keys_in.is_cuda(), "keys must be a CUDA tensor, got one on ", keys_in.device());
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const int64_t B = keys_in.size(0), H = keys_in.size(1), T = keys_in.size(2), D = keys_in.size(3);
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous();
  at::Tensor k_codes, k_scale, k_zero, v_codes, v_scale, v_zero;
  std::tie(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) = kv_checks::quantized_outputs(keys, bits, group);
  if (keys.numel() > 0) {
    check_cuda(cuda::kv::quantize(kv_dtype(keys.scalar_type()), keys.const_data_ptr(), values.const_data_ptr(), B, H,
                                  T, D, group, static_cast<int>(bits), k_codes.data_ptr<uint8_t>(),
                                  k_scale.data_ptr(), k_zero.data_ptr(), v_codes.data_ptr<uint8_t>(),
                                  v_scale.data_ptr(), v_zero.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "lowbit::kv_quantize (cuda)");
  }
  return {k_codes, k_scale, k_zero, v_codes, v_scale, v_zero};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("kv_decode_attention", &kv_decode_attention_cuda);
  m.impl("kv_quantize", &kv_quantize_cuda);
}

}  // namespace lowbit
