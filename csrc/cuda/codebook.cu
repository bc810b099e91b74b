// CUDA kernels of the codebook family (additive vector quantization, AQLM's layout): the product
// y = x W^T + bias straight from the codes (lowbit::codebook_matmul). Spec:
// python/lowbit/reference/codebook.py; format: docs/formats.md ("codebook").
//
// Both kernels multiply on tensor cores (mma.sync m16n8k16, fp32 accumulation) and never build W:
// each lane looks its codewords up straight into its B operand. That works because an mma sums
// over k in any order: lane (r = lane / 4, q = lane % 4) holds k = 2q, 2q+1, 2q+8, 2q+9 of the B
// fragment (output row n = r) and of the A fragment (x rows r and r + 8), so we let those four
// logical k stand for four consecutive input features, and a pair of k-steps for eight: a "unit".
// Per unit, lane q's eight features are one codeword of 8 (g = 8) or two of 4 (g = 4), one lookup
// each, and its A operands are 8 contiguous features of each of its two x rows.
//
// Exactness. The products must be those of fp32 (the spec sums in fp32). When x and the codebooks
// are both fp16 or both bf16, the operands are their values. Otherwise both sides are split into
// bf16 terms that sum to the value exactly (bf16: 1 term, fp16: 2, fp32: 3; the nearest bf16, then
// the nearest to the rest, then the rest) and the mma runs on the pairs of terms (a, b) with
// a + b <= 2; a dropped pair weighs less than 2^-24 of its product. The split turns an infinite
// operand times a finite one into NaN where the spec has +-Inf (the zero lower terms multiply the
// infinity); NaN stays NaN. The order of the fp32 sums differs from the reference's, within the
// fp32 accumulation bound of the tests.
//
// Codebooks. 8-bit codes: the codebooks are copied into shared memory, R times interleaved in
// chunks of 8 or 16 bytes (chunk i of a codeword, copy k at chunk index (entry * chunks + i) * R +
// k), and lane l reads copy l % R: the 8 (16-byte loads) or 16 (8-byte loads) lanes that share a
// shared-memory wavefront then hit distinct banks whatever their codes. R = 8 or 16 (4 for two
// fp32 codebooks of g = 8), at most 64 KB; fewer on devices with less shared memory per CTA
// (fit_copies). 16-bit codes: the codebooks (up to 2 MiB) are read through the read-only path,
// from L2.
//
// GEMV (rows <= kGemvMaxRows): who owns what. A CTA of 8 warps owns 16 output rows (two n8 tiles)
// of a persistent grid's share, and all of K: warp w takes the rounds w, w + 8, ... of 4 * run
// units, lane q the run consecutive units q * run .. of each round (run = g units, kGemvGroups = 8
// groups, so that its codes of a row are one run of 8 to 32 bytes); the codes of the next round
// are loaded while this one is multiplied.
// Per unit the lane loads its 8 features of x rows r and r + 8 (rows >= M are zero) from global
// memory (x is small and shared by every CTA: L1 / L2), looks up the codeword(s) of each output
// row it holds for each codebook, and issues 2 mma per row tile and codebook (more with split
// operands). The 8 warps' partial sums meet in shared memory, summed in warp order; thread t then
// applies the scale and bias of one (row, column) and stores it.
//
// GEMM (rows > kGemvMaxRows): who owns what. A CTA owns a 64 x 128 tile of y; warp w its 16 output
// rows (two n8 tiles) for all 64 x rows (four m16 tiles), so each lookup feeds 4 mma per k-step.
// K advances in rounds of 128 features: the CTA stages the x tile (64 x 128, as the bf16 / fp16
// terms) in shared memory, rows padded to 320 bytes and lane q reading unit q + 4s (s < 4), which
// makes the 16-byte A loads conflict-free. The next round's x is in flight while this one is
// multiplied: copied global -> shared (cp.async, two buffers) where x is used as it is, loaded into
// registers and split on the way in otherwise. A codeword is looked up once per CTA tile (the
// dequantized tile lives only in registers), so W is never materialized: the "dequantize-tile
// GEMM" on tensor cores, with the decode fused into the B operand.
#include "codebook.h"

#include <cuda_fp16.h>

#include <mutex>

