// CUDA kernels of the int8 family (LLM.int8() decomposition): the activation pre-pass
// (lowbit::int8_prepass) and the weight-only small-batch GEMV (lowbit::int8_gemv).
// Spec: python/lowbit/reference/int8.py; the pre-pass's per-element steps are csrc/common/int8.h.
//
// Pre-pass: who owns what. A group of G threads (a power of two, 32 .. 512, sized to the row) owns
// one row of x at a time; a CTA holds max(1, 128 / G) groups, and the grid strides over the rows.
// Thread t of a group owns vectors t, t + G, ..., t + (kPrepassRegs - 1) G of a pass (a vector: V
// elements, 16 bytes when the row allows), so that every load and store of the group is coalesced:
//   1. it loads its vectors of x and of static_mask into registers, folds the absmax of its int
//      elements (common absmax_step: NaN wins) and sets col_flags at its outliers;
//   2. the group reduces the absmax (warp shuffles, then shared memory across the group's warps);
//   3. it quantizes its elements from the registers and stores xq; thread 0 stores row_scale, and
//      the group gathers the row's static columns into x_static.
// A row of up to 512 * kPrepassRegs vectors (32768 16-bit or 16384 fp32 elements with 16-byte
// vectors) is read once; a longer one is read in passes, the last of which stays in registers
// while the earlier ones are read again (from L2) in step 3.
//
// GEMV: who owns what. A CTA of W warps (1 .. 8, by in_features) owns kGemvRowsPerCta output rows
// n and all rows m of x (up to kGemvMaxRows, the accumulators acc[r][m] templated on their number).
// Lane l of warp w takes chunks of 8 weight bytes (one 8-byte load per row n) w * 32 + l, then
// + 32 W, ..., so that a warp reads 256 contiguous bytes of each weight row per step, and the 8 x
// elements of the chunk for each m with one 16-byte load (two for fp32) that the warp's lanes make
// contiguous; x is small and shared by every CTA, so those loads hit L1 / L2, while the weight,
// read once, is loaded with the streaming hint. The warp sums its lanes with shuffles, the CTA its
// warps through shared memory, then one thread per (n, m) applies the scale, adds the static
// columns' product (summed the same way) and the bias, and casts, in the reference's order.
#include "int8.h"

#include <cuda_fp16.h>
#include <type_traits>

#include "../common/int8.h"

