// Torch glue of the dfloat family on the CPU: the encoder's steps and the decoder.
#include <torch/library.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings/dfloat.h"
#include "cpu/bitpack.h"
#include "cpu/dfloat.h"

namespace lowbit {
namespace {

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

// Calls fn(Type<Bits>{}) with Bits = uint8_t for uint8, uint16_t for bf16/fp16, uint32_t for fp32.
template <typename Fn>
auto dispatch_dfloat_bits(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kByte: return fn(Type<uint8_t>{});
    case at::kBFloat16:
    case at::kHalf: return fn(Type<uint16_t>{});
    case at::kFloat: return fn(Type<uint32_t>{});
    default: TORCH_CHECK_TYPE(false, name, " must be one of ", kDfloatDtypes, ", got ", dtype_name(dtype));
  }
}

at::Tensor dfloat_histogram_cpu(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor counts = at::zeros({256}, x.options().dtype(at::kLong));
  dispatch_dfloat_bits(x.scalar_type(), "x", [&](auto type) {
    using Bits = typename decltype(type)::type;
    cpu::dfloat::histogram<Bits>(static_cast<const Bits*>(x.const_data_ptr()), x.numel(), counts.data_ptr<int64_t>());
  });
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfloat_encode_cpu(
    const at::Tensor& x_in, const at::Tensor& lengths, const at::Tensor& codewords, int64_t total_bits,
    int64_t window_bits, int64_t windows_per_block) {
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kByte && lengths.numel() == 256 && lengths.is_contiguous(),
                    "lengths must be a contiguous uint8 tensor of 256 elements");
  TORCH_CHECK_VALUE(codewords.scalar_type() == at::kInt && codewords.numel() == 256 && codewords.is_contiguous(),
                    "codewords must be a contiguous int32 tensor of 256 elements");
  check_window_shape(window_bits, windows_per_block, "");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t raw_bytes = dfloat_raw_bytes(x.scalar_type());
  const uint8_t* lens = lengths.const_data_ptr<uint8_t>();
  const int32_t* words = codewords.const_data_ptr<int32_t>();
  // The decoders peek 12 bits and the gaps hold 4: a longer code would be written but never read back.
  for (int s = 0; s < 256; ++s) {
    TORCH_CHECK_VALUE(lens[s] <= 12, "lengths[", s, "] = ", int(lens[s]), ": codes are at most 12 bits long");
    TORCH_CHECK_VALUE(lens[s] == 0 || (words[s] >= 0 && words[s] < (int32_t(1) << lens[s])), "codewords[", s,
                      "] = ", words[s], " does not fit in its ", int(lens[s]), " bits");
  }
  TORCH_CHECK_VALUE(total_bits >= 0 && total_bits <= n * 12, "total_bits = ", total_bits, " is impossible for ",
                    n, " values");
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
  const char* error = dispatch_dfloat_bits(x.scalar_type(), "x", [&](auto type) {
    using Bits = typename decltype(type)::type;
    return cpu::dfloat::encode<Bits>(static_cast<const Bits*>(x.const_data_ptr()), n, lens,
                                     reinterpret_cast<const uint32_t*>(words), stream);
  });
  TORCH_CHECK_VALUE(error == nullptr, "dfloat encode: ", error);
  at::Tensor packed_gaps = at::empty({(windows + 1) / 2}, u8);
  cpu::pack_bits(gaps.const_data_ptr<uint8_t>(), packed_gaps.data_ptr<uint8_t>(), 1, windows, 4);
  return {codes, raw, packed_gaps, block_starts};
}

at::Tensor dfloat_decode_cpu(const at::Tensor& codes, const at::Tensor& raw, const at::Tensor& gaps,
                             const at::Tensor& block_starts, const at::Tensor& table, int64_t n,
                             at::ScalarType dtype, int64_t total_bits, int64_t window_bits,
                             int64_t windows_per_block, bool /*check: always, at no cost on the CPU*/) {
  check_dfloat_stream(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block);
  at::Tensor out = empty_for_writing(n, codes.options().dtype(dtype));
  const char* error = dispatch_dfloat_bits(dtype, "dtype", [&](auto type) {
    using Bits = typename decltype(type)::type;
    return cpu::dfloat::decode<Bits>(codes.const_data_ptr<uint8_t>(), codes.numel(), raw.const_data_ptr<uint8_t>(),
                                gaps.const_data_ptr<uint8_t>(), block_starts.const_data_ptr<int64_t>(),
                                table.const_data_ptr<int16_t>(), n, total_bits, window_bits, windows_per_block,
                                static_cast<Bits*>(out.data_ptr()));
  });
  TORCH_CHECK_VALUE(error == nullptr, kCorrupted, "dfloat stream: ", error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("dfloat_histogram", &dfloat_histogram_cpu);
  m.impl("dfloat_encode", &dfloat_encode_cpu);
  m.impl("dfloat_decode", &dfloat_decode_cpu);
}

}  // namespace lowbit