namespace lowbit::cuda::codebook {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnit = 8;                  // input features per lane and unit (two mma k-steps)
constexpr int kMaxBookBytes = 64 * 1024;  // shared-memory copies of the codebooks at most

constexpr int kGemvTiles = 2;                      // n8 tiles per CTA
constexpr int kGemvRows = 8 * kGemvTiles;          // output rows per CTA
constexpr int kGemvGroups = 8;                     // consecutive groups per lane and round
constexpr int kGemvStaticBytes = kWarps * kGemvTiles * 4 * 32 * 4;  // the warps' partial sums

constexpr int kGemmMTiles = 4;                       // m16 tiles per warp
constexpr int kGemmNTiles = 2;                       // n8 tiles per warp
constexpr int kGemmBM = 16 * kGemmMTiles;            // 64 x rows per CTA
constexpr int kGemmBN = kWarps * 8 * kGemmNTiles;    // 128 output rows per CTA
constexpr int kGemmRun = 4;                          // units per lane and round
constexpr int kGemmRoundUnits = 4 * kGemmRun;        // 16 units = 128 features per round
constexpr int kGemmBK = kGemmRoundUnits * kUnit;
constexpr int kGemmStride = kGemmBK + 32;            // elements per staged row: 320 bytes, 64 mod 128
constexpr int kGemmPlane = kGemmBM * kGemmStride;    // elements per staged term of the x tile
constexpr int kGemmQuads = kGemmBM * kGemmBK / 4 / kThreads;  // 4-feature quads per thread and round
constexpr int kMaxGridY = 65535;

static_assert(kGemvTiles * 4 * 32 == kThreads, "one thread per (tile, accumulator, lane) in the GEMV epilogue");
static_assert(kGemmBK / 4 == 32, "a warp stages one 128-feature row of x per quad step");

// ---- element types -------------------------------------------------------------------------------

// Which operands a kernel multiplies: x and codebooks both fp16 (kHalf) or both bf16 (kBF16), used
// as they are; any other pair (kMixed), split into up to 3 bf16 terms each.
struct HalfPath {
  static constexpr bool kMixed = false, kBF16 = false;
  static constexpr int kTerms = 1;
  static constexpr DType kX = DType::kFloat16;
};
struct BF16Path {
  static constexpr bool kMixed = false, kBF16 = true;
  static constexpr int kTerms = 1;
  static constexpr DType kX = DType::kBFloat16;
};
struct MixedPath {
  static constexpr bool kMixed = true, kBF16 = true;
  static constexpr int kTerms = 3;
  static constexpr DType kX = DType::kFloat32;  // unused: x's dtype is read at run time
};

// bf16 terms that hold a value of this dtype exactly.
__host__ __device__ __forceinline__ int terms_of(DType t) {
  return t == DType::kBFloat16 ? 1 : t == DType::kFloat16 ? 2 : 3;
}

__device__ __forceinline__ float bf16_float(uint32_t bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float fp16_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Round to nearest even, as torch's float -> bfloat16 cast (NaN stays NaN).
__device__ __forceinline__ uint32_t float_bf16(float v) {
  const uint32_t u = __float_as_uint(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// v = t0 + t1 + t2 exactly, each a bf16 (returned as its bits), for every finite fp32 v above the
// subnormal range: t0 is the bf16 nearest to v (truncated instead where that would round to Inf),
// the rest r = v - t0 is exact and fits in 16 bits, t1 is the bf16 nearest to r, and r - t1 fits
// in 8. For an fp16 value t2 is 0; for a bf16 one t1 and t2 are. Inf and NaN go whole into t0.
__device__ __forceinline__ void split_bf16(float v, uint32_t& t0, uint32_t& t1, uint32_t& t2) {
  const uint32_t u = __float_as_uint(v);
  if ((u & 0x7F800000u) == 0x7F800000u) {
    t0 = (u & 0x007FFFFFu) != 0 ? 0x7FC0u : u >> 16;
    t1 = t2 = 0;
    return;
  }
  uint32_t h = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) & 0xFFFFu;
  if ((h & 0x7F80u) == 0x7F80u) h = u >> 16;
  const float r = v - __uint_as_float(h << 16);
  const uint32_t ur = __float_as_uint(r);
  const uint32_t h1 = ((ur + 0x7FFFu + ((ur >> 16) & 1u)) >> 16) & 0xFFFFu;
  const float r2 = r - __uint_as_float(h1 << 16);
  t0 = h;
  t1 = h1;
  t2 = __float_as_uint(r2) >> 16;
}

// Eight 16-bit mma operands of one lane and unit: value 2i in the low half of r[i].
struct Frag8 {
  uint32_t r[4];
};

__device__ __forceinline__ Frag8 frag(const uint4& v) {
  Frag8 f;
  f.r[0] = v.x, f.r[1] = v.y, f.r[2] = v.z, f.r[3] = v.w;
  return f;
}

// Up to eight values as loaded: 16-bit ones packed like Frag8 in w[0..3], fp32 ones in w[0..7].
template <int N>
struct Raw {
  uint32_t w[N];
};

// N 16-bit (w[0 .. N/2)) or fp32 (w[0 .. N)) values of dtype t -> the P bf16 terms of each, packed
// two per word (term p of value 2i and 2i + 1 in out[p][i]). Terms at or past terms_of(t) are 0.
template <int N, int P>
__device__ __forceinline__ void split_values(const Raw<N>& raw, DType t, uint32_t (&out)[P][N / 2]) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) out[p][i] = 0;
  }
  if (t == DType::kBFloat16) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) out[0][i] = raw.w[i];
    return;
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    float lo, hi;
    if (t == DType::kFloat16) {
      lo = fp16_float(raw.w[i] & 0xFFFFu);
      hi = fp16_float(raw.w[i] >> 16);
    } else {
      lo = __uint_as_float(raw.w[2 * i]);
      hi = __uint_as_float(raw.w[2 * i + 1]);
    }
    uint32_t a[3], b[3];
    split_bf16(lo, a[0], a[1], a[2]);
    split_bf16(hi, b[0], b[1], b[2]);
#pragma unroll
    for (int p = 0; p < P; ++p) out[p][i] = a[p] | (b[p] << 16);
  }
}

// A unit's eight values as mma operands: as they are (fp16 / bf16 paths) or split into terms.
template <class Path>
__device__ __forceinline__ void to_terms(const Raw<8>& raw, DType t, Frag8 (&f)[Path::kTerms]) {
  if constexpr (!Path::kMixed) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[0].r[i] = raw.w[i];
  } else {
    uint32_t out[Path::kTerms][4];
    split_values<8, Path::kTerms>(raw, t, out);
#pragma unroll
    for (int p = 0; p < Path::kTerms; ++p) {
#pragma unroll
      for (int i = 0; i < 4; ++i) f[p].r[i] = out[p][i];
    }
  }
}

// ---- tensor cores --------------------------------------------------------------------------------