namespace lowbit::cuda::int8 {
namespace {

namespace common = ::lowbit::int8;

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// ---- element types -------------------------------------------------------------------------------

template <DType K>
struct Float;

template <>
struct Float<DType::kBFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kNaN = 0x7FC0;
  static __device__ __forceinline__ float of(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  // Two elements packed in a word, low half first.
  static __device__ __forceinline__ void pair(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xFFFF0000u);
  }
  // Round to nearest even, as torch's float -> bfloat16 cast.
  static __device__ __forceinline__ Bits from(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return kNaN;
    return static_cast<Bits>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Float<DType::kFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kNaN = 0x7E00;
  static __device__ __forceinline__ float of(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ void pair(uint32_t w, float& lo, float& hi) {
    lo = of(static_cast<Bits>(w & 0xFFFFu));
    hi = of(static_cast<Bits>(w >> 16));
  }
  static __device__ __forceinline__ Bits from(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Float<DType::kFloat32> {
  using Bits = uint32_t;
  static constexpr Bits kNaN = 0x7FC00000u;
  static __device__ __forceinline__ float of(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from(float v) { return __float_as_uint(v); }
};

// BYTES (1 .. 16) contiguous bytes in 32-bit words, loaded with one access (a vector load for 8 and
// 16), and read back as fields of 8, 16 or 32 bits, the first in the low bits of word 0.
template <int BYTES>
struct Words {
  static constexpr int kWords = BYTES >= 4 ? BYTES / 4 : 1;
  uint32_t w[kWords];

  // The i-th group of BYTES bytes from base.
  __device__ __forceinline__ void load(const void* base, int64_t i) {
    if constexpr (BYTES == 16) {
      const uint4 t = __ldg(static_cast<const uint4*>(base) + i);
      w[0] = t.x, w[1] = t.y, w[2] = t.z, w[3] = t.w;
    } else if constexpr (BYTES == 8) {
      const uint2 t = __ldg(static_cast<const uint2*>(base) + i);
      w[0] = t.x, w[1] = t.y;
    } else if constexpr (BYTES == 4) {
      w[0] = __ldg(static_cast<const unsigned int*>(base) + i);
    } else if constexpr (BYTES == 2) {
      w[0] = __ldg(static_cast<const unsigned short*>(base) + i);
    } else {
      static_assert(BYTES == 1, "1, 2, 4, 8 or 16 bytes");
      w[0] = __ldg(static_cast<const unsigned char*>(base) + i);
    }
  }

  template <int BITS>
  __device__ __forceinline__ uint32_t field(int e) const {
    if constexpr (BITS == 32) {
      return w[e];
    } else {
      return (w[e * BITS / 32] >> (e * BITS % 32)) & ((1u << BITS) - 1u);
    }
  }
};

// Stores BYTES (1, 4 or 8) bytes, given as words, at the i-th group of BYTES bytes from base.
template <int BYTES>
__device__ __forceinline__ void store_words(void* base, int64_t i, const uint32_t (&w)[Words<BYTES>::kWords]) {
  if constexpr (BYTES == 8) {
    static_cast<uint2*>(base)[i] = make_uint2(w[0], w[1]);
  } else if constexpr (BYTES == 4) {
    static_cast<uint32_t*>(base)[i] = w[0];
  } else {
    static_assert(BYTES == 1, "1, 4 or 8 bytes");
    static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(w[0]);
  }
}

__device__ __forceinline__ float absmax_warp(float a) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) a = common::absmax_step(a, __shfl_xor_sync(kFullMask, a, d));
  return a;
}

// ---- pre-pass --------------------------------------------------------------------------------------

constexpr int kPrepassRegs = 8;       // vectors of x per thread and pass
constexpr int kPrepassMaxGroup = 512;  // threads per row at most
constexpr int kPrepassThreads = 128;   // CTA size when a row needs fewer threads

// The outlier test, in fp32 with the threshold rounded to fp32, as the reference does (a threshold
// that rounds to 0 or less turns the split off).
struct Split {
  float threshold;

  __device__ __forceinline__ bool outlier(float v) const { return common::is_outlier(v, threshold); }
};

// V elements per vector: x vectors of V * sizeof(Bits) bytes, mask and xq vectors of V bytes.
template <DType K, int V>
__global__ void __launch_bounds__(kPrepassMaxGroup)
    prepass_kernel(const typename Float<K>::Bits* __restrict__ x, const uint8_t* __restrict__ static_mask,
                   const int32_t* __restrict__ static_idx, int8_t* __restrict__ xq, float* __restrict__ row_scale,
                   uint8_t* __restrict__ col_flags, typename Float<K>::Bits* __restrict__ x_static, int64_t rows,
                   int64_t cols, int64_t statics, Split split, int group_threads) {
  using F = Float<K>;
  using Bits = typename F::Bits;
  constexpr int kBits = 8 * sizeof(Bits);
  using XVec = Words<V * sizeof(Bits)>;
  using MVec = Words<V>;
  // The absmax of each warp, double-buffered by row so that a group can write the next row's
  // while a slower group of the CTA still reads this row's (the barrier between them orders it).
  __shared__ float warp_absmax[2][32];

  const int groups = static_cast<int>(blockDim.x) / group_threads;
  const int gi = static_cast<int>(threadIdx.x) / group_threads;
  const int tid = static_cast<int>(threadIdx.x) - gi * group_threads;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int group_warps = group_threads >> 5;  // >= 1: G is a multiple of 32
  const int64_t vecs = cols / V;
  const int64_t per_pass = int64_t(group_threads) * kPrepassRegs;
  const int64_t passes = (vecs + per_pass - 1) / per_pass;

  int parity = 0;
  for (int64_t first = int64_t(blockIdx.x) * groups; first < rows; first += int64_t(gridDim.x) * groups) {
    const int64_t row = first + gi;
    const bool active = row < rows;  // the whole group; idle groups still take the barrier
    const Bits* xr = x + row * cols;

    XVec v[kPrepassRegs];
    MVec m[kPrepassRegs];
    const auto load = [&](int64_t pass) {
#pragma unroll
      for (int j = 0; j < kPrepassRegs; ++j) {
        const int64_t i = pass * per_pass + int64_t(j) * group_threads + tid;
        if (i < vecs) {
          v[j].load(xr, i);
          m[j].load(static_mask, i);
        }
      }
    };

    // 1. absmax of the int elements and the outlier columns.
    float absmax = 0.0f;
    if (active) {
      for (int64_t pass = 0; pass < passes; ++pass) {
        load(pass);
#pragma unroll
        for (int j = 0; j < kPrepassRegs; ++j) {
          const int64_t i = pass * per_pass + int64_t(j) * group_threads + tid;
          if (i < vecs) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              if (m[j].template field<8>(e) != 0) continue;  // static column: neither int nor outlier
              const float f = F::of(static_cast<Bits>(v[j].template field<kBits>(e)));
              if (split.outlier(f)) {
                col_flags[i * V + e] = 1;  // every writer stores the same value
              } else {
                absmax = common::absmax_step(absmax, f);
              }
            }
          }
        }
      }
    }

    // 2. the group's absmax.
    absmax = absmax_warp(absmax);
    if (group_warps > 1) {
      if (lane == 0) warp_absmax[parity][warp] = absmax;
      __syncthreads();
      absmax = 0.0f;
      for (int w = 0; w < group_warps; ++w) {
        absmax = common::absmax_step(absmax, warp_absmax[parity][gi * group_warps + w]);
      }
      parity ^= 1;
    }

    // 3. quantize from the registers (the last pass) or from x again (earlier passes).
    if (active) {
      const float inv = common::inverse_scale(absmax);
      if (tid == 0) row_scale[row] = absmax / common::QMAX;
      int8_t* q = xq + row * cols;
      for (int64_t pass = passes - 1; pass >= 0; --pass) {
        if (pass != passes - 1) load(pass);
#pragma unroll
        for (int j = 0; j < kPrepassRegs; ++j) {
          const int64_t i = pass * per_pass + int64_t(j) * group_threads + tid;
          if (i < vecs) {
            uint32_t out[MVec::kWords] = {};
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float f = F::of(static_cast<Bits>(v[j].template field<kBits>(e)));
              const bool zero = m[j].template field<8>(e) != 0 || split.outlier(f);
              const int8_t b = zero ? int8_t(0) : common::quantize(f, inv);
              out[e / 4] |= uint32_t(static_cast<uint8_t>(b)) << (8 * (e % 4));
            }
            store_words<V>(q, i, out);
          }
        }
      }
      Bits* s = x_static + row * statics;
      for (int64_t j = tid; j < statics; j += group_threads) {
        const int32_t k = __ldg(static_idx + j);
        s[j] = k >= 0 && k < cols ? xr[k] : F::kNaN;
      }
    }
  }
}

// ---- GEMV ------------------------------------------------------------------------------------------

constexpr int kGemvRowsPerCta = 2;  // output rows n per CTA: each x load serves both
constexpr int kGemvMaxWarps = 8;

// int8 -> float for the 4 bytes of w: byte e is biased to unsigned (xor 0x80) and placed in the
// mantissa of 2^23 (exponent byte 0x4B), so the float is 2^23 + 128 + value; one subtraction, exact,
// recovers the value (cheaper than the I2F conversion, which runs at a quarter rate).
__device__ __forceinline__ void int8x4_to_float(uint32_t w, float* f) {
  const uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (int e = 0; e < 4; ++e) f[e] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | e)) - 8388736.0f;
}

