// The per-element steps of the int8 activation pre-pass (LLM.int8() decomposition), shared by the
// CPU and CUDA kernels. The spec is python/lowbit/reference/int8.py; docs/formats.md ("int8").
//
// For a row x[0 .. K) with threshold t and static columns marked by static_mask:
//   an element of a non-static column is an outlier when t > 0 and |x| >= t;
//   the others (the "int" elements) give absmax = max |x| over them (NaN if one is NaN);
//   row_scale = absmax / 127 and each int element becomes rint(x * (127 / absmax)) in [-127, 127]
//   (0 where that product is not finite); outliers and static columns become 0.
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace lowbit::int8 {

constexpr float QMAX = 127.0f;

LOWBIT_HD bool is_outlier(float v, float threshold) {
  return threshold > 0.0f && fabsf(v) >= threshold;
}

// Folds |v| into a running absmax so that NaN wins (a row with NaN gets a NaN scale).
LOWBIT_HD float absmax_step(float running, float v) {
  const float a = fabsf(v);
  return (a > running || a != a) && running == running ? a : running;
}

// The multiplier a row's int elements are scaled by before rounding.
LOWBIT_HD float inverse_scale(float absmax) { return QMAX / absmax; }

// rint(v * inv) clamped to [-127, 127]; 0 when the product is not finite. Written with selects and
// the 1.5 * 2^23 rounding trick (exact round-half-to-even for |p| < 2^22) so that CPU compilers
// vectorize it without SSE4.1; clamping first is the same as clamping the rounded value.
LOWBIT_HD int8_t quantize(float v, float inv) {
#if defined(__CUDA_ARCH__)
  float p = __fmul_rn(v, inv);  // never fused with the addition below into one FMA
#else
  float p = v * inv;  // host builds use -ffp-contract=off
#endif
  p = fabsf(p) <= 3.4028235e38f ? p : 0.0f;  // NaN or +-Inf
  p = p < -QMAX ? -QMAX : p;
  p = p > QMAX ? QMAX : p;
  const float r = (p + 12582912.0f) - 12582912.0f;
  return static_cast<int8_t>(r);
}

}  // namespace lowbit::int8
