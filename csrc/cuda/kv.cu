// CUDA kernels of the kv family (KIVI-layout quantized KV cache): decode attention over the packed
// blocks and the residual window (lowbit::kv_decode_attention), and the quantize+pack of whole
// blocks (lowbit::kv_quantize). Spec: python/lowbit/reference/kv.py; format: docs/formats.md ("kv").
//
// Decode attention (flash-decoding): a split kernel, then a merge kernel.
//
// Split kernel: who owns what. A CTA of 4 warps owns one KV head (batch row b, head hk), one tile
// of QT = 4 ROWS query rows (row q: query head hk * Hq / Hkv + q / L, position q % L; all the query
// heads of the group share the CTA, so the head's packed data is read once per query tile) and one
// split of the head's tokens. It walks the split's token tiles of 32 (the packed tokens, then the
// residual window, never both in one tile):
//   1. the CTA dequantizes the tile's keys and values into shared memory, fp32, as the reference
//      does (code * scale + zero, the product then the sum rounded, no FMA): a thread takes one
//      code byte (P = 8 / bits codes: P tokens of one key channel, or P channels of one token's
//      values) with its scale and zero, or one residual element;
//   2. warp w owns query rows w, w + 4, ...: lane t computes the scores of token t for them (the
//      query, pre-scaled, in shared memory), masks them, and the warp runs the online softmax
//      update of each row with shuffles (max, rescale, sum);
//   3. lane l of warp w accumulates output channels l, l + 32, ... of the warp's rows in registers:
//      acc += p_t v_t over the tile's tokens, p_t shuffled from lane t.
// The CTA's maxima, sums and unnormalized outputs go to the workspace [B Hkv][splits][NQ](+[D]).
//
// Merge kernel: a CTA per (KV head, query row) rescales each split from its maximum to the overall
// one, divides by the sum and writes the row in the query's dtype (zeros where nothing was seen).
//
// Quantize: one thread per group (G tokens of one key channel, strided by D; or G channels of one
// token's values, contiguous): csrc/common/kv.h's range, zero and scale, then the codes packed into
// bytes, lowest index in the lowest bits.
#include "kv.h"

#include <cuda_fp16.h>

#include <algorithm>

#include "../common/kv.h"

namespace lowbit::cuda::kv {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;               // tokens per tile: one per lane in the score step
constexpr int kMinTilesPerSplit = 4;    // 128 tokens: below that a split costs more than it gains
constexpr int64_t kMaxSplits = 1024;
constexpr int kDefaultSmem = 48 * 1024;  // dynamic shared memory a kernel may take without opting in
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// ---- element types -------------------------------------------------------------------------------

// The store dtypes as csrc/common/kv.h reads them.
template <DType K>
struct Float;

template <>
struct Float<DType::kBFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  // Round to nearest even, as torch's float -> bfloat16 cast (NaN stays NaN).
  static __device__ __forceinline__ Bits from_float(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return static_cast<Bits>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Float<DType::kFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Float<DType::kFloat32> {
  using Bits = uint32_t;
  static constexpr Bits kSign = 0x80000000u;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float v) { return __float_as_uint(v); }
};

// code * scale + zero in fp32, rounded after the product and after the sum, as the reference.
__device__ __forceinline__ float dequant(uint32_t code, float scale, float zero) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), scale), zero);
}

__device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }

template <typename P>
__device__ __forceinline__ const P* at(const Strided& s, int64_t b, int64_t h) {
  return static_cast<const P*>(s.p) + b * s.sb + h * s.sh;
}

// ---- decode attention ----------------------------------------------------------------------------

// The kernels' view of DecodeArgs plus the plan.
struct Params {
  DecodeArgs a;
  int64_t splits, tiles_per_split, packed_tiles, tiles, q_tiles;
  // Word-wise staging (decode_plan sets these): keys when a tile lies in one block and the codes
  // are 4-byte aligned per channel; values when a 32-bit word's codes lie in one group and rows
  // are 4-byte aligned; 1 / (words per value group) for the group of a word.
  bool key_words = false, value_words = false;
  float inv_value_group_words = 0.f;
};