// The 8 (CH = 8) or 1 (CH = 1) weight bytes of a chunk.
template <int CH>
struct WChunk;

template <>
struct WChunk<8> {
  uint2 w;
  static __device__ __forceinline__ WChunk load(const int8_t* row, int64_t c) {
    return {__ldcs(reinterpret_cast<const uint2*>(row) + c)};
  }
  static __device__ __forceinline__ WChunk zero() { return {make_uint2(0u, 0u)}; }
  __device__ __forceinline__ void floats(float* f) const {
    int8x4_to_float(w.x, f);
    int8x4_to_float(w.y, f + 4);
  }
};

template <>
struct WChunk<1> {
  int8_t w;
  static __device__ __forceinline__ WChunk load(const int8_t* row, int64_t c) { return {row[c]}; }
  static __device__ __forceinline__ WChunk zero() { return {0}; }
  __device__ __forceinline__ void floats(float* f) const { f[0] = static_cast<float>(w); }
};

// The CH elements of row m of x at chunk c, as floats.
template <DType K, int CH>
__device__ __forceinline__ void x_chunk(const typename Float<K>::Bits* x, int64_t c, float* f) {
  using F = Float<K>;
  if constexpr (CH == 1) {
    f[0] = F::of(__ldg(x + c));
  } else if constexpr (K == DType::kFloat32) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(x) + 2 * c);
    const float4 b = __ldg(reinterpret_cast<const float4*>(x) + 2 * c + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  } else {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(x) + c);
    F::pair(a.x, f[0], f[1]);
    F::pair(a.y, f[2], f[3]);
    F::pair(a.z, f[4], f[5]);
    F::pair(a.w, f[6], f[7]);
  }
}

