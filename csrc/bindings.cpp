// Torch glue for the C++ CPU kernels, and the Python module lowbit._C.
// Schemas are defined in python/lowbit/ops.py; this file only registers CPU implementations.
#include <torch/extension.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings.h"
#include "cpu/bitpack.h"
#include "cpu/dfloat.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("_pack_bits_native", &pack_bits_cpu);
  m.impl("_unpack_bits_native", &unpack_bits_cpu);
  m.impl("_dfloat_histogram_native", &dfloat_histogram_cpu);
  m.impl("_dfloat_encode_native", &dfloat_encode_cpu);
  m.impl("_dfloat_decode_native", &dfloat_decode_cpu);
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
