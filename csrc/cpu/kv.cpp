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

template void decode_attention<float>(const DecodeArgs<float>&);
template void decode_attention<c10::BFloat16>(const DecodeArgs<c10::BFloat16>&);
template void decode_attention<c10::Half>(const DecodeArgs<c10::Half>&);

}  // namespace lowbit::cpu::kv