// Shared-memory layout of the split kernel (fp32 elements): the pre-scaled queries [QT][dq], keys
// [kTile][kp] and values [kTile][D]. dq rounds D up to 4 (float4 query reads; the extra columns
// are zero in both queries and keys) and kp = dq + 1 is odd, so that the 32 lanes reading one
// channel of 32 keys hit 32 banks.
struct Layout {
  int dq, kp, q_off, k_off, v_off, floats;
  __host__ __device__ Layout(int D, int qt) {
    dq = (D + 3) / 4 * 4;
    kp = dq + 1;
    q_off = 0;
    k_off = qt * dq;
    v_off = k_off + kTile * kp;
    floats = v_off + kTile * D;
  }
};

// Word-wise staging of a packed tile (Params::key_words / value_words): 32-bit loads of codes,
// each word's 32 / BITS codes dequantized in registers, and no integer division per element (the
// byte-wise loops below divide by run-time sizes for every byte).
//
// Keys: the tile's 32 tokens of channel d are kTile / P bytes of block j, words w = 0 .. 8 / P - 1;
// word w holds tokens 4 P w ... Thread e takes channel e / (8 / P) and word e % (8 / P): on the
// odd row pitch kp the 32 lanes of a warp store to 32 banks.
template <DType DT, int BITS>
__device__ __forceinline__ void stage_key_words(const uint8_t* __restrict__ kc, const typename Float<DT>::Bits* ks,
                                                const typename Float<DT>::Bits* kz, int64_t j, int64_t first, int D,
                                                int G, int kp, float* __restrict__ k_s) {
  using F = Float<DT>;
  constexpr int P = 8 / BITS, kCodes = 32 / BITS, kWords = kTile / kCodes, kShift = kWords == 8 ? 3 : kWords == 4 ? 2 : 1;
  constexpr uint32_t kLow = (1u << BITS) - 1u;
  const uint8_t* block = kc + j * D * (G / P) + first / P;  // first: the tile's first token within block j
  for (int e = threadIdx.x; e < (D << kShift); e += kThreads) {
    const int d = e >> kShift, w = e & (kWords - 1);
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(block + d * (G / P)) + w);
    const float scale = F::to_float(ks[j * D + d]), zero = F::to_float(kz[j * D + d]);
#pragma unroll
    for (int u = 0; u < kCodes; ++u) k_s[(w * kCodes + u) * kp + d] = dequant((word >> (u * BITS)) & kLow, scale, zero);
  }
}

// Values: token t's row holds D / P bytes, D / (4 P) words; word w's 4 P channels lie in group
// w / (G / (4 P)). Warps take tokens, lanes words; each word's values go to shared memory as float4s.
template <DType DT, int BITS>
__device__ __forceinline__ void stage_value_words(const uint8_t* __restrict__ vc, const typename Float<DT>::Bits* vs,
                                                  const typename Float<DT>::Bits* vz, int64_t t0, int count, int D,
                                                  int G, float inv_group_words, float* __restrict__ v_s) {
  using F = Float<DT>;
  constexpr int kCodes = 32 / BITS;
  constexpr uint32_t kLow = (1u << BITS) - 1u;
  const int words = D / kCodes, groups = D / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int tt = warp; tt < count; tt += kWarps) {
    const int64_t t = t0 + tt;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(vc + t * (D / (8 / BITS)));
    for (int w = lane; w < words; w += 32) {
      const uint32_t word = __ldg(row + w);
      // w / (G / (4 P)) exactly: (w + 1/2) / n is at least 1 / (2 n) from an integer, far above
      // the fp32 product's error for w < 2^22.
      const int g = static_cast<int>((static_cast<float>(w) + 0.5f) * inv_group_words);
      const float scale = F::to_float(vs[t * groups + g]), zero = F::to_float(vz[t * groups + g]);
      float4* out = reinterpret_cast<float4*>(v_s + tt * D + w * kCodes);
#pragma unroll
      for (int u = 0; u < kCodes; u += 4) {
        out[u / 4] = make_float4(dequant((word >> (u * BITS)) & kLow, scale, zero),
                                 dequant((word >> ((u + 1) * BITS)) & kLow, scale, zero),
                                 dequant((word >> ((u + 2) * BITS)) & kLow, scale, zero),
                                 dequant((word >> ((u + 3) * BITS)) & kLow, scale, zero));
      }
    }
  }
}