// Sums acc over the CTA into sums[r * MT + m] (shared); rows m >= rows hold zeros and are skipped.
// Ends with a barrier, after which every thread may read sums.
template <int R, int MT>
__device__ __forceinline__ void cta_sum(float (&acc)[R][MT], int rows, float (*partial)[R * MT], float* sums) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) {
        float s = acc[r][m];
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(kFullMask, s, d);
        if (lane == 0) partial[warp][r * MT + m] = s;
      }
    }
  }
  __syncthreads();
  const int t = static_cast<int>(threadIdx.x);
  if (t < R * MT && t % MT < rows) {
    float s = partial[0][t];
    for (int w = 1; w < warps; ++w) s += partial[w][t];
    sums[t] = s;
  }
  __syncthreads();
}

template <DType K, int MT, int CH>
__global__ void __launch_bounds__(kGemvMaxWarps * 32)
    gemv_kernel(const typename Float<K>::Bits* __restrict__ x, const int8_t* __restrict__ weight,
                const float* __restrict__ weight_scale, const int32_t* __restrict__ static_idx,
                const typename Float<K>::Bits* __restrict__ static_weight, const typename Float<K>::Bits* __restrict__ bias,
                typename Float<K>::Bits* __restrict__ y, int rows, int64_t in, int64_t out, int64_t statics) {
  using F = Float<K>;
  using W = WChunk<CH>;
  constexpr int R = kGemvRowsPerCta;
  constexpr int U = MT <= 4 ? 4 : 2;  // chunks per lane whose weight loads are in flight together
  __shared__ float partial[kGemvMaxWarps][R * MT];
  __shared__ float dot[R * MT];
  __shared__ float static_dot[R * MT];

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  bool row_ok[R];
  const int8_t* w_row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ok[r] = n0 + r < out;
    w_row[r] = weight + (row_ok[r] ? n0 + r : n0) * in;
  }

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
  }

  const int64_t chunks = in / CH;
  const int64_t stride = int64_t(blockDim.x);
  for (int64_t c0 = int64_t(warp) * 32 + lane; c0 < chunks; c0 += U * stride) {
    W w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * stride;
#pragma unroll
      for (int r = 0; r < R; ++r) w[u][r] = c < chunks && row_ok[r] ? W::load(w_row[r], c) : W::zero();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * stride;
      if (c < chunks) {
        float wf[R][CH];
#pragma unroll
        for (int r = 0; r < R; ++r) w[u][r].floats(wf[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < rows) {
            float xf[CH];
            x_chunk<K, CH>(x + m * in, c, xf);
#pragma unroll
            for (int e = 0; e < CH; ++e) {
#pragma unroll
              for (int r = 0; r < R; ++r) acc[r][m] = fmaf(xf[e], wf[r][e], acc[r][m]);
            }
          }
        }
      }
    }
  }
  cta_sum<R, MT>(acc, rows, partial, dot);

  // The static columns: x[m, static_idx[j]] * static_weight[n, j], j over the CTA's threads.
  if (statics > 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    }
    for (int64_t j = threadIdx.x; j < statics; j += blockDim.x) {
      const int32_t k = __ldg(static_idx + j);
      const bool valid = k >= 0 && k < in;
      float sw[R];
#pragma unroll
      for (int r = 0; r < R; ++r) sw[r] = row_ok[r] ? F::of(__ldg(static_weight + (n0 + r) * statics + j)) : 0.0f;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < rows) {
          const float xf = valid ? F::of(__ldg(x + m * in + k)) : __uint_as_float(0x7FC00000u);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][m] = fmaf(xf, sw[r], acc[r][m]);
        }
      }
    }
    cta_sum<R, MT>(acc, rows, partial, static_dot);
  }

  // Epilogue, in the reference's order: (dot * scale) + static product + bias, then one cast. The
  // explicit roundings keep the compiler from fusing the first two into an FMA.
  const int t = static_cast<int>(threadIdx.x);
  if (t < R * MT) {
    const int r = t / MT, m = t % MT;
    const int64_t n = n0 + r;
    if (m < rows && row_ok[r]) {
      float v = __fmul_rn(dot[t], __ldg(weight_scale + n));
      v = __fadd_rn(v, statics > 0 ? static_dot[t] : 0.0f);
      if (bias != nullptr) v = __fadd_rn(v, F::of(__ldg(bias + n)));
      y[m * out + n] = F::from(v);
    }
  }
}

