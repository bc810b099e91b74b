// C++ CPU kernels of the kv family; see kv.h. kv_kernels.inc is built once per ISA (plain x86-64,
// AVX2, AVX-512) and the build of cpu_isa() runs.
#include "kv.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/kv.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// The kernels pass GCC vector types between inline functions of one build; GCC notes that their
// ABI differs between builds, which no call across builds depends on.
#pragma GCC diagnostic ignored "-Wpsabi"
// gcc 12's intrinsics leave the upper half of a widened register undefined on purpose, which its
// own -Wuninitialized then reports where the code is inlined.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lowbit::cpu::kv {
namespace {

namespace generic {
#define LOWBIT_KV_ISA 0
#include "kv_kernels.inc"
#undef LOWBIT_KV_ISA
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)  // the builds LOWBIT_ISA_CALL (isa.h) calls
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define LOWBIT_KV_ISA 2
#include "kv_kernels.inc"
#undef LOWBIT_KV_ISA
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define LOWBIT_KV_ISA 1
#include "kv_kernels.inc"
#undef LOWBIT_KV_ISA
}  // namespace avx2
#pragma GCC pop_options
#endif

// Tokens per split of one KV head's work at the least: below that, the merge and the per-task
// set-up cost more than the parallelism gains.
constexpr int64_t kMinSplitTokens = 512;

}  // namespace

template <typename T>
void decode_attention(const DecodeArgs<T>& a) {
  const int64_t qpg = a.Hq / a.Hkv, nq = qpg * a.L, D = a.D, G = a.G;
  const int64_t total = a.nb * G + a.r, chunks = (total + G - 1) / G;
  const int threads = omp_get_max_threads();
  // Splits of whole chunks, enough that every thread has work when there are few KV heads.
  const int64_t heads = a.B * a.Hkv;
  const int64_t splits = std::clamp<int64_t>((2 * threads + heads - 1) / heads, 1,
                                             std::max<int64_t>(1, total / kMinSplitTokens));
  const int64_t tasks = heads * splits;
  std::vector<float> m(static_cast<size_t>(tasks * nq)), l(m.size()), acc(static_cast<size_t>(tasks * nq * D));
#pragma omp parallel for schedule(dynamic, 1) num_threads(tasks > 1 && total * nq * D >= (1 << 14) ? threads : 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t head = task / splits, split = task % splits;
    const int64_t t0 = std::min(total, chunks * split / splits * G), t1 = std::min(total, chunks * (split + 1) / splits * G);
    LOWBIT_ISA_CALL(attend<T>, a, head / a.Hkv, head % a.Hkv, t0, t1, m.data() + task * nq, l.data() + task * nq,
                    acc.data() + task * nq * D);
  }
  // Merge the splits: each rescaled from its maximum to the overall one.
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t b = head / a.Hkv, hk = head % a.Hkv;
    for (int64_t qi = 0; qi < nq; ++qi) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < splits; ++s) top = std::max(top, m[(head * splits + s) * nq + qi]);
      std::vector<float> o(static_cast<size_t>(D), 0.f);
      float sum = 0.f;
      if (top != -std::numeric_limits<float>::infinity()) {
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t at = (head * splits + s) * nq + qi;
          if (m[at] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(m[at] - top);
          sum += l[at] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += acc[at * D + d] * w;
        }
      }
      const int64_t h = hk * qpg + qi / a.L, li = qi % a.L;
      T* out = a.out + ((b * a.Hq + h) * a.L + li) * D;
      const int64_t per = 8 / a.bits;  // acc holds each group's channels in slot order
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(sum > 0.f ? o[slot_order(d, G, per)] / sum : 0.f);
    }
  }
}

