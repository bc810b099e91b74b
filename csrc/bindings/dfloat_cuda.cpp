// Torch glue of the dfloat family's CUDA kernels: checks, output allocation, the current stream,
// registration. Built only when torch has CUDA and nvcc is found (setup.py).
#include "bindings/cuda_common.h"
#include "bindings/dfloat.h"
#include "cuda/dfloat.h"

namespace lowbit {
namespace {

cuda::dfloat::DType dfloat_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return cuda::dfloat::DType::kBFloat16;
    case at::kHalf: return cuda::dfloat::DType::kFloat16;
    case at::kFloat: return cuda::dfloat::DType::kFloat32;
    case at::kByte: return cuda::dfloat::DType::kUInt8;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "dtype must be one of ", kDfloatDtypes, ", got ", dtype_name(dtype));
  return cuda::dfloat::DType::kFloat32;  // not reached
}

// What the CUDA kernels need beyond the format's own checks (check_dfloat_stream): one thread per
// window and 32-bit symbol counts per block.
void check_dfloat_cuda(const at::Tensor& codes, int64_t window_bits, int64_t windows_per_block) {
  TORCH_CHECK(codes.is_cuda(), "codes must be a CUDA tensor, got one on ", codes.device());
  TORCH_CHECK(windows_per_block <= cuda::dfloat::kMaxWindowsPerBlock, "windows_per_block must be <= ",
              cuda::dfloat::kMaxWindowsPerBlock, " for the CUDA kernels, got ", windows_per_block);
  TORCH_CHECK(window_bits <= cuda::dfloat::kMaxWindowBits, "window_bits must be <= ", cuda::dfloat::kMaxWindowBits,
              " for the CUDA kernels, got ", window_bits);
}

cuda::dfloat::Stream dfloat_stream(const at::Tensor& codes, const at::Tensor& raw, const at::Tensor& gaps,
                                   const at::Tensor& block_starts, const at::Tensor& table, int64_t n,
                                   int64_t total_bits, int64_t window_bits, int64_t windows_per_block) {
  return {codes.const_data_ptr<uint8_t>(), codes.numel(), raw.const_data_ptr<uint8_t>(),
          gaps.const_data_ptr<uint8_t>(), block_starts.const_data_ptr<int64_t>(), table.const_data_ptr<int16_t>(),
          n, total_bits, window_bits, windows_per_block};
}

// The kernels flag a corrupted stream in device memory (an int of kError* bits) instead of trapping.
// decode reads the flag and raises ("corrupted ...", which lowbit.ops turns into FormatError); that
// costs a host sync, skipped while the stream is captured into a CUDA graph (nothing can be read
// then; a replay is not checked). gemv never syncs: its last kernel writes NaN everywhere instead.
void check_dfloat_flags(const at::Tensor& error, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return;
  const int flags = error.item<int>();
  TORCH_CHECK_VALUE(flags == 0, "corrupted dfloat stream:",
                    (flags & cuda::dfloat::kErrorBadCode) ? " a bit pattern that is no code;" : "",
                    (flags & cuda::dfloat::kErrorBadEnd) ? " a window's codes overrun the next window's gap;" : "",
                    (flags & cuda::dfloat::kErrorBadCount) ? " the codes disagree with block_starts;" : "");
}

at::Tensor dfloat_decode_cuda(const at::Tensor& codes_in, const at::Tensor& raw_in, const at::Tensor& gaps,
                              const at::Tensor& block_starts, const at::Tensor& table_in, int64_t n,
                              at::ScalarType dtype, int64_t total_bits, int64_t window_bits,
                              int64_t windows_per_block, bool check) {
  check_dfloat_stream(codes_in, raw_in, gaps, block_starts, table_in, n, dtype, total_bits, window_bits,
                      windows_per_block);
  check_dfloat_cuda(codes_in, window_bits, windows_per_block);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = aligned16(codes_in), raw = aligned16(raw_in), table = aligned16(table_in);
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  at::Tensor error = at::zeros({1}, codes.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(cuda::dfloat::decode(dfloat_stream(codes, raw, gaps, block_starts, table, n, total_bits, window_bits,
                                                windows_per_block),
                                  dfloat_dtype(dtype), out.data_ptr(), error.data_ptr<int>(), stream),
             "lowbit::dfloat_decode (cuda)");
  if (check) check_dfloat_flags(error, stream);  // check=false: a validated stream, no host sync
  return out;
}

at::Tensor dfloat_gemv_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& raw_in,
                            const at::Tensor& gaps, const at::Tensor& block_starts, const at::Tensor& table_in,
                            int64_t out_features, int64_t total_bits, int64_t window_bits, int64_t windows_per_block,
                            const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [batch, in_features], got shape ", x_in.sizes());
  TORCH_CHECK(out_features >= 0 && out_features < INT32_MAX, "out_features must be in [0, 2^31 - 1), got ",
              out_features);
  const int64_t batch = x_in.size(0), in_features = x_in.size(1);
  const at::ScalarType dtype = x_in.scalar_type();
  // The stream checks accept uint8 (a stream decodes to bytes), but a product needs floats.
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "x must be one of bfloat16, float16, float32 (dfloat_gemv multiplies by a float weight), got ",
                   dtype_name(dtype));
  check_dfloat_stream(codes_in, raw_in, gaps, block_starts, table_in, out_features * in_features, dtype, total_bits,
                      window_bits, windows_per_block);
  check_dfloat_cuda(codes_in, window_bits, windows_per_block);
  TORCH_CHECK(x_in.device() == codes_in.device(), "x is on ", x_in.device(), ", codes on ", codes_in.device());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_features && bias_in->scalar_type() == dtype,
                "bias must be [", out_features, "] of ", dtype, ", got ", bias_in->sizes(), " of ",
                bias_in->scalar_type());
    TORCH_CHECK(bias_in->device() == codes_in.device(), "bias is on ", bias_in->device(), ", codes on ",
                codes_in.device());
  }
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor x = aligned16(x_in.contiguous());
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const at::Tensor codes = aligned16(codes_in), raw = aligned16(raw_in), table = aligned16(table_in);
  // fp32 partial sums [batch, out], then the corruption flag: one allocation, one memset.
  const int64_t sums = batch * out_features;
  at::Tensor workspace = at::zeros({sums + 1}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({batch, out_features}, x.options());
  float* ws = workspace.data_ptr<float>();
  check_cuda(cuda::dfloat::gemv(dfloat_stream(codes, raw, gaps, block_starts, table, out_features * in_features,
                                              total_bits, window_bits, windows_per_block),
                                dfloat_dtype(dtype), x.const_data_ptr(), batch, in_features, out_features,
                                has_bias ? bias.const_data_ptr() : nullptr, ws, reinterpret_cast<int*>(ws + sums),
                                y.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "lowbit::dfloat_gemv (cuda)");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("dfloat_decode", &dfloat_decode_cuda);
  m.impl("dfloat_gemv", &dfloat_gemv_cuda);
}

}  // namespace lowbit