// d += A B, A 16 x 16 (x rows), B 16 x 8 (output rows), fp32 accumulation.
template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// One unit: lo = x row r, hi = x row r + 8, w = output row r, each the lane's 8 features; k-step h
// takes features 4h .. 4h + 3 (A registers: row r k 2q..2q+1, row r+8, row r k 2q+8.., row r+8; B
// registers: k 2q..2q+1, k 2q+8..2q+9).
template <bool BF16>
__device__ __forceinline__ void mma_unit(float (&d)[4], const Frag8& lo, const Frag8& hi, const Frag8& w) {
  mma16816<BF16>(d, lo.r[0], hi.r[0], lo.r[1], hi.r[1], w.r[0], w.r[1]);
  mma16816<BF16>(d, lo.r[2], hi.r[2], lo.r[3], hi.r[3], w.r[2], w.r[3]);
}

// Every pair of terms (a of x, b of the codeword) with a + b <= 2 that the dtypes have (xt, bt).
template <class Path>
__device__ __forceinline__ void mma_terms(float (&d)[4], const Frag8 (&lo)[Path::kTerms],
                                          const Frag8 (&hi)[Path::kTerms], const Frag8 (&w)[Path::kTerms], int xt,
                                          int bt) {
  if constexpr (!Path::kMixed) {
    mma_unit<Path::kBF16>(d, lo[0], hi[0], w[0]);
  } else {
#pragma unroll
    for (int a = 0; a < Path::kTerms; ++a) {
#pragma unroll
      for (int b = 0; a + b < Path::kTerms; ++b) {
        if (a < xt && b < bt) mma_unit<Path::kBF16>(d, lo[a], hi[a], w[b]);
      }
    }
  }
}

// ---- codebooks -----------------------------------------------------------------------------------

struct Args {
  const void* x;        // [M, K] of x_dtype
  const void* codes;    // [N, groups, C]
  const void* books;    // [C, 2^NBITS, 1, g] of book_dtype
  const void* scales;   // [N] of scale_dtype
  const void* bias;     // [N] of x_dtype, or null
  void* y;              // [M, N] of x_dtype
  int64_t M, N, K, groups, units;  // units = ceil(K / 8)
  int C;
  DType x_dtype, book_dtype, scale_dtype;
  int copy_shift;   // log2 of the shared-memory copies of the codebooks (8-bit codes), else 0
  int book_bytes;   // shared memory of those copies (8-bit codes), else 0
  bool codes_vec8;  // every row of codes starts 8-byte aligned
};

// Bytes of a codebook chunk (one load): 8 for 16-bit codewords of 4, else 16 (a 16-bit codeword
// of 8, an fp32 one of 4, half an fp32 one of 8).
template <int G>
__device__ __forceinline__ int chunk_bytes(bool wide) {
  return G == 8 || wide ? 16 : 8;
}

// The shared-memory copies of the codebooks: chunk i of the codebooks' bytes goes to chunks
// (i << copy_shift) + k, k < 2^copy_shift.
template <int G>
__device__ __forceinline__ void stage_books(uint4* smem, const Args& a, bool wide) {
  const int total = (a.C * 256 * G * (wide ? 4 : 2) / chunk_bytes<G>(wide)) << a.copy_shift;
  if (chunk_bytes<G>(wide) == 16) {
    const uint4* src = static_cast<const uint4*>(a.books);
    for (int i = threadIdx.x; i < total; i += blockDim.x) smem[i] = __ldg(src + (i >> a.copy_shift));
  } else {
    const uint2* src = static_cast<const uint2*>(a.books);
    uint2* dst = reinterpret_cast<uint2*>(smem);
    for (int i = threadIdx.x; i < total; i += blockDim.x) dst[i] = __ldg(src + (i >> a.copy_shift));
  }
}

template <bool SHARED>
__device__ __forceinline__ uint4 chunk16(const void* base, uint32_t i) {
  if constexpr (SHARED) return static_cast<const uint4*>(base)[i];
  return __ldg(static_cast<const uint4*>(base) + i);
}

template <bool SHARED>
__device__ __forceinline__ uint2 chunk8(const void* base, uint32_t i) {
  if constexpr (SHARED) return static_cast<const uint2*>(base)[i];
  return __ldg(static_cast<const uint2*>(base) + i);
}

// The unit's eight codebook values of codebook c, as loaded: codeword code0 (g = 8), or code0 then
// code1 (g = 4); a codeword whose ok flag is false reads as zeros. books: the shared-memory copies
// (8-bit codes; copy = the lane's copy) or the codebooks in global memory (16-bit codes; copy 0,
// copy_shift 0). wide: fp32 codebooks (mixed path only).
template <int NBITS, int G>
__device__ __forceinline__ Raw<8> lookup(const void* books, bool wide, uint32_t c, uint32_t code0, uint32_t code1,
                                         bool ok0, bool ok1, uint32_t copy, int copy_shift) {
  constexpr bool kShared = NBITS == 8;
  Raw<8> raw;
#pragma unroll
  for (int i = 0; i < 8; ++i) raw.w[i] = 0;
  const uint32_t e0 = (c << NBITS) + code0, e1 = (c << NBITS) + code1;
  if constexpr (G == 8) {
    if (ok0) {
      if (!wide) {
        const uint4 v = chunk16<kShared>(books, (e0 << copy_shift) + copy);
        raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
      } else {
        const uint4 v = chunk16<kShared>(books, ((2 * e0) << copy_shift) + copy);
        const uint4 u = chunk16<kShared>(books, ((2 * e0 + 1) << copy_shift) + copy);
        raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
        raw.w[4] = u.x, raw.w[5] = u.y, raw.w[6] = u.z, raw.w[7] = u.w;
      }
    }
  } else {
    if (!wide) {
      if (ok0) {
        const uint2 v = chunk8<kShared>(books, (e0 << copy_shift) + copy);
        raw.w[0] = v.x, raw.w[1] = v.y;
      }
      if (ok1) {
        const uint2 v = chunk8<kShared>(books, (e1 << copy_shift) + copy);
        raw.w[2] = v.x, raw.w[3] = v.y;
      }
    } else {
      if (ok0) {
        const uint4 v = chunk16<kShared>(books, (e0 << copy_shift) + copy);
        raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
      }
      if (ok1) {
        const uint4 v = chunk16<kShared>(books, (e1 << copy_shift) + copy);
        raw.w[4] = v.x, raw.w[5] = v.y, raw.w[6] = v.z, raw.w[7] = v.w;
      }
    }
  }
  return raw;
}

