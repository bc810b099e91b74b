// Argument checks shared by the torch glue of every device (bindings.cpp, bindings_cuda.cpp).
// The Python router checks the same things first; these keep the native ops safe when called
// directly through torch.ops.lowbit._*_native.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/bitpack.h"

namespace lowbit {

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8,
              "bits must be one of 1, 2, 4, 8, got ", bits);
}

inline void check_uint8(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got a 0-dim tensor");
}

// Rows of the last dimension.
inline int64_t leading_rows(const at::Tensor& t) {
  return t.numel() == 0 ? 0 : t.numel() / t.size(-1);
}

inline std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t n) {
  check_bits(bits);
  check_uint8(packed, "packed");
  TORCH_CHECK(n >= 0, "n must be >= 0, got ", n);
  const int64_t expected = packed_length(n, static_cast<int>(bits));
  TORCH_CHECK(packed.size(-1) == expected, "packed has ", packed.size(-1),
              " bytes in its last dimension; ", n, " values of ", bits, " bits take ", expected);
}

}  // namespace lowbit
