// Torch glue of the bitpack family's CUDA kernels: checks, output allocation, the current stream,
// registration. Built only when torch has CUDA and nvcc is found (setup.py).
#include "bindings/cuda_common.h"
#include "cuda/bitpack.h"

namespace lowbit {
namespace {

at::Tensor pack_bits_cuda(const at::Tensor& values_in, int64_t bits) {
  check_bits(bits);
  check_uint8(values_in, "values");
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const int64_t n = values.size(-1);
  at::Tensor packed = at::empty(with_last(values, packed_length(n, static_cast<int>(bits))), values.options());
  check_cuda(cuda::pack_bits(values.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>(), leading_rows(values), n,
                             static_cast<int>(bits), c10::cuda::getCurrentCUDAStream()),
             "lowbit::pack_bits (cuda)");
  return packed;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed_in, int64_t bits, int64_t n) {
  check_unpack_args(packed_in, bits, n);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor values = at::empty(with_last(packed, n), packed.options());
  check_cuda(cuda::unpack_bits(packed.data_ptr<uint8_t>(), values.data_ptr<uint8_t>(), leading_rows(packed), n,
                               static_cast<int>(bits), c10::cuda::getCurrentCUDAStream()),
             "lowbit::unpack_bits (cuda)");
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
}

}  // namespace lowbit