// ---- codes ---------------------------------------------------------------------------------------

template <int NBITS>
__device__ __forceinline__ uint32_t load_code(const void* codes, int64_t i) {
  if constexpr (NBITS == 8) return __ldg(static_cast<const unsigned char*>(codes) + i);
  return __ldg(static_cast<const unsigned short*>(codes) + i);
}

// Code e of a run packed into words (little-endian, NBITS each).
template <int NBITS, int W>
__device__ __forceinline__ uint32_t code_field(const uint32_t (&words)[W], int e) {
  constexpr int kPerWord = 32 / NBITS;
  return (words[e / kPerWord] >> (NBITS * (e % kPerWord))) & ((1u << NBITS) - 1u);
}

// The codes of `count` (<= GROUPS) consecutive groups of one row from entry `first` (= (n * groups +
// j) * C), C per group, packed into words; codes past count read as 0. 8-byte loads when the run
// is whole and the row allows them.
template <int NBITS, int GROUPS, int W>
__device__ __forceinline__ void load_run(const void* codes, int64_t first, int count, int C, bool vec8,
                                         uint32_t (&words)[W]) {
  static_assert(W * 32 == GROUPS * 2 * NBITS, "the words hold GROUPS groups of up to 2 codes");
#pragma unroll
  for (int i = 0; i < W; ++i) words[i] = 0;
  if (vec8 && count == GROUPS) {
    const uint2* src = reinterpret_cast<const uint2*>(static_cast<const unsigned char*>(codes) + first * (NBITS / 8));
    const int vecs = GROUPS * C * (NBITS / 8) / 8;
#pragma unroll
    for (int v = 0; v < W / 2; ++v) {
      if (v < vecs) {
        const uint2 t = __ldg(src + v);
        words[2 * v] = t.x, words[2 * v + 1] = t.y;
      }
    }
  } else {
    const int entries = count * C;
#pragma unroll
    for (int e = 0; e < GROUPS * 2; ++e) {
      if (e < entries) words[e * NBITS / 32] |= load_code<NBITS>(codes, first + e) << (NBITS * e % 32);
    }
  }
}

// ---- x and y -------------------------------------------------------------------------------------

// The eight features of x row m from feature k = 8u, as loaded; zeros for a row >= M or a unit past
// K (and for features 4..7 of a unit with only 4, g = 4).
template <class Path, int G>
__device__ __forceinline__ Raw<8> load_x_unit(const Args& a, int64_t m, int64_t u) {
  Raw<8> raw;
#pragma unroll
  for (int i = 0; i < 8; ++i) raw.w[i] = 0;
  if (m >= a.M || u >= a.units) return raw;
  const int64_t k = u * kUnit;
  const bool second = G == 8 || k + 4 < a.K;
  if (!Path::kMixed || a.x_dtype != DType::kFloat32) {
    const unsigned short* row = static_cast<const unsigned short*>(a.x) + m * a.K + k;
    if constexpr (G == 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(row));
      raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(row));
      raw.w[0] = v.x, raw.w[1] = v.y;
      if (second) {
        const uint2 t = __ldg(reinterpret_cast<const uint2*>(row + 4));
        raw.w[2] = t.x, raw.w[3] = t.y;
      }
    }
  } else {
    const float* row = static_cast<const float*>(a.x) + m * a.K + k;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row));
    raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
    if (second) {
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(row + 4));
      raw.w[4] = t.x, raw.w[5] = t.y, raw.w[6] = t.z, raw.w[7] = t.w;
    }
  }
  return raw;
}

__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBFloat16: return bf16_float(__ldg(static_cast<const unsigned short*>(p) + i));
    case DType::kFloat16: return fp16_float(__ldg(static_cast<const unsigned short*>(p) + i));
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}

// y[m, n] = dot * scale[n] + bias[n], rounded once to x's dtype (scaled then biased, the
// reference's order; the explicit roundings keep the compiler from fusing them).
template <class Path>
__device__ __forceinline__ void store_y(const Args& a, int64_t m, int64_t n, float dot) {
  const DType xd = Path::kMixed ? a.x_dtype : Path::kX;
  float v = __fmul_rn(dot, load_float(a.scales, a.scale_dtype, n));
  if (a.bias != nullptr) v = __fadd_rn(v, load_float(a.bias, xd, n));
  const int64_t i = m * a.N + n;
  switch (xd) {
    case DType::kBFloat16: static_cast<unsigned short*>(a.y)[i] = static_cast<unsigned short>(float_bf16(v)); break;
    case DType::kFloat16: static_cast<unsigned short*>(a.y)[i] = __half_as_ushort(__float2half_rn(v)); break;
    default: static_cast<float*>(a.y)[i] = v; break;
  }
}

// ---- GEMV ----------------------------------------------------------------------------------------