template <DType DT, int ROWS, int DCH>
__global__ void __launch_bounds__(kThreads, 4) decode_split_kernel(const Params p, float* __restrict__ ws_m,
                                                                float* __restrict__ ws_l, float* __restrict__ ws_acc) {
  using F = Float<DT>;
  using Bits = typename F::Bits;
  constexpr int QT = kWarps * ROWS;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const DecodeArgs& a = p.a;
  const int D = static_cast<int>(a.D), G = static_cast<int>(a.G), bits = a.bits;
  const int P = 8 / bits;
  const uint32_t low = (1u << bits) - 1u;
  const Layout lay(D, QT);
  float* q_s = smem + lay.q_off;
  float* k_s = smem + lay.k_off;
  float* v_s = smem + lay.v_off;

  const int64_t head = blockIdx.x / p.q_tiles, q_tile = blockIdx.x % p.q_tiles;
  const int64_t split = blockIdx.y;
  const int64_t b = head / a.Hkv, hk = head % a.Hkv;
  const int64_t qpg = a.Hq / a.Hkv, nq = qpg * a.L;
  const int64_t packed = a.nb * a.G, total = packed + a.r;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Queries of the tile, pre-scaled; rows past nq and columns past D are zero.
  for (int e = threadIdx.x; e < QT * lay.dq; e += kThreads) {
    const int row = e / lay.dq, d = e % lay.dq;
    const int64_t q = q_tile * QT + row;
    float v = 0.f;
    if (q < nq && d < D) {
      const Bits* qp = at<Bits>(a.query, b, hk * qpg + q / a.L) + (q % a.L) * D;
      v = F::to_float(qp[d]) * a.scaling;
    }
    q_s[e] = v;
  }
  for (int e = threadIdx.x; e < kTile * (lay.dq - D); e += kThreads) {
    k_s[(e / (lay.dq - D)) * lay.kp + D + e % (lay.dq - D)] = 0.f;
  }

  const uint8_t* kc = at<uint8_t>(a.k_codes, b, hk);
  const Bits* ks = at<Bits>(a.k_scale, b, hk);
  const Bits* kz = at<Bits>(a.k_zero, b, hk);
  const uint8_t* vc = at<uint8_t>(a.v_codes, b, hk);
  const Bits* vs = at<Bits>(a.v_scale, b, hk);
  const Bits* vz = at<Bits>(a.v_zero, b, hk);
  const Bits* kr = at<Bits>(a.k_res, b, hk);
  const Bits* vr = at<Bits>(a.v_res, b, hk);

  // The warp's rows: where each sits and what it sees.
  bool row_ok[ROWS];
  int64_t row_head[ROWS], row_pos[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t q = q_tile * QT + warp + kWarps * i;
    row_ok[i] = q < nq;
    row_head[i] = hk * qpg + (row_ok[i] ? q / a.L : 0);
    row_pos[i] = row_ok[i] ? q % a.L : 0;
  }
  float m[ROWS], l[ROWS], acc[ROWS][DCH];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DCH; ++c) acc[i][c] = 0.f;
  }

  const int64_t tile_end = imin(p.tiles, (split + 1) * p.tiles_per_split);
  for (int64_t tile = split * p.tiles_per_split; tile < tile_end; ++tile) {
    const bool is_packed = tile < p.packed_tiles;
    const int64_t t0 = is_packed ? tile * kTile : packed + (tile - p.packed_tiles) * kTile;
    const int count = static_cast<int>(imin(kTile, (is_packed ? packed : total) - t0));
    __syncthreads();  // the previous tile's keys and values are no longer read
    if (is_packed && p.key_words) {
      const int64_t j = t0 / G;
      if (bits == 4) stage_key_words<DT, 4>(kc, ks, kz, j, t0 - j * G, D, G, lay.kp, k_s);
      else if (bits == 2) stage_key_words<DT, 2>(kc, ks, kz, j, t0 - j * G, D, G, lay.kp, k_s);
      else stage_key_words<DT, 8>(kc, ks, kz, j, t0 - j * G, D, G, lay.kp, k_s);
    }
    if (is_packed && p.value_words) {
      const float inv = p.inv_value_group_words;
      if (bits == 4) stage_value_words<DT, 4>(vc, vs, vz, t0, count, D, G, inv, v_s);
      else if (bits == 2) stage_value_words<DT, 2>(vc, vs, vz, t0, count, D, G, inv, v_s);
      else stage_value_words<DT, 8>(vc, vs, vz, t0, count, D, G, inv, v_s);
    }
    if (is_packed && !p.key_words) {
      // Keys: byte (token group s, channel d) holds tokens t0 + s P ... of channel d, all in one
      // block (blocks and tiles start at multiples of P).
      const int groups = count / P;
      for (int e = threadIdx.x; e < D * groups; e += kThreads) {
        const int d = e / groups, s = e % groups;
        const int64_t t = t0 + s * P, j = t / G;
        const uint32_t byte = kc[(j * D + d) * (G / P) + (t - j * G) / P];
        const float scale = F::to_float(ks[j * D + d]), zero = F::to_float(kz[j * D + d]);
        for (int u = 0; u < P; ++u) k_s[(s * P + u) * lay.kp + d] = dequant((byte >> (u * bits)) & low, scale, zero);
      }
    }
    if (is_packed && !p.value_words) {
      // Values: byte k of token t holds channels k P ..., all in group k P / G.
      const int row_bytes = D / P, groups_per_row = D / G;
      for (int e = threadIdx.x; e < count * row_bytes; e += kThreads) {
        const int tt = e / row_bytes, k = e % row_bytes;
        const int64_t t = t0 + tt;
        const uint32_t byte = vc[t * row_bytes + k];
        const int64_t g = t * groups_per_row + k * P / G;
        const float scale = F::to_float(vs[g]), zero = F::to_float(vz[g]);
        for (int u = 0; u < P; ++u) v_s[tt * D + k * P + u] = dequant((byte >> (u * bits)) & low, scale, zero);
      }
    }
    if (!is_packed) {
      const int64_t r0 = t0 - packed;
      for (int e = threadIdx.x; e < count * D; e += kThreads) {
        const int tt = e / D, d = e % D;
        k_s[tt * lay.kp + d] = F::to_float(kr[(r0 + tt) * D + d]);
        v_s[tt * D + d] = F::to_float(vr[(r0 + tt) * D + d]);
      }
    }
    __syncthreads();

    // Scores of token t0 + lane for the warp's rows.
    float s[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) s[i] = 0.f;
    if (lane < count) {
      const float* krow = k_s + lane * lay.kp;
      for (int d = 0; d < lay.dq; d += 4) {
        const float k0 = krow[d], k1 = krow[d + 1], k2 = krow[d + 2], k3 = krow[d + 3];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
          const float4 q = *reinterpret_cast<const float4*>(q_s + (warp + kWarps * i) * lay.dq + d);
          s[i] = fmaf(q.x, k0, s[i]);
          s[i] = fmaf(q.y, k1, s[i]);
          s[i] = fmaf(q.z, k2, s[i]);
          s[i] = fmaf(q.w, k3, s[i]);
        }
      }
    }
    const int64_t t = t0 + lane;
    float pr[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      bool visible = row_ok[i] && lane < count;
      if (visible) {
        if (a.mask.p != nullptr) {
          visible = at<bool>(a.mask, b, row_head[i])[row_pos[i] * total + t];
        } else {
          visible = t <= total - a.L + row_pos[i];
        }
      }
      const float si = visible ? s[i] : -INFINITY;
      float top = si;
#pragma unroll
      for (int o = 16; o > 0; o /= 2) top = fmaxf(top, __shfl_xor_sync(kFullMask, top, o));
      const float m_new = fmaxf(m[i], top);
      // Rows that have seen nothing yet keep m = -inf: shift by 0 there, so exp gives 0, not NaN.
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      pr[i] = expf(si - shift);
      const float corr = expf(m[i] - shift);
      float sum = pr[i];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(kFullMask, sum, o);
      l[i] = l[i] * corr + sum;
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < DCH; ++c) acc[i][c] *= corr;
    }

    // acc += p_t v_t over the tile's tokens, channels lane + 32 c.
    for (int tt = 0; tt < count; ++tt) {
      float v[DCH];
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        const int d = c * 32 + lane;
        v[c] = d < D ? v_s[tt * D + d] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const float pt = __shfl_sync(kFullMask, pr[i], tt);
#pragma unroll
        for (int c = 0; c < DCH; ++c) acc[i][c] = fmaf(pt, v[c], acc[i][c]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (!row_ok[i]) continue;
    const int64_t q = q_tile * QT + warp + kWarps * i;
    const int64_t slot = (head * p.splits + split) * nq + q;
    if (lane == 0) {
      ws_m[slot] = m[i];
      ws_l[slot] = l[i];
    }
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int d = c * 32 + lane;
      if (d < D) ws_acc[slot * D + d] = acc[i][c];
    }
  }
}

