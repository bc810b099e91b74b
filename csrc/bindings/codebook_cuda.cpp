// Torch glue of the codebook family's CUDA kernels: checks, output allocation, the current stream,
// registration. Built only when torch has CUDA and nvcc is found (setup.py).
#include "bindings/codebook.h"
#include "bindings/cuda_common.h"
#include "cuda/codebook.h"

namespace lowbit {
namespace {

cuda::codebook::DType codebook_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return cuda::codebook::DType::kBFloat16;
    case at::kHalf: return cuda::codebook::DType::kFloat16;
    case at::kFloat: return cuda::codebook::DType::kFloat32;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "dtype must be bfloat16, float16 or float32, got ", dtype_name(dtype));
  return cuda::codebook::DType::kFloat32;  // not reached
}

// One kernel launch (more only past 4M rows of x), no host synchronization: usable under CUDA
// graph capture. x and the codebooks are read in 16-byte vectors, so a view at an odd offset is
// copied (x is an activation, the codebooks at most 2 MiB); the codes are read as they are (8-byte
// loads where their rows allow, single codes otherwise).
at::Tensor codebook_matmul_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& codebooks_in,
                                const at::Tensor& scales_in, const std::optional<at::Tensor>& bias_in) {
  codebook_checks::check_matmul(x_in, codes_in, codebooks_in, scales_in, bias_in);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned16(x_in.contiguous());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor codebooks = aligned16(codebooks_in.contiguous());
  const at::Tensor scales = scales_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), out_features = codes.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());

  cuda::codebook::Weight w{};
  w.codes = codes.const_data_ptr();
  w.codebooks = codebooks.const_data_ptr();
  w.scales = scales.const_data_ptr();
  w.out_features = out_features;
  w.in_groups = codes.size(1);
  w.num_codebooks = static_cast<int>(codes.size(2));
  w.nbits = codes.scalar_type() == at::kByte ? 8 : 16;
  w.group_size = static_cast<int>(codebooks.size(3));
  w.codebook_dtype = codebook_dtype(codebooks.scalar_type());
  w.scale_dtype = codebook_dtype(scales.scalar_type());
  check_cuda(cuda::codebook::matmul(codebook_dtype(x.scalar_type()), x.const_data_ptr(), rows, w,
                                    has_bias ? bias.const_data_ptr() : nullptr, y.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
             "lowbit::codebook_matmul (cuda)");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("codebook_matmul", &codebook_matmul_cuda);
}

}  // namespace lowbit