// The codes of one lane and round (kGemvGroups groups from group j0 of the CTA's rows n0 + 8 nt + r)
// -> how many of those groups exist (0 .. kGemvGroups).
template <int NBITS, int W>
__device__ __forceinline__ int fetch_codes(const Args& a, int64_t n0, int r, int64_t j0,
                                           uint32_t (&words)[kGemvTiles][W]) {
  const int64_t left = a.groups - j0;
  const int valid = left <= 0 ? 0 : left < kGemvGroups ? static_cast<int>(left) : kGemvGroups;
#pragma unroll
  for (int nt = 0; nt < kGemvTiles; ++nt) {
    const int64_t n = n0 + nt * 8 + r;
    load_run<NBITS, kGemvGroups>(a.codes, (n * a.groups + j0) * a.C, n < a.N ? valid : 0, a.C, a.codes_vec8,
                                 words[nt]);
  }
  return valid;
}

template <class Path, int NBITS, int G>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const Args a) {
  extern __shared__ uint4 smem[];  // the codebooks' copies (8-bit codes)
  __shared__ float partial[kWarps][kGemvTiles * 4][32];  // kGemvStaticBytes
  constexpr int kPer = 8 / G;                      // groups per unit
  constexpr int kRun = kGemvGroups / kPer;         // units per lane and round
  constexpr int kRound = 4 * kRun;                 // units per warp and round
  constexpr int kWords = kGemvGroups * 2 * NBITS / 32;
  constexpr int T = Path::kTerms;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int r = lane >> 2, q = lane & 3;
  const bool wide = Path::kMixed && a.book_dtype == DType::kFloat32;
  const int xt = Path::kMixed ? terms_of(a.x_dtype) : 1, bt = Path::kMixed ? terms_of(a.book_dtype) : 1;

  const void* books = a.books;
  uint32_t copy = 0;
  if constexpr (NBITS == 8) {
    stage_books<G>(smem, a, wide);
    books = smem;
    copy = static_cast<uint32_t>(lane) & ((1u << a.copy_shift) - 1u);
    __syncthreads();
  }

  const int64_t blocks = (a.N + kGemvRows - 1) / kGemvRows;
  const int64_t step = int64_t(kWarps) * kRound;
  for (int64_t nb = blockIdx.x; nb < blocks; nb += gridDim.x) {
    const int64_t n0 = nb * kGemvRows;
    bool row_ok[kGemvTiles];
    float acc[kGemvTiles][4];
#pragma unroll
    for (int nt = 0; nt < kGemvTiles; ++nt) {
      row_ok[nt] = n0 + nt * 8 + r < a.N;
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
    }

    // Rounds w, w + 8, ...: lane q takes units q * kRun .. of each; the codes of the next round
    // are loaded while this one is multiplied.
    int64_t base = int64_t(warp) * kRound;
    uint32_t next[kGemvTiles][kWords];
    int next_valid = base < a.units ? fetch_codes<NBITS>(a, n0, r, (base + q * kRun) * kPer, next) : 0;
    for (; base < a.units; base += step) {
      uint32_t words[kGemvTiles][kWords];
#pragma unroll
      for (int nt = 0; nt < kGemvTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < kWords; ++i) words[nt][i] = next[nt][i];
      }
      const int valid = next_valid;
      if (base + step < a.units) next_valid = fetch_codes<NBITS>(a, n0, r, (base + step + q * kRun) * kPer, next);
      const int64_t u0 = base + q * kRun;  // the lane's first unit of the round
#pragma unroll
      for (int s = 0; s < kRun; ++s) {
        Frag8 lo[T], hi[T];
        to_terms<Path>(load_x_unit<Path, G>(a, r, u0 + s), a.x_dtype, lo);
        to_terms<Path>(load_x_unit<Path, G>(a, r + 8, u0 + s), a.x_dtype, hi);
#pragma unroll
        for (int nt = 0; nt < kGemvTiles; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (c < a.C) {
              // The unit's groups in the run; both layouts' fields are read (constant indices
              // into the words) and one is picked.
              const int i0 = s * kPer, i1 = s * kPer + kPer - 1;
              const uint32_t code0 =
                  a.C == 2 ? code_field<NBITS>(words[nt], 2 * i0 + c) : code_field<NBITS>(words[nt], i0);
              const uint32_t code1 =
                  a.C == 2 ? code_field<NBITS>(words[nt], 2 * i1 + c) : code_field<NBITS>(words[nt], i1);
              const Raw<8> raw = lookup<NBITS, G>(books, wide, c, code0, code1, i0 < valid && row_ok[nt],
                                                  i1 < valid && row_ok[nt], copy, a.copy_shift);
              Frag8 w[T];
              to_terms<Path>(raw, a.book_dtype, w);
              mma_terms<Path>(acc[nt], lo, hi, w, xt, bt);
            }
          }
        }
      }
    }

    // The warps' partial sums, added in warp order; thread t owns accumulator (t >> 5) & 3 of lane
    // t & 31 in tile t >> 7.
#pragma unroll
    for (int nt = 0; nt < kGemvTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) partial[warp][nt * 4 + e][lane] = acc[nt][e];
    }
    __syncthreads();
    {
      const int t = static_cast<int>(threadIdx.x);
      const int nt = t >> 7, e = (t >> 5) & 3, l = t & 31;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][nt * 4 + e][l];
      const int64_t m = (l >> 2) + 8 * (e >> 1);
      const int64_t n = n0 + nt * 8 + 2 * (l & 3) + (e & 1);
      if (m < a.M && n < a.N) store_y<Path>(a, m, n, sum);
    }
    __syncthreads();
  }
}

// ---- GEMM ----------------------------------------------------------------------------------------

// A thread's share of one round's x tile: quads (4 features) tid + kThreads * i, i < kGemmQuads, at
// tile row quad / 32 and features 4 * (quad % 32); 16-bit quads in v[i][0..1], fp32 in v[i][0..3].
template <class Path>
struct XQuads {
  static constexpr int kWords = Path::kMixed ? 4 : 2;
  uint32_t v[kGemmQuads][kWords];
};