// One CTA per (KV head, query row): the splits merged from the overall maximum.
template <DType DT>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const Params p, const float* __restrict__ ws_m,
                                                                const float* __restrict__ ws_l,
                                                                const float* __restrict__ ws_acc) {
  using F = Float<DT>;
  using Bits = typename F::Bits;
  const DecodeArgs& a = p.a;
  const int64_t qpg = a.Hq / a.Hkv, nq = qpg * a.L;
  const int64_t head = blockIdx.x / nq, q = blockIdx.x % nq;
  const int64_t b = head / a.Hkv, hk = head % a.Hkv;
  const int64_t first = head * p.splits * nq + q;  // split s at first + s nq
  float top = -INFINITY;
  for (int64_t s = 0; s < p.splits; ++s) top = fmaxf(top, ws_m[first + s * nq]);
  Bits* out = static_cast<Bits*>(a.out) + ((b * a.Hq + hk * qpg + q / a.L) * a.L + q % a.L) * a.D;
  for (int64_t d = threadIdx.x; d < a.D; d += kThreads) {
    float sum = 0.f, o = 0.f;
    if (top != -INFINITY) {
      for (int64_t s = 0; s < p.splits; ++s) {
        const int64_t at = first + s * nq;
        if (ws_m[at] == -INFINITY) continue;
        const float w = expf(ws_m[at] - top);
        sum += ws_l[at] * w;
        o += ws_acc[at * a.D + d] * w;
      }
    }
    out[d] = F::from_float(sum > 0.f ? o / sum : 0.f);
  }
}

