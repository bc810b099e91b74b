// Quantization of one group of the kv family's format (python/lowbit/reference/kv.py), shared by
// the C++ CPU kernel (csrc/cpu/kv.cpp) and the CUDA kernel (csrc/cuda/kv.cu), so that both follow
// the reference's rounding bit for bit:
//
//   zero  = min of the group, rounded down to the store dtype
//   scale = (max - zero) / (2^bits - 1), rounded up to the store dtype
//   code  = round_half_even((x - zero) / scale)   (fp32; 0 where the scale is 0)
//
// The store dtype is given by a traits type S with
//   S::Bits                          its bit pattern (uint16_t for bf16 / fp16, uint32_t for fp32)
//   S::kSign                         the sign bit of Bits
//   S::from_float(float) -> Bits     round to nearest even, as torch's cast
//   S::to_float(Bits) -> float       exact
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace lowbit::kv {

// The neighbour of a float's bit pattern toward -inf (down) or +inf, as torch.nextafter gives it:
// floats are sign-magnitude, so a step away from zero adds one to the magnitude, a step toward
// zero subtracts one, and either zero steps to the smallest subnormal of the side. Never called on
// NaN (the comparisons that ask for a step are false there).
template <typename Bits>
LOWBIT_HD Bits step_toward(Bits b, Bits sign, bool down) {
  if ((b & static_cast<Bits>(~sign)) == 0) return static_cast<Bits>(down ? (sign | 1u) : 1u);
  const bool negative = (b & sign) != 0;
  return static_cast<Bits>(negative == down ? b + 1u : b - 1u);
}

// v (fp32) in the store dtype, rounded down (or up) where the nearest value lies on the wrong side.
template <class S>
LOWBIT_HD typename S::Bits round_toward(float v, bool down) {
  const typename S::Bits s = S::from_float(v);
  const float f = S::to_float(s);
  return (down ? f > v : f < v) ? step_toward<typename S::Bits>(s, S::kSign, down) : s;
}

// Minimum and maximum of a group; a NaN anywhere makes both NaN, as torch.amin / amax propagate it.
struct Range {
  float lo = INFINITY, hi = -INFINITY;
  bool nan = false;

  LOWBIT_HD void add(float v) {
    nan |= v != v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
};

// A group's zero and scale (store dtype bits) and their fp32 values, which the codes use.
template <class S>
struct GroupScale {
  typename S::Bits zero_bits, scale_bits;
  float zero, scale;
};

template <class S>
LOWBIT_HD GroupScale<S> group_scale(Range range, int bits) {
  const float lo = range.nan ? NAN : range.lo, hi = range.nan ? NAN : range.hi;
  GroupScale<S> g;
  g.zero_bits = round_toward<S>(lo, true);
  g.zero = S::to_float(g.zero_bits);
  g.scale_bits = round_toward<S>((hi - g.zero) / static_cast<float>((1 << bits) - 1), false);
  g.scale = S::to_float(g.scale_bits);
  return g;
}

// The code of x in its group: round half to even, 0 where the scale is 0. Only non-finite inputs
// can leave [0, 2^bits - 1] (zero rounded down and scale up keep the others in it); they are
// clamped (NaN to 0), as the reference does.
template <class S>
LOWBIT_HD uint8_t code_of(float x, const GroupScale<S>& g, int bits) {
  float q = g.scale > 0.f ? rintf((x - g.zero) / g.scale) : 0.f;
  const float qmax = static_cast<float>((1 << bits) - 1);
  q = q != q ? 0.f : (q < 0.f ? 0.f : (q > qmax ? qmax : q));
  return static_cast<uint8_t>(q);
}

}  // namespace lowbit::kv