namespace {

// The store dtype T as csrc/common/kv.h reads it: its bits, and torch's conversions.
template <typename T>
struct Store {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static Bits from_float(float v) {
    const T s = static_cast<T>(v);
    Bits b;
    std::memcpy(&b, &s, 2);
    return b;
  }
  static float to_float(Bits b) {
    T s;
    std::memcpy(&s, &b, 2);
    return static_cast<float>(s);
  }
};

template <>
struct Store<float> {
  using Bits = uint32_t;
  static constexpr Bits kSign = 0x80000000u;
  static Bits from_float(float v) {
    Bits b;
    std::memcpy(&b, &v, 4);
    return b;
  }
  static float to_float(Bits b) {
    float v;
    std::memcpy(&v, &b, 4);
    return v;
  }
};

// One group of n values (stride apart) -> codes [n] (0..2^bits-1), and its scale and zero.
template <typename T>
void quantize_group(const T* x, int64_t n, int64_t stride, int bits, uint8_t* codes, T* scale, T* zero) {
  using S = Store<T>;
  ::lowbit::kv::Range range;
  for (int64_t i = 0; i < n; ++i) range.add(static_cast<float>(x[i * stride]));
  const auto g = ::lowbit::kv::group_scale<S>(range, bits);
  std::memcpy(zero, &g.zero_bits, sizeof(T));
  std::memcpy(scale, &g.scale_bits, sizeof(T));
  for (int64_t i = 0; i < n; ++i) codes[i] = ::lowbit::kv::code_of<S>(static_cast<float>(x[i * stride]), g, bits);
}

// codes [n] (n a multiple of 8 / bits) packed into n * bits / 8 bytes, the lowest index lowest.
inline void pack(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  const int per = 8 / bits;
  for (int64_t k = 0; k < n / per; ++k) {
    unsigned byte = 0;
    for (int j = 0; j < per; ++j) byte |= static_cast<unsigned>(codes[k * per + j]) << (j * bits);
    out[k] = static_cast<uint8_t>(byte);
  }
}

}  // namespace

template <typename T>
void quantize(const T* keys, const T* values, int64_t B, int64_t H, int64_t tokens, int64_t D, int64_t G, int bits,
              uint8_t* k_codes, T* k_scale, T* k_zero, uint8_t* v_codes, T* v_scale, T* v_zero) {
  const int64_t nb = tokens / G, pk = G * bits / 8, pv = D * bits / 8, jobs = B * H * nb;
#pragma omp parallel num_threads(jobs * G * D >= (1 << 15) ? omp_get_max_threads() : 1)
  {
    std::vector<uint8_t> codes(static_cast<size_t>(std::max(G, D)));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t bh = job / nb, j = job % nb;
      const T* k = keys + (bh * tokens + j * G) * D;
      for (int64_t d = 0; d < D; ++d) {  // keys: per channel over the block's tokens
        const int64_t at = (bh * nb + j) * D + d;
        quantize_group(k + d, G, D, bits, codes.data(), k_scale + at, k_zero + at);
        pack(codes.data(), G, bits, k_codes + at * pk);
      }
      for (int64_t t = j * G; t < (j + 1) * G; ++t) {  // values: per token over groups of channels
        const T* v = values + (bh * tokens + t) * D;
        for (int64_t g = 0; g < D / G; ++g) {
          const int64_t at = (bh * tokens + t) * (D / G) + g;
          quantize_group(v + g * G, G, 1, bits, codes.data() + g * G, v_scale + at, v_zero + at);
        }
        pack(codes.data(), D, bits, v_codes + (bh * tokens + t) * pv);
      }
    }
  }
}

template void quantize<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int, uint8_t*,
                              float*, float*, uint8_t*, float*, float*);
template void quantize<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                                      int64_t, int, uint8_t*, c10::BFloat16*, c10::BFloat16*, uint8_t*,
                                      c10::BFloat16*, c10::BFloat16*);
template void quantize<c10::Half>(const c10::Half*, const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                                  uint8_t*, c10::Half*, c10::Half*, uint8_t*, c10::Half*, c10::Half*);

template void decode_attention<float>(const DecodeArgs<float>&);
template void decode_attention<c10::BFloat16>(const DecodeArgs<c10::BFloat16>&);
template void decode_attention<c10::Half>(const DecodeArgs<c10::Half>&);

}  // namespace lowbit::cpu::kv