// ---- host side -------------------------------------------------------------------------------------

bool aligned(const void* p, uintptr_t to) { return (reinterpret_cast<uintptr_t>(p) & (to - 1)) == 0; }

// The threshold as the reference compares it with x.float(): rounded to fp32.
Split make_split(double threshold) { return {static_cast<float>(threshold)}; }

template <DType K, int V>
cudaError_t prepass_launch(const void* x, const uint8_t* static_mask, const int32_t* static_idx, int64_t rows,
                           int64_t cols, int64_t statics, Split split, int8_t* xq, float* row_scale,
                           uint8_t* col_flags, void* x_static, cudaStream_t stream) {
  using Bits = typename Float<K>::Bits;
  const int64_t vecs = cols / V;
  const int64_t wanted = (vecs + kPrepassRegs - 1) / kPrepassRegs;
  int group = 32;
  while (group < wanted && group < kPrepassMaxGroup) group *= 2;
  const int threads = group < kPrepassThreads ? kPrepassThreads : group;
  const int groups = threads / group;
  const int64_t ctas = (rows + groups - 1) / groups;
  const int grid = static_cast<int>(ctas < (int64_t(1) << 30) ? ctas : (int64_t(1) << 30));
  prepass_kernel<K, V><<<grid, threads, 0, stream>>>(static_cast<const Bits*>(x), static_mask, static_idx, xq,
                                                     row_scale, col_flags, static_cast<Bits*>(x_static), rows, cols,
                                                     statics, split, group);
  return cudaGetLastError();
}

// 16-byte vectors where the row length and the buffers allow, else one element at a time.
template <DType K>
cudaError_t prepass_typed(const void* x, const uint8_t* static_mask, const int32_t* static_idx, int64_t rows,
                          int64_t cols, int64_t statics, Split split, int8_t* xq, float* row_scale,
                          uint8_t* col_flags, void* x_static, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(typename Float<K>::Bits);
  if (cols % V == 0 && aligned(x, 16) && aligned(static_mask, V) && aligned(xq, V)) {
    return prepass_launch<K, V>(x, static_mask, static_idx, rows, cols, statics, split, xq, row_scale, col_flags,
                                x_static, stream);
  }
  return prepass_launch<K, 1>(x, static_mask, static_idx, rows, cols, statics, split, xq, row_scale, col_flags,
                              x_static, stream);
}

template <DType K, int MT, int CH>
cudaError_t gemv_launch(const void* x, const int8_t* weight, const float* weight_scale, const int32_t* static_idx,
                        const void* static_weight, const void* bias, int rows, int64_t in, int64_t out,
                        int64_t statics, void* y, cudaStream_t stream) {
  using Bits = typename Float<K>::Bits;
  // Warps split in_features: enough that each lane has about two chunks, at most kGemvMaxWarps.
  const int64_t chunks = in / CH;
  int warps = 1;
  while (warps < kGemvMaxWarps && int64_t(warps) * 2 * 64 <= chunks) warps *= 2;
  const int64_t ctas = (out + kGemvRowsPerCta - 1) / kGemvRowsPerCta;
  gemv_kernel<K, MT, CH><<<static_cast<unsigned>(ctas), warps * 32, 0, stream>>>(
      static_cast<const Bits*>(x), weight, weight_scale, static_idx, static_cast<const Bits*>(static_weight),
      static_cast<const Bits*>(bias), static_cast<Bits*>(y), rows, in, out, statics);
  return cudaGetLastError();
}

