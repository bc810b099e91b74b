// C++ CPU kernels of the int8 family; see int8.h. The per-element rules come from
// csrc/common/int8.h, which the CUDA kernels use too. Loops are written without branches so that
// the compiler vectorizes them, once each for plain x86-64, AVX2 and AVX-512 (picked at run time);
// OpenMP splits rows (pre-pass, epilogue) or output features (gemv).
#include "int8.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/int8.h"
#include "int8_gemm.h"
#include "isa.h"

namespace lowbit::cpu::int8 {
namespace {

using lowbit::cpu::Isa;
using lowbit::cpu::cpu_isa;

using lowbit::int8::QMAX;

// Work below this many elements stays on one thread: waking the pool costs more.
constexpr int64_t kParallelMin = 1 << 15;

int threads_for(int64_t work) { return work >= kParallelMin ? omp_get_max_threads() : 1; }

template <typename T>
inline void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

namespace generic {
#include "int8_kernels.inc"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define LOWBIT_HAVE_AVX512_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define LOWBIT_INT8_AVX512_ROW 1
#include "int8_kernels.inc"
#undef LOWBIT_INT8_AVX512_ROW
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "int8_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The builds are called through LOWBIT_ISA_CALL (isa.h). -ffp-contract=off keeps every build's
// arithmetic the same, so the paths differ in speed only.

}  // namespace

template <typename T>
void prepass(const T* x, int64_t M, int64_t K, const uint8_t* static_mask, const int32_t* static_idx, int64_t S,
             float threshold, int8_t* xq, float* row_scale, uint8_t* col_flags, T* x_static) {
  LOWBIT_ISA_CALL(prepass<T>, x, M, K, static_mask, static_idx, S, threshold, xq, row_scale, col_flags, x_static);
}

template <typename Acc, typename T>
void epilogue(const Acc* acc, int64_t M, int64_t N, const float* row_scale, const float* weight_scale, Side dyn,
              Side stat, const T* bias, T* y) {
#ifdef LOWBIT_HAVE_AVX512_BUILD
  if (cpu_isa() == Isa::kAvx512) {
    return avx512::epilogue<Acc, T>(acc, M, N, row_scale, weight_scale, dyn, stat, bias, y);
  }
  if (cpu_isa() == Isa::kAvx2) return avx2::epilogue<Acc, T>(acc, M, N, row_scale, weight_scale, dyn, stat, bias, y);
#endif
  generic::epilogue<Acc, T>(acc, M, N, row_scale, weight_scale, dyn, stat, bias, y);
}

template <typename T>
void epilogue_block(const int32_t* c, int64_t ldc, int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N,
                    const float* row_scale, const float* weight_scale, Side dyn, Side stat, const float* bias, T* y) {
  LOWBIT_ISA_CALL(epilogue_block<T>, c, ldc, m0, rows, n0, cols, N, row_scale, weight_scale, dyn, stat, bias, y);
}

template <typename T>
void gemv(const T* x, int64_t M, int64_t K, const int8_t* weight, int64_t N, const float* weight_scale,
          const float* extra, const T* bias, T* y) {
  // AVX2 and AVX-512: the hand-vectorized AVX2 kernel of int8_gemm.cpp. The compiler's builds of
  // int8_kernels.inc convert int8 and x with scalar code on AVX2, and its AVX-512 build was measured
  // 2.2x slower than the AVX2 kernel at 1 row (4096 x 4096, Xeon with AVX-512, 2 threads).
  switch (cpu_isa()) {
    case Isa::kAvx512:
    case Isa::kAvx2: {
      std::vector<float> xf(static_cast<size_t>(M * K)), sums(static_cast<size_t>(M * N));
      to_float(x, M * K, xf.data());
      dots_avx2(xf.data(), M, K, weight, N, sums.data());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          float v = sums[m * N + n] * weight_scale[n];
          if (extra) v += extra[m * N + n];
          if (bias) v += static_cast<float>(bias[n]);
          y[m * N + n] = static_cast<T>(v);
        }
      }
      return;
    }
    default: return generic::gemv<T>(x, M, K, weight, N, weight_scale, extra, bias, y);
  }
}


#define LOWBIT_INT8_INSTANTIATE(T)                                                                               \
  template void prepass<T>(const T*, int64_t, int64_t, const uint8_t*, const int32_t*, int64_t, float, int8_t*, \
                           float*, uint8_t*, T*);                                                                \
  template void epilogue<int32_t, T>(const int32_t*, int64_t, int64_t, const float*, const float*, Side, Side,  \
                                     const T*, T*);                                                              \
  template void epilogue<float, T>(const float*, int64_t, int64_t, const float*, const float*, Side, Side,       \
                                   const T*, T*);                                                                \
  template void gemv<T>(const T*, int64_t, int64_t, const int8_t*, int64_t, const float*, const float*, const T*, \
                        T*);                                                                                     \
  template void epilogue_block<T>(const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,          \
                                  const float*, const float*, Side, Side, const float*, T*);
LOWBIT_INT8_INSTANTIATE(float)
LOWBIT_INT8_INSTANTIATE(c10::BFloat16)
LOWBIT_INT8_INSTANTIATE(c10::Half)
#undef LOWBIT_INT8_INSTANTIATE

}  // namespace lowbit::cpu::int8