template <class Path>
__device__ __forceinline__ void load_quads(const Args& a, int64_t m0, int64_t round, XQuads<Path>& x) {
  const bool fp32 = Path::kMixed && a.x_dtype == DType::kFloat32;
#pragma unroll
  for (int i = 0; i < kGemmQuads; ++i) {
    const int quad = static_cast<int>(threadIdx.x) + kThreads * i;
    const int64_t m = m0 + quad / 32, k = round * kGemmBK + 4 * (quad % 32);
#pragma unroll
    for (int w = 0; w < XQuads<Path>::kWords; ++w) x.v[i][w] = 0;
    if (m < a.M && k < a.K) {  // K is a multiple of 4: a quad is whole or absent
      if (fp32) {
        const uint4 t = __ldg(reinterpret_cast<const uint4*>(static_cast<const float*>(a.x) + m * a.K + k));
        x.v[i][0] = t.x, x.v[i][1] = t.y;
        if constexpr (XQuads<Path>::kWords == 4) x.v[i][2] = t.z, x.v[i][3] = t.w;
      } else {
        const uint2 t = __ldg(reinterpret_cast<const uint2*>(static_cast<const unsigned short*>(a.x) + m * a.K + k));
        x.v[i][0] = t.x, x.v[i][1] = t.y;
      }
    }
  }
}

// The quads into the staged tile: term p of row, feature f at tile[p * kGemmPlane + row * kGemmStride + f].
template <class Path>
__device__ __forceinline__ void store_quads(const Args& a, const XQuads<Path>& x, unsigned short* tile, int xt) {
#pragma unroll
  for (int i = 0; i < kGemmQuads; ++i) {
    const int quad = static_cast<int>(threadIdx.x) + kThreads * i;
    unsigned short* dst = tile + (quad / 32) * kGemmStride + 4 * (quad % 32);
    if constexpr (!Path::kMixed) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(x.v[i][0], x.v[i][1]);
    } else {
      Raw<4> raw;
#pragma unroll
      for (int w = 0; w < 4; ++w) raw.w[w] = x.v[i][w];
      uint32_t out[Path::kTerms][2];
      split_values<4, Path::kTerms>(raw, a.x_dtype, out);
#pragma unroll
      for (int p = 0; p < Path::kTerms; ++p) {
        if (p < xt) *reinterpret_cast<uint2*>(dst + p * kGemmPlane) = make_uint2(out[p][0], out[p][1]);
      }
    }
  }
}

// fp16 / bf16 paths: the round's quads go straight from global to shared memory (cp.async, no
// registers), zeros past M and K; double-buffered, so the next round's copies fly during this one.
__device__ __forceinline__ void copy_quads(const Args& a, int64_t m0, int64_t round, unsigned short* tile) {
#pragma unroll
  for (int i = 0; i < kGemmQuads; ++i) {
    const int quad = static_cast<int>(threadIdx.x) + kThreads * i;
    const int64_t m = m0 + quad / 32, k = round * kGemmBK + 4 * (quad % 32);
    const bool ok = m < a.M && k < a.K;
    const unsigned short* src = static_cast<const unsigned short*>(a.x) + (ok ? m * a.K + k : 0);
    const unsigned short* to = tile + (quad / 32) * kGemmStride + 4 * (quad % 32);
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(to));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 8 : 0) : "memory");
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most one group of copies (the newest) is in flight.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Shared memory of the GEMM's x tile: two buffers of the 16-bit x (fp16 / bf16 paths), or the
// three bf16 terms (mixed path, staged through registers).
template <class Path>
constexpr int gemm_tile_bytes() {
  return (Path::kMixed ? Path::kTerms : 2) * kGemmPlane * 2;
}