template <DType K, int CH>
cudaError_t gemv_rows(const void* x, const int8_t* weight, const float* weight_scale, const int32_t* static_idx,
                      const void* static_weight, const void* bias, int rows, int64_t in, int64_t out, int64_t statics,
                      void* y, cudaStream_t stream) {
  const auto go = [&](auto mt) {
    return gemv_launch<K, decltype(mt)::value, CH>(x, weight, weight_scale, static_idx, static_weight, bias, rows, in,
                                                   out, statics, y, stream);
  };
  if (rows <= 1) return go(std::integral_constant<int, 1>{});
  if (rows <= 2) return go(std::integral_constant<int, 2>{});
  if (rows <= 4) return go(std::integral_constant<int, 4>{});
  if (rows <= 8) return go(std::integral_constant<int, 8>{});
  return go(std::integral_constant<int, 16>{});
}

template <DType K>
cudaError_t gemv_typed(const void* x, const int8_t* weight, const float* weight_scale, const int32_t* static_idx,
                       const void* static_weight, const void* bias, int64_t rows, int64_t in, int64_t out,
                       int64_t statics, void* y, cudaStream_t stream) {
  using Bits = typename Float<K>::Bits;
  const bool vec = in % 8 == 0 && aligned(x, 16) && aligned(weight, 8);
  cudaError_t err = cudaSuccess;
  for (int64_t m0 = 0; err == cudaSuccess && m0 < rows; m0 += kGemvMaxRows) {
    const int batch = static_cast<int>(rows - m0 < kGemvMaxRows ? rows - m0 : kGemvMaxRows);
    const Bits* xs = static_cast<const Bits*>(x) + m0 * in;
    Bits* ys = static_cast<Bits*>(y) + m0 * out;
    err = vec ? gemv_rows<K, 8>(xs, weight, weight_scale, static_idx, static_weight, bias, batch, in, out, statics, ys,
                                stream)
              : gemv_rows<K, 1>(xs, weight, weight_scale, static_idx, static_weight, bias, batch, in, out, statics, ys,
                                stream);
  }
  return err;
}

}  // namespace

cudaError_t prepass(DType dtype, const void* x, const uint8_t* static_mask, const int32_t* static_idx, int64_t rows,
                    int64_t cols, int64_t statics, double threshold, int8_t* xq, float* row_scale, uint8_t* col_flags,
                    void* x_static, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || statics < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const Split split = make_split(threshold);
  switch (dtype) {
    case DType::kBFloat16:
      return prepass_typed<DType::kBFloat16>(x, static_mask, static_idx, rows, cols, statics, split, xq, row_scale,
                                             col_flags, x_static, stream);
    case DType::kFloat16:
      return prepass_typed<DType::kFloat16>(x, static_mask, static_idx, rows, cols, statics, split, xq, row_scale,
                                            col_flags, x_static, stream);
    case DType::kFloat32:
      return prepass_typed<DType::kFloat32>(x, static_mask, static_idx, rows, cols, statics, split, xq, row_scale,
                                            col_flags, x_static, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gemv(DType dtype, const void* x, const int8_t* weight, const float* weight_scale,
                 const int32_t* static_idx, const void* static_weight, const void* bias, int64_t rows,
                 int64_t in_features, int64_t out_features, int64_t statics, void* y, cudaStream_t stream) {
  if (rows < 0 || in_features < 0 || out_features < 0 || statics < 0) return cudaErrorInvalidValue;
  // One CTA per kGemvRowsPerCta output rows: the grid's x dimension bounds out_features.
  if ((out_features + kGemvRowsPerCta - 1) / kGemvRowsPerCta > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (rows == 0 || out_features == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return gemv_typed<DType::kBFloat16>(x, weight, weight_scale, static_idx, static_weight, bias, rows, in_features,
                                          out_features, statics, y, stream);
    case DType::kFloat16:
      return gemv_typed<DType::kFloat16>(x, weight, weight_scale, static_idx, static_weight, bias, rows, in_features,
                                         out_features, statics, y, stream);
    case DType::kFloat32:
      return gemv_typed<DType::kFloat32>(x, weight, weight_scale, static_idx, static_weight, bias, rows, in_features,
                                         out_features, statics, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowbit::cuda::int8
