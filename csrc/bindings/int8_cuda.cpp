// Torch glue of the int8 family's CUDA kernels: checks, output allocation, the current stream,
// registration. Built only when torch has CUDA and nvcc is found (setup.py).
#include "bindings/cuda_common.h"
#include "bindings/int8.h"
#include "cuda/int8.h"

namespace lowbit {
namespace {

cuda::int8::DType int8_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return cuda::int8::DType::kBFloat16;
    case at::kHalf: return cuda::int8::DType::kFloat16;
    case at::kFloat: return cuda::int8::DType::kFloat32;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "dtype must be bfloat16, float16 or float32, got ", dtype);
  return cuda::int8::DType::kFloat32;  // not reached
}

// One kernel, no host synchronization (usable under CUDA graph capture). x and static_mask are read
// in 16-byte vectors when aligned, so a view at an odd offset is copied (x is an activation: small
// next to the weight); col_flags starts zeroed, the kernel only sets it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_prepass_cuda(const at::Tensor& x_in,
                                                                             const at::Tensor& static_mask_in,
                                                                             const at::Tensor& static_idx_in,
                                                                             double threshold) {
  int8_checks::check_prepass(x_in, static_mask_in, static_idx_in);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned16(x_in.contiguous());
  const at::Tensor static_mask = aligned16(static_mask_in.contiguous());
  const at::Tensor static_idx = static_idx_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), statics = static_idx.size(0);
  at::Tensor xq = at::empty({rows, cols}, x.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor col_flags = at::zeros({cols}, x.options().dtype(at::kByte));
  at::Tensor x_static = at::empty({rows, statics}, x.options());
  check_cuda(cuda::int8::prepass(int8_dtype(x.scalar_type()), x.const_data_ptr(), static_mask.const_data_ptr<uint8_t>(),
                                 static_idx.const_data_ptr<int32_t>(), rows, cols, statics, threshold,
                                 xq.data_ptr<int8_t>(), row_scale.data_ptr<float>(), col_flags.data_ptr<uint8_t>(),
                                 x_static.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "lowbit::int8_prepass (cuda)");
  return {xq, row_scale, col_flags, x_static};
}

// The weight is not copied when it sits at an odd offset (the kernel then reads it byte by byte);
// x is, when not 16-byte aligned.
at::Tensor int8_gemv_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& weight_scale_in,
                          const at::Tensor& static_idx_in, const at::Tensor& static_weight_in,
                          const std::optional<at::Tensor>& bias_in) {
  int8_checks::check_gemv(x_in, weight_in, weight_scale_in, static_idx_in, static_weight_in, bias_in);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned16(x_in.contiguous());
  const at::Tensor weight = weight_in.contiguous(), weight_scale = weight_scale_in.contiguous();
  const at::Tensor static_idx = static_idx_in.contiguous(), static_weight = static_weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  check_cuda(cuda::int8::gemv(int8_dtype(x.scalar_type()), x.const_data_ptr(), weight.const_data_ptr<int8_t>(),
                              weight_scale.const_data_ptr<float>(), static_idx.const_data_ptr<int32_t>(),
                              static_weight.const_data_ptr(), has_bias ? bias.const_data_ptr() : nullptr, rows,
                              in_features, out_features, static_idx.size(0), y.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
             "lowbit::int8_gemv (cuda)");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("int8_prepass", &int8_prepass_cuda);
  m.impl("int8_gemv", &int8_gemv_cuda);
}

}  // namespace lowbit