template <class Path, int NBITS, int G>
__global__ void __launch_bounds__(kThreads, Path::kMixed ? 1 : 2) gemm_kernel(const Args a) {
  extern __shared__ uint4 smem[];  // [codebook copies (8-bit codes): book_bytes][x tile: gemm_tile_bytes]
  constexpr int kPer = 8 / G;
  constexpr int T = Path::kTerms;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int r = lane >> 2, q = lane & 3;
  const bool wide = Path::kMixed && a.book_dtype == DType::kFloat32;
  const int xt = Path::kMixed ? terms_of(a.x_dtype) : 1, bt = Path::kMixed ? terms_of(a.book_dtype) : 1;
  unsigned short* tile = reinterpret_cast<unsigned short*>(reinterpret_cast<unsigned char*>(smem) + a.book_bytes);

  const void* books = a.books;
  uint32_t copy = 0;
  if constexpr (NBITS == 8) {
    stage_books<G>(smem, a, wide);
    books = smem;
    copy = static_cast<uint32_t>(lane) & ((1u << a.copy_shift) - 1u);
  }

  const int64_t m0 = int64_t(blockIdx.y) * kGemmBM;
  const int64_t n0 = int64_t(blockIdx.x) * kGemmBN + warp * 8 * kGemmNTiles;
  float acc[kGemmMTiles][kGemmNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kGemmMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kGemmNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    }
  }

  const int64_t rounds = (a.units + kGemmRoundUnits - 1) / kGemmRoundUnits;
  XQuads<Path> next;  // mixed path: the next round's x
  if constexpr (Path::kMixed) {
    load_quads<Path>(a, m0, 0, next);
  } else {
    copy_quads(a, m0, 0, tile);
    cp_async_commit();
  }
  for (int64_t round = 0; round < rounds; ++round) {
    const unsigned short* cur = tile;
    if constexpr (Path::kMixed) {
      store_quads<Path>(a, next, tile, xt);
      __syncthreads();  // the tile (and, in the first round, the codebook copies) are written
      if (round + 1 < rounds) load_quads<Path>(a, m0, round + 1, next);
    } else {
      cur = tile + (round & 1) * kGemmPlane;
      if (round + 1 < rounds) copy_quads(a, m0, round + 1, tile + ((round + 1) & 1) * kGemmPlane);
      cp_async_commit();  // an empty group in the last round keeps the count
      cp_async_wait_one();
      __syncthreads();  // this round's tile (and, in the first round, the codebook copies) are written
    }
#pragma unroll 1
    for (int s = 0; s < kGemmRun; ++s) {
      const int ul = q + 4 * s;  // the lane's unit in the round: conflict-free 16-byte A loads
      const int64_t u = round * kGemmRoundUnits + ul;
      Frag8 lo[kGemmMTiles][T], hi[kGemmMTiles][T];
#pragma unroll
      for (int mt = 0; mt < kGemmMTiles; ++mt) {
#pragma unroll
        for (int p = 0; p < T; ++p) {
          if (p < xt) {
            const unsigned short* src = cur + p * kGemmPlane + (mt * 16 + r) * kGemmStride + ul * kUnit;
            lo[mt][p] = frag(*reinterpret_cast<const uint4*>(src));
            hi[mt][p] = frag(*reinterpret_cast<const uint4*>(src + 8 * kGemmStride));
          } else {
            lo[mt][p] = frag(make_uint4(0u, 0u, 0u, 0u));
            hi[mt][p] = frag(make_uint4(0u, 0u, 0u, 0u));
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < kGemmNTiles; ++nt) {
        const int64_t n = n0 + nt * 8 + r;
        const int64_t j0 = u * kPer, j1 = j0 + kPer - 1;
        const bool ok0 = n < a.N && j0 < a.groups, ok1 = n < a.N && j1 < a.groups;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (c < a.C) {
            const uint32_t code0 = ok0 ? load_code<NBITS>(a.codes, (n * a.groups + j0) * a.C + c) : 0u;
            const uint32_t code1 = kPer == 2 && ok1 ? load_code<NBITS>(a.codes, (n * a.groups + j1) * a.C + c) : 0u;
            const Raw<8> raw = lookup<NBITS, G>(books, wide, c, code0, code1, ok0, ok1, copy, a.copy_shift);
            Frag8 w[T];
            to_terms<Path>(raw, a.book_dtype, w);
#pragma unroll
            for (int mt = 0; mt < kGemmMTiles; ++mt) mma_terms<Path>(acc[mt][nt], lo[mt], hi[mt], w, xt, bt);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with the tile before it is written again
  }

#pragma unroll
  for (int mt = 0; mt < kGemmMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kGemmNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + mt * 16 + r + 8 * (e >> 1);
        const int64_t n = n0 + nt * 8 + 2 * q + (e & 1);
        if (m < a.M && n < a.N) store_y<Path>(a, m, n, acc[mt][nt][e]);
      }
    }
  }
}

// ---- host side -----------------------------------------------------------------------------------

bool aligned(const void* p, uintptr_t to) { return (reinterpret_cast<uintptr_t>(p) & (to - 1)) == 0; }

struct Device {
  int id = 0;
  int sms = 0;
  int optin = 0;  // shared memory a CTA may have (static + dynamic)
};

cudaError_t device_info(Device* d) {
  cudaError_t err = cudaGetDevice(&d->id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, d->id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d->optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d->id);
  return err;
}

// Fewer copies of the codebooks where the device's shared memory cannot hold them next to the
// kernel's other `other` bytes (99 KB per CTA on sm_86 / sm_89): a copy fewer halves the bytes and
// makes 2-way bank conflicts likelier, never wrong results.
cudaError_t fit_copies(Args& a, int other, const Device& d) {
  while (a.copy_shift > 0 && a.book_bytes + other > d.optin) {
    --a.copy_shift;
    a.book_bytes /= 2;
  }
  return a.book_bytes + other <= d.optin ? cudaSuccess : cudaErrorInvalidConfiguration;
}

// CTAs of a kernel resident per SM with `smem` bytes of dynamic shared memory. The kernel is first
// allowed all the dynamic shared memory the device has beside its static shared memory (a
// permission, not a reservation: the sizes of one kernel for other layers then launch whatever the
// order of the calls). Remembered per (kernel, device, smem), since the queries cost host time.
template <typename Kernel>
cudaError_t resident(Kernel kernel, int smem, const Device& d, int* per_sm) {
  struct Fit {
    const void* kernel;
    int device, smem, per_sm;
  };
  static std::mutex mutex;
  static Fit fits[64];
  static int used = 0, next = 0;
  const void* key = reinterpret_cast<const void*>(kernel);
  const std::lock_guard<std::mutex> lock(mutex);
  for (int i = 0; i < used; ++i) {
    if (fits[i].kernel == key && fits[i].device == d.id && fits[i].smem == smem) {
      *per_sm = fits[i].per_sm;
      return cudaSuccess;
    }
  }
  Fit fit{key, d.id, smem, 0};
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err == cudaSuccess) {
    const int dynamic = d.optin - static_cast<int>(attributes.sharedSizeBytes);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic);
  }
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit.per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (fit.per_sm < 1) return cudaErrorInvalidConfiguration;
  fits[next] = fit;
  next = (next + 1) % 64;
  if (used < 64) ++used;
  *per_sm = fit.per_sm;
  return cudaSuccess;
}

