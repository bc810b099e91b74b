// Torch glue shared by every family's bindings: small argument checks and dtype dispatch.
// Each family's glue (csrc/bindings/<family>.cpp, <family>_cuda.cpp) registers its own kernels
// in its own TORCH_LIBRARY_IMPL block; the schemas are defined in python/lowbit/ops/<family>.py.
// Errors: TORCH_CHECK_TYPE (TypeError) for a dtype, TORCH_CHECK_VALUE (ValueError) for a shape or
// a value, and a ValueError starting with kCorrupted for corrupted data (lowbit raises FormatError).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "common/bitpack.h"

namespace lowbit {

// The prefix of every error about corrupted data; lowbit.ops turns it into lowbit.FormatError.
constexpr const char* kCorrupted = "corrupted ";

// A dtype as Python writes it ("torch.int32"), so that messages read the same from C++ and Python.
inline std::string dtype_name(at::ScalarType dtype) {
  return std::string("torch.") + std::string(c10::getDtypeNames(dtype).first);
}

template <typename T>
struct Type {
  using type = T;
};

// Calls fn(Type<T>{}) with the C++ type of a float dtype (float, c10::BFloat16, c10::Half); any
// other dtype is a TypeError naming the argument `name`.
template <typename Fn>
auto dispatch_float_dtype(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Type<float>{});
    case at::kBFloat16: return fn(Type<c10::BFloat16>{});
    case at::kHalf: return fn(Type<c10::Half>{});
    default: TORCH_CHECK_TYPE(false, name, " must be bfloat16, float16 or float32, got ", dtype_name(dtype));
  }
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits == 1 || bits == 2 || bits == 4 || bits == 8,
              "bits must be one of 1, 2, 4, 8, got ", bits);
}

inline void check_uint8(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least one dimension, got a 0-dim tensor");
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
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int64_t expected = packed_length(n, static_cast<int>(bits));
  TORCH_CHECK_VALUE(packed.size(-1) == expected, "packed has ", packed.size(-1),
              " bytes in its last dimension; ", n, " values of ", bits, " bits take ", expected);
}


}  // namespace lowbit