// ---- quantize ------------------------------------------------------------------------------------

// Group `row` of a [rows / C][G][C] array: G elements at x + (row / C) G C + row % C, C apart (keys:
// C = D, a group is one channel of a block; values: C = 1, a group is G channels of a token).
// Codes at codes + row * G / P, scale and zero at [row].
template <DType DT>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const void* __restrict__ x_, int64_t rows, int64_t C,
                                                            int G, int bits, uint8_t* __restrict__ codes,
                                                            void* __restrict__ scale_, void* __restrict__ zero_) {
  using F = Float<DT>;
  using Bits = typename F::Bits;
  const Bits* x = static_cast<const Bits*>(x_);
  Bits* scale = static_cast<Bits*>(scale_);
  Bits* zero = static_cast<Bits*>(zero_);
  const int P = 8 / bits;
  for (int64_t row = blockIdx.x * int64_t(kThreads) + threadIdx.x; row < rows; row += int64_t(gridDim.x) * kThreads) {
    const Bits* g = x + (row / C) * G * C + row % C;
    ::lowbit::kv::Range range;
    for (int i = 0; i < G; ++i) range.add(F::to_float(g[i * C]));
    const auto gs = ::lowbit::kv::group_scale<F>(range, bits);
    scale[row] = gs.scale_bits;
    zero[row] = gs.zero_bits;
    uint8_t* out = codes + row * (G / P);
    for (int k = 0; k < G / P; ++k) {
      uint32_t byte = 0;
      for (int u = 0; u < P; ++u) {
        byte |= uint32_t(::lowbit::kv::code_of<F>(F::to_float(g[(k * P + u) * C]), gs, bits)) << (u * bits);
      }
      out[k] = static_cast<uint8_t>(byte);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------------

bool valid_format(int64_t D, int64_t G, int bits) {
  return (bits == 2 || bits == 4 || bits == 8) && G >= 1 && G % (8 / bits) == 0 && D % G == 0;
}

// Query rows per warp (1, 2 or 4) and output channels per lane / 32 (1, 2, 4 or 8).
int rows_per_warp(int64_t nq) { return nq <= kWarps ? 1 : nq <= 2 * kWarps ? 2 : 4; }
int channel_chunks(int64_t D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8; }

template <DType DT, int ROWS, int DCH>
cudaError_t launch_split(const Params& p, float* m, float* l, float* acc, cudaStream_t stream) {
  const auto kernel = decode_split_kernel<DT, ROWS, DCH>;
  const int smem = Layout(static_cast<int>(p.a.D), kWarps * ROWS).floats * static_cast<int>(sizeof(float));
  if (smem > kDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(p.a.B * p.a.Hkv * p.q_tiles), static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p, m, l, acc);
  return cudaGetLastError();
}

template <DType DT, int ROWS>
cudaError_t launch_split_rows(const Params& p, float* m, float* l, float* acc, cudaStream_t stream) {
  switch (channel_chunks(p.a.D)) {
    case 1: return launch_split<DT, ROWS, 1>(p, m, l, acc, stream);
    case 2: return launch_split<DT, ROWS, 2>(p, m, l, acc, stream);
    case 4: return launch_split<DT, ROWS, 4>(p, m, l, acc, stream);
    default: return launch_split<DT, ROWS, 8>(p, m, l, acc, stream);
  }
}

template <DType DT>
cudaError_t launch_decode(const Params& p, float* workspace, cudaStream_t stream) {
  const int64_t nq = p.a.Hq / p.a.Hkv * p.a.L, states = p.a.B * p.a.Hkv * p.splits * nq;
  float* m = workspace;
  float* l = m + states;
  float* acc = l + states;
  cudaError_t err;
  switch (rows_per_warp(nq)) {
    case 1: err = launch_split_rows<DT, 1>(p, m, l, acc, stream); break;
    case 2: err = launch_split_rows<DT, 2>(p, m, l, acc, stream); break;
    default: err = launch_split_rows<DT, 4>(p, m, l, acc, stream); break;
  }
  if (err != cudaSuccess) return err;
  decode_merge_kernel<DT><<<static_cast<unsigned>(p.a.B * p.a.Hkv * nq), kThreads, 0, stream>>>(p, m, l, acc);
  return cudaGetLastError();
}

template <DType DT>
cudaError_t launch_quantize(const void* keys, const void* values, int64_t B, int64_t H, int64_t T, int64_t D,
                            int64_t G, int bits, uint8_t* k_codes, void* k_scale, void* k_zero, uint8_t* v_codes,
                            void* v_scale, void* v_zero, cudaStream_t stream) {
  const int64_t key_rows = B * H * (T / G) * D, value_rows = B * H * T * (D / G);
  const auto blocks = [](int64_t rows) { return static_cast<unsigned>(std::min<int64_t>((rows + kThreads - 1) / kThreads, 1 << 20)); };
  if (key_rows > 0) {
    quantize_kernel<DT><<<blocks(key_rows), kThreads, 0, stream>>>(keys, key_rows, D, static_cast<int>(G), bits,
                                                                   k_codes, k_scale, k_zero);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (value_rows > 0) {
    quantize_kernel<DT><<<blocks(value_rows), kThreads, 0, stream>>>(values, value_rows, 1, static_cast<int>(G), bits,
                                                                     v_codes, v_scale, v_zero);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t decode_plan(const DecodeArgs& a, DecodePlan* plan) {
  if (!valid_format(a.D, a.G, a.bits) || a.D > kMaxHeadDim || a.Hkv < 1 || a.Hq % a.Hkv != 0) {
    return cudaErrorInvalidValue;
  }
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t nq = a.Hq / a.Hkv * a.L, qt = kWarps * rows_per_warp(nq), q_tiles = (nq + qt - 1) / qt;
  const int64_t tiles = (a.nb * a.G + kTile - 1) / kTile + (a.r + kTile - 1) / kTile;
  const int64_t ctas = a.B * a.Hkv * q_tiles;
  // Enough splits for two CTAs per SM, each of a few tiles at least.
  int64_t splits = ctas > 0 ? (2 * int64_t(sms) + ctas - 1) / ctas : 1;
  splits = std::max<int64_t>(1, std::min({splits, tiles / kMinTilesPerSplit, kMaxSplits}));
  const int64_t per = tiles > 0 ? (tiles + splits - 1) / splits : 0;
  plan->splits = per > 0 ? (tiles + per - 1) / per : 1;
  plan->workspace_floats = a.B * a.Hkv * plan->splits * nq * (2 + a.D);
  return cudaSuccess;
}

cudaError_t decode_attention(const DecodeArgs& a, const DecodePlan& plan, float* workspace, cudaStream_t stream) {
  if (!valid_format(a.D, a.G, a.bits) || a.D > kMaxHeadDim || a.Hkv < 1 || a.Hq % a.Hkv != 0 || plan.splits < 1) {
    return cudaErrorInvalidValue;
  }
  const int64_t nq = a.Hq / a.Hkv * a.L;
  if (a.B * a.Hq * a.L * a.D == 0) return cudaSuccess;
  Params p{a, plan.splits, 0, (a.nb * a.G + kTile - 1) / kTile, 0, 0};
  p.tiles = p.packed_tiles + (a.r + kTile - 1) / kTile;
  p.tiles_per_split = (p.tiles + p.splits - 1) / p.splits;
  p.q_tiles = (nq + kWarps * rows_per_warp(nq) - 1) / (kWarps * rows_per_warp(nq));
  const auto words_aligned = [](const Strided& s) {
    return reinterpret_cast<uintptr_t>(s.p) % 4 == 0 && s.sb % 4 == 0 && s.sh % 4 == 0;
  };
  const int64_t codes_per_word = 32 / a.bits;
  p.key_words = a.G % kTile == 0 && words_aligned(a.k_codes);
  p.value_words = a.G % codes_per_word == 0 && words_aligned(a.v_codes);
  p.inv_value_group_words = p.value_words ? 1.f / static_cast<float>(a.G / codes_per_word) : 0.f;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_decode<DType::kBFloat16>(p, workspace, stream);
    case DType::kFloat16: return launch_decode<DType::kFloat16>(p, workspace, stream);
    default: return launch_decode<DType::kFloat32>(p, workspace, stream);
  }
}

cudaError_t quantize(DType dtype, const void* keys, const void* values, int64_t B, int64_t H, int64_t T, int64_t D,
                     int64_t G, int bits, uint8_t* k_codes, void* k_scale, void* k_zero, uint8_t* v_codes,
                     void* v_scale, void* v_zero, cudaStream_t stream) {
  if (!valid_format(D, G, bits) || T % G != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kBFloat16:
      return launch_quantize<DType::kBFloat16>(keys, values, B, H, T, D, G, bits, k_codes, k_scale, k_zero, v_codes,
                                               v_scale, v_zero, stream);
    case DType::kFloat16:
      return launch_quantize<DType::kFloat16>(keys, values, B, H, T, D, G, bits, k_codes, k_scale, k_zero, v_codes,
                                              v_scale, v_zero, stream);
    default:
      return launch_quantize<DType::kFloat32>(keys, values, B, H, T, D, G, bits, k_codes, k_scale, k_zero, v_codes,
                                              v_scale, v_zero, stream);
  }
}

}  // namespace lowbit::cuda::kv
