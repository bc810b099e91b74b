// Torch glue for the C++ CPU kernels, and the Python module lowbit._C.
// Schemas are defined in python/lowbit/ops.py; this file only registers CPU implementations.
#include <torch/extension.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings.h"
#include "bindings_int8.h"
#include "cpu/bitpack.h"
#include "cpu/dfloat.h"
#include "cpu/int8.h"

namespace lowbit {
namespace {

at::Tensor pack_bits_cpu(const at::Tensor& values_in, int64_t bits) {
  check_bits(bits);
  check_uint8(values_in, "values");
  const at::Tensor values = values_in.contiguous();
  const int64_t n = values.size(-1);
  at::Tensor packed = at::empty(with_last(values, packed_length(n, static_cast<int>(bits))), values.options());
  cpu::pack_bits(values.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>(), leading_rows(values), n,
                 static_cast<int>(bits));
  return packed;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed_in, int64_t bits, int64_t n) {
  check_unpack_args(packed_in, bits, n);
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor values = at::empty(with_last(packed, n), packed.options());
  cpu::unpack_bits(packed.data_ptr<uint8_t>(), values.data_ptr<uint8_t>(), leading_rows(packed), n,
                   static_cast<int>(bits));
  return values;
}

// ---- dfloat -----------------------------------------------------------------------------------

// An uninitialized CPU tensor that is about to be written whole. A large fresh allocation is
// mapped by the kernel page by page on first touch, which for 4 KiB pages costs more than
// decoding into it; asking for transparent huge pages before the first touch makes that about
// six times cheaper (and the later unmap too). Only the 2 MiB-aligned interior can be huge; the
// advice is a hint, so a failure (THP disabled) changes nothing. Linux only.
at::Tensor empty_for_writing(int64_t n, const at::TensorOptions& options) {
  at::Tensor t = at::empty({n}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

template <typename T>
struct Type {
  using type = T;
};

// Calls fn(Type<Bits>{}) with Bits = uint16_t for bf16/fp16, uint32_t for fp32.
template <typename Fn>
auto dispatch_float_bits(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kBFloat16:
    case at::kHalf: return fn(Type<uint16_t>{});
    case at::kFloat: return fn(Type<uint32_t>{});
    default: TORCH_CHECK_TYPE(false, name, " must be bfloat16, float16 or float32, got ", dtype);
  }
}

at::Tensor dfloat_histogram_cpu(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor counts = at::zeros({256}, x.options().dtype(at::kLong));
  dispatch_float_bits(x.scalar_type(), "x", [&](auto type) {
    using Bits = typename decltype(type)::type;
    cpu::dfloat::histogram<Bits>(static_cast<const Bits*>(x.const_data_ptr()), x.numel(), counts.data_ptr<int64_t>());
  });
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfloat_encode_cpu(
    const at::Tensor& x_in, const at::Tensor& lengths, const at::Tensor& codewords, int64_t total_bits,
    int64_t window_bits, int64_t windows_per_block) {
  TORCH_CHECK(lengths.scalar_type() == at::kByte && lengths.numel() == 256 && lengths.is_contiguous(),
              "lengths must be a contiguous uint8 tensor of 256 elements");
  TORCH_CHECK(codewords.scalar_type() == at::kInt && codewords.numel() == 256 && codewords.is_contiguous(),
              "codewords must be a contiguous int32 tensor of 256 elements");
  TORCH_CHECK(window_bits >= 32 && window_bits % 32 == 0 && windows_per_block >= 1,
              "window_bits must be a positive multiple of 32 and windows_per_block >= 1");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int raw_bytes = x.scalar_type() == at::kFloat ? 3 : 1;
  const uint8_t* lens = lengths.const_data_ptr<uint8_t>();
  TORCH_CHECK(total_bits >= 0 && total_bits <= n * 12, "total_bits = ", total_bits, " is impossible for ", n,
              " values");
  const int64_t windows = (total_bits + window_bits - 1) / window_bits;
  const int64_t blocks = (windows + windows_per_block - 1) / windows_per_block;
  const int64_t padded = (((total_bits + 7) / 8 + 8) + 7) / 8 * 8;
  const auto u8 = x.options().dtype(at::kByte);
  at::Tensor codes = at::zeros({padded}, u8);
  at::Tensor raw = at::empty({n * raw_bytes}, u8);
  at::Tensor gaps = at::zeros({windows}, u8);
  at::Tensor block_starts = at::empty({blocks + 1}, x.options().dtype(at::kLong));
  const cpu::dfloat::Stream stream{codes.data_ptr<uint8_t>(), raw.data_ptr<uint8_t>(), gaps.data_ptr<uint8_t>(),
                              block_starts.data_ptr<int64_t>(), total_bits, window_bits, windows_per_block};
  const char* error = dispatch_float_bits(x.scalar_type(), "x", [&](auto type) {
    using Bits = typename decltype(type)::type;
    return cpu::dfloat::encode<Bits>(static_cast<const Bits*>(x.const_data_ptr()), n, lens,
                                     reinterpret_cast<const uint32_t*>(codewords.const_data_ptr<int32_t>()), stream);
  });
  TORCH_CHECK_VALUE(error == nullptr, "dfloat encode: ", error);
  at::Tensor packed_gaps = at::empty({(windows + 1) / 2}, u8);
  cpu::pack_bits(gaps.const_data_ptr<uint8_t>(), packed_gaps.data_ptr<uint8_t>(), 1, windows, 4);
  return {codes, raw, packed_gaps, block_starts};
}

at::Tensor dfloat_decode_cpu(const at::Tensor& codes, const at::Tensor& raw, const at::Tensor& gaps,
                             const at::Tensor& block_starts, const at::Tensor& table, int64_t n,
                             at::ScalarType dtype, int64_t total_bits, int64_t window_bits,
                             int64_t windows_per_block) {
  check_dfloat_stream(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block);
  at::Tensor out = empty_for_writing(n, codes.options().dtype(dtype));
  const char* error = dispatch_float_bits(dtype, "dtype", [&](auto type) {
    using Bits = typename decltype(type)::type;
    return cpu::dfloat::decode<Bits>(codes.const_data_ptr<uint8_t>(), codes.numel(), raw.const_data_ptr<uint8_t>(),
                                gaps.const_data_ptr<uint8_t>(), block_starts.const_data_ptr<int64_t>(),
                                table.const_data_ptr<int16_t>(), n, total_bits, window_bits, windows_per_block,
                                static_cast<Bits*>(out.data_ptr()));
  });
  TORCH_CHECK_VALUE(error == nullptr, "corrupted dfloat stream: ", error);
  return out;
}

// ---- int8 ---------------------------------------------------------------------------------------

// Calls fn(Type<T>{}) with the C++ type of x's dtype (float, c10::BFloat16, c10::Half).
template <typename Fn>
auto dispatch_int8_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Type<float>{});
    case at::kBFloat16: return fn(Type<c10::BFloat16>{});
    case at::kHalf: return fn(Type<c10::Half>{});
    default: TORCH_CHECK_TYPE(false, "x must be bfloat16, float16 or float32, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_prepass_cpu(
    const at::Tensor& x_in, const at::Tensor& static_mask_in, const at::Tensor& static_idx_in, double threshold) {
  int8_checks::check_prepass(x_in, static_mask_in, static_idx_in);
  const at::Tensor x = x_in.contiguous(), static_mask = static_mask_in.contiguous();
  const at::Tensor static_idx = static_idx_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), S = static_idx.numel();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor col_flags = at::empty({K}, x.options().dtype(at::kByte));
  at::Tensor x_static = at::empty({M, S}, x.options());
  dispatch_int8_dtype(x.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    cpu::int8::prepass<T>(x.const_data_ptr<T>(), M, K, static_mask.const_data_ptr<uint8_t>(),
                          static_idx.const_data_ptr<int32_t>(), S, static_cast<float>(threshold),
                          xq.data_ptr<int8_t>(), row_scale.data_ptr<float>(), col_flags.data_ptr<uint8_t>(),
                          x_static.data_ptr<T>());
  });
  return {xq, row_scale, col_flags, x_static};
}

// x_static @ static_weight^T in fp32, or an undefined tensor when there are no static columns.
at::Tensor static_product(const at::Tensor& x_static, const at::Tensor& static_weight) {
  if (x_static.size(1) == 0) return {};
  return at::matmul(x_static.to(at::kFloat), static_weight.to(at::kFloat).t()).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Everything of the int8 GEMM after xq @ weight^T, which the caller ran and passes as acc [M, N]
// (int32, or its exact fp32 image), with the outlier side product's factors dyn_x [M, D] and
// dyn_w [D, N] (fp32, the int8 weight's flagged columns), all from lowbit/int8/cpu_gemm.py.
at::Tensor int8_epilogue_cpu(const at::Tensor& acc_in, const at::Tensor& row_scale, const at::Tensor& weight_scale_in,
                             const std::optional<at::Tensor>& dyn_x_in, const std::optional<at::Tensor>& dyn_w_in,
                             const at::Tensor& x_static, const at::Tensor& static_weight,
                             const std::optional<at::Tensor>& bias_in) {
  int8_checks::check_epilogue(acc_in, row_scale, weight_scale_in, dyn_x_in, dyn_w_in, x_static, static_weight,
                              bias_in);
  const int64_t M = acc_in.size(0), N = acc_in.size(1);
  at::Tensor y = at::empty({M, N}, x_static.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor acc = acc_in.contiguous();
  const at::Tensor dyn_x = dyn_x_in.has_value() ? dyn_x_in->contiguous() : at::Tensor();
  const at::Tensor dyn_w = dyn_w_in.has_value() ? dyn_w_in->contiguous() : at::Tensor();
  const at::Tensor stat_x = x_static.to(at::kFloat).contiguous();
  const at::Tensor stat_w = static_weight.to(at::kFloat).t().contiguous();
  const at::Tensor weight_scale = weight_scale_in.contiguous(), row = row_scale.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const cpu::int8::Side dyn{ptr_or_null<float>(dyn_x), ptr_or_null<float>(dyn_w), dyn_x.defined() ? dyn_x.size(1) : 0};
  const cpu::int8::Side stat{stat_x.const_data_ptr<float>(), stat_w.const_data_ptr<float>(), stat_x.size(1)};
  dispatch_int8_dtype(x_static.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    const auto run = [&](auto* acc_ptr) {
      cpu::int8::epilogue(acc_ptr, M, N, row.const_data_ptr<float>(), weight_scale.const_data_ptr<float>(), dyn,
                          stat, ptr_or_null<T>(bias), y.data_ptr<T>());
    };
    if (acc.scalar_type() == at::kInt) {
      run(acc.const_data_ptr<int32_t>());
    } else {
      run(acc.const_data_ptr<float>());
    }
  });
  return y;
}

at::Tensor int8_gemv_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& weight_scale_in,
                         const at::Tensor& static_idx, const at::Tensor& static_weight,
                         const std::optional<at::Tensor>& bias_in) {
  int8_checks::check_gemv(x_in, weight_in, weight_scale_in, static_idx, static_weight, bias_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), weight_scale = weight_scale_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor extra = static_product(x.index_select(1, static_idx.to(at::kLong)), static_weight);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  dispatch_int8_dtype(x.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    cpu::int8::gemv<T>(x.const_data_ptr<T>(), M, K, weight.const_data_ptr<int8_t>(), N,
                       weight_scale.const_data_ptr<float>(), ptr_or_null<float>(extra), ptr_or_null<T>(bias),
                       y.data_ptr<T>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("_pack_bits_native", &pack_bits_cpu);
  m.impl("_unpack_bits_native", &unpack_bits_cpu);
  m.impl("_dfloat_histogram_native", &dfloat_histogram_cpu);
  m.impl("_dfloat_encode_native", &dfloat_encode_cpu);
  m.impl("_dfloat_decode_native", &dfloat_decode_cpu);
  m.impl("_int8_prepass_native", &int8_prepass_cpu);
  m.impl("_int8_epilogue_native", &int8_epilogue_cpu);
  m.impl("_int8_gemv_native", &int8_gemv_cpu);
}

}  // namespace lowbit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit's compiled kernels; importing this module registers them with torch.ops.lowbit";
  m.def("with_cuda", []() {
#ifdef LOWBIT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA kernels");
}
