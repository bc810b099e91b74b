// Torch glue of bit packing on the CPU: lowbit::pack_bits, lowbit::unpack_bits.
#include <torch/library.h>

#include "bindings/common.h"
#include "cpu/bitpack.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
}

}  // namespace lowbit