template <class Path, int NBITS, int G>
cudaError_t gemv_launch(Args a, const Device& d, cudaStream_t stream) {
  const auto kernel = gemv_kernel<Path, NBITS, G>;
  int per_sm = 0;
  cudaError_t err = fit_copies(a, kGemvStaticBytes, d);
  if (err == cudaSuccess) err = resident(kernel, a.book_bytes, d, &per_sm);
  if (err != cudaSuccess) return err;
  // A persistent grid: each CTA copies the codebooks once for all the row blocks it takes.
  const int64_t blocks = (a.N + kGemvRows - 1) / kGemvRows;
  const int64_t most = int64_t(d.sms) * per_sm;
  const unsigned grid = static_cast<unsigned>(blocks < most ? blocks : most);
  kernel<<<grid, kThreads, a.book_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <class Path, int NBITS, int G>
cudaError_t gemm_launch(Args a, const Device& d, cudaStream_t stream) {
  const auto kernel = gemm_kernel<Path, NBITS, G>;
  int per_sm = 0;
  cudaError_t err = fit_copies(a, gemm_tile_bytes<Path>(), d);
  const int smem = a.book_bytes + gemm_tile_bytes<Path>();
  if (err == cudaSuccess) err = resident(kernel, smem, d, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t n_tiles = (a.N + kGemmBN - 1) / kGemmBN;
  if (n_tiles > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const int64_t rows = a.M;
  const size_t x_bytes = a.x_dtype == DType::kFloat32 ? 4 : 2;
  // The grid's y dimension bounds the row tiles of one launch; more rows take more launches.
  for (int64_t m = 0; m < rows; m += int64_t(kMaxGridY) * kGemmBM) {
    const int64_t chunk = rows - m < int64_t(kMaxGridY) * kGemmBM ? rows - m : int64_t(kMaxGridY) * kGemmBM;
    Args part = a;
    part.M = chunk;
    part.x = static_cast<const unsigned char*>(a.x) + size_t(m) * size_t(a.K) * x_bytes;
    part.y = static_cast<unsigned char*>(a.y) + size_t(m) * size_t(a.N) * x_bytes;
    const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>((chunk + kGemmBM - 1) / kGemmBM));
    kernel<<<grid, kThreads, smem, stream>>>(part);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class Path, int NBITS, int G>
cudaError_t run_config(const Args& a, const Device& d, cudaStream_t stream) {
  return a.M <= kGemvMaxRows ? gemv_launch<Path, NBITS, G>(a, d, stream) : gemm_launch<Path, NBITS, G>(a, d, stream);
}

template <class Path>
cudaError_t run_path(const Args& a, int nbits, int g, const Device& d, cudaStream_t stream) {
  if (nbits == 8) return g == 8 ? run_config<Path, 8, 8>(a, d, stream) : run_config<Path, 8, 4>(a, d, stream);
  return g == 8 ? run_config<Path, 16, 8>(a, d, stream) : run_config<Path, 16, 4>(a, d, stream);
}

}  // namespace

cudaError_t matmul(DType dtype, const void* x, int64_t rows, const Weight& w, const void* bias, void* y,
                   cudaStream_t stream) {
  if (rows < 0 || w.out_features < 0 || w.in_groups < 0 || (w.num_codebooks != 1 && w.num_codebooks != 2) ||
      (w.nbits != 8 && w.nbits != 16) || (w.group_size != 4 && w.group_size != 8)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || w.out_features == 0) return cudaSuccess;
  if (!aligned(x, 16) || !aligned(w.codebooks, 16)) return cudaErrorMisalignedAddress;

  Args a{};
  a.x = x;
  a.codes = w.codes;
  a.books = w.codebooks;
  a.scales = w.scales;
  a.bias = bias;
  a.y = y;
  a.M = rows;
  a.N = w.out_features;
  a.K = w.in_groups * w.group_size;
  a.groups = w.in_groups;
  a.units = (a.K + kUnit - 1) / kUnit;
  a.C = w.num_codebooks;
  a.x_dtype = dtype;
  a.book_dtype = w.codebook_dtype;
  a.scale_dtype = w.scale_dtype;
  const int code_bytes = w.nbits / 8;
  a.codes_vec8 = aligned(w.codes, 8) && (w.in_groups * w.num_codebooks * code_bytes) % 8 == 0;
  if (w.nbits == 8) {
    // Copies of the codebooks: one per lane of a shared-memory wavefront (8 for 16-byte chunks, 16
    // for 8-byte ones), fewer where that would pass kMaxBookBytes (two fp32 codebooks of 8).
    const int entry_bytes = w.group_size * (w.codebook_dtype == DType::kFloat32 ? 4 : 2);
    const int chunk_bytes = entry_bytes >= 16 ? 16 : 8;
    int copies = 128 / chunk_bytes;
    while (copies > 1 && w.num_codebooks * 256 * entry_bytes * copies > kMaxBookBytes) copies /= 2;
    while ((1 << a.copy_shift) < copies) ++a.copy_shift;
    a.book_bytes = w.num_codebooks * 256 * entry_bytes * copies;
  }

  Device d;
  const cudaError_t err = device_info(&d);
  if (err != cudaSuccess) return err;
  const bool half = dtype == DType::kFloat16 && w.codebook_dtype == DType::kFloat16;
  const bool bf16 = dtype == DType::kBFloat16 && w.codebook_dtype == DType::kBFloat16;
  if (half) return run_path<HalfPath>(a, w.nbits, w.group_size, d, stream);
  if (bf16) return run_path<BF16Path>(a, w.nbits, w.group_size, d, stream);
  return run_path<MixedPath>(a, w.nbits, w.group_size, d, stream);
}

}  // namespace lowbit::cuda::codebook
