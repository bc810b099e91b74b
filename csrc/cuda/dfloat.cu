// CUDA kernels of the dfloat format: decode to dense (lowbit::dfloat_decode) and decode fused into
// a small-batch GEMV (lowbit::dfloat_gemv). Format: csrc/common/dfloat.h and docs/formats.md.
//
// Who owns what. A CTA holds `groups` thread groups of G = round_up(windows_per_block, 32) threads.
// A group decodes one format block at a time (blocks are dealt to the groups of a persistent grid
// round-robin); thread t of the group owns window b * windows_per_block + t of block b:
//   1. count: thread t counts the codes that start in its window (from window * W + gap to the
//      window's end), without storing them;
//   2. an exclusive scan of the counts over the group gives each thread its first symbol in the
//      block, and block_starts[b] places the block in the output;
//   3. decode: each thread decodes its window again and writes its symbols, one byte each, to the
//      group's staging buffer in shared memory, in output order;
//   4. consume: the group walks the staged symbols in output order, thread t taking chunks t,
//      t + G, ... of 16 output bytes, so that the raw bytes (global), the output (global) and x
//      (gemv) are read and written coalesced and vectorized; each symbol is merged with its raw bits
//      and the float is either stored (decode) or multiplied with x and summed per output row (gemv).
//      For uint8 (decode only) the symbols are the output bytes and there are no raw bits.
// Symbols past the staging capacity (a block much denser than the average one) take a slow direct
// path in step 3 instead, so any stream decodes correctly whatever the capacity.
//
// Shared memory per CTA: a table of up to three symbols per 12-bit peek (uint32 [4096], 16 KB), built
// from the stream's decode table, which is staged too (int16 [4096], 8 KB; for the last < 12 bits of
// a window); both are shared by the groups. Per group: a scan scratch and the staging buffer.
//
// Corrupted streams: every read of the code stream is bounded by its buffer size (words past it read
// as 0), a window stops at its end, and every write is bounded by n and the staging capacity. A peek
// that starts no code, a window whose last code does not end where the next window's first code
// starts, and symbol counts that disagree with block_starts set bits in *error; the gemv's last
// kernel then writes NaN everywhere (decode leaves the check to its caller).
#include "dfloat.h"

#include <cuda_fp16.h>

#include <mutex>

#include "../common/dfloat.h"

namespace lowbit::cuda::dfloat {
namespace {

using ::lowbit::dfloat::entry_length;
using ::lowbit::dfloat::entry_symbol;
using ::lowbit::dfloat::gap_of;
using ::lowbit::dfloat::kMaxCodeLen;
using ::lowbit::dfloat::kPeekMask;
using ::lowbit::dfloat::kTableSize;
using ::lowbit::dfloat::merge16;
using ::lowbit::dfloat::merge32;

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kMultiBytes = kTableSize * 4;          // uint32 [4096]
constexpr int kTableBytes = kTableSize * 2;          // uint16 [4096]
constexpr int kTablesBytes = kMultiBytes + kTableBytes;
constexpr int kScratchBytes = 36 * 4;                // 32 warp sums + the total, 16-byte multiple
constexpr int kNoRow = 0x7FFFFFFF;                   // gemv: no partial sum pending

// ---- decode tables -------------------------------------------------------------------------------
//
// Multi-symbol entry, for a 12-bit peek in stream order:
//
//   bit:  31 30 | 29 28 | 27 .. 24 | 23 .. 16 | 15 .. 8 | 7 .. 0
//          0  0 | count | length   | symbol 2 | symbol 1| symbol 0
//
// count (0..3) codes lie wholly within the 12 bits, `length` bits in all; count 0: the peek starts no
// code. With a prefix code, a code of length l at offset o <= 12 - l is fully known from the peek, so
// looking it up with the bits past the peek set to zero gives its true entry.

__device__ __forceinline__ uint32_t multi_entry(const uint16_t* table, uint32_t peek) {
  const uint32_t e0 = table[peek];
  const uint32_t l0 = e0 >> 8;
  if (l0 - 1u >= static_cast<uint32_t>(kMaxCodeLen)) return 0;
  const uint32_t one = (e0 & 0xFFu) | (l0 << 24) | (1u << 28);
  const uint32_t e1 = table[peek >> l0];
  const uint32_t l1 = e1 >> 8;
  if (l1 == 0 || l0 + l1 > static_cast<uint32_t>(kMaxCodeLen)) return one;
  const uint32_t l01 = l0 + l1;
  const uint32_t two = (e0 & 0xFFu) | ((e1 & 0xFFu) << 8) | (l01 << 24) | (2u << 28);
  const uint32_t e2 = table[peek >> l01];
  const uint32_t l2 = e2 >> 8;
  if (l2 == 0 || l01 + l2 > static_cast<uint32_t>(kMaxCodeLen)) return two;
  return (two & 0xFFFFu) | ((e2 & 0xFFu) << 16) | ((l01 + l2) << 24) | (3u << 28);
}

struct Tables {
  const uint32_t* multi;  // [4096], shared memory
  const uint16_t* table;  // [4096], shared memory: the stream's decode table
};

// Stages the decode table and builds the multi-symbol table; all threads of the CTA take part.
__device__ __forceinline__ Tables load_tables(const int16_t* table, uint8_t* smem) {
  uint32_t* multi = reinterpret_cast<uint32_t*>(smem);
  uint16_t* single = reinterpret_cast<uint16_t*>(smem + kMultiBytes);
  const uint4* src = reinterpret_cast<const uint4*>(table);
  uint4* dst = reinterpret_cast<uint4*>(single);
  for (int i = threadIdx.x; i < kTableBytes / 16; i += blockDim.x) dst[i] = __ldg(src + i);
  __syncthreads();
  for (int p = threadIdx.x; p < kTableSize; p += blockDim.x) multi[p] = multi_entry(single, p);
  __syncthreads();
  return {multi, single};
}

// ---- reading a window ----------------------------------------------------------------------------

// A thread's read position: the 64 bits hi:lo hold the stream from bit 32 * (word of lo) on, of which
// `off` (< 32) are consumed; `ahead` is the word after hi, loaded early to hide its latency.
struct Cursor {
  const uint32_t* words;  // the code stream as little-endian words
  int64_t nwords;         // whole words in the buffer; reads past them give 0
  int64_t next;           // index of the word after `ahead`
  uint32_t lo, hi, ahead, off;
  int32_t left;           // bits before the window's end

  __device__ __forceinline__ uint32_t load(int64_t i) const { return i < nwords ? __ldg(words + i) : 0u; }

  __device__ __forceinline__ void start(const Stream& s, int64_t window) {
    const int64_t bit = window * s.window_bits;  // a multiple of 32
    const int64_t w = bit >> 5;
    lo = load(w);
    hi = load(w + 1);
    ahead = load(w + 2);
    next = w + 3;
    off = gap_of(s.gaps, window);
    const int64_t to_end = s.total_bits - bit;
    left = static_cast<int32_t>(to_end < s.window_bits ? to_end : s.window_bits) - static_cast<int32_t>(off);
  }

  __device__ __forceinline__ uint32_t peek() const { return __funnelshift_r(lo, hi, off) & kPeekMask; }

  // After the window is decoded: whether its last code ends where window + 1's first code starts
  // (at its gap), or at total_bits for the last window, as in a sound stream.
  __device__ __forceinline__ bool ends_well(const Stream& s, int64_t window, int64_t windows) const {
    const int64_t to_end = s.total_bits - window * s.window_bits;
    const int64_t end = to_end < s.window_bits ? to_end : s.window_bits;
    const int64_t next_gap = window + 1 < windows ? gap_of(s.gaps, window + 1) : 0;
    const int64_t expected = to_end < s.window_bits + next_gap ? to_end : s.window_bits + next_gap;
    return end - left == expected;
  }

  // bits <= 12, so one word shift restores off < 32 (and off + 12 <= 64 for the next peek).
  __device__ __forceinline__ void advance(uint32_t bits) {
    off += bits;
    left -= static_cast<int32_t>(bits);
    if (off >= 32) {
      off -= 32;
      lo = hi;
      hi = ahead;
      ahead = load(next++);
    }
  }
};

// Decodes the codes that start in the cursor's window, calling emit(symbols, count, index) per
// lookup: `count` (1..3) symbols in the low bytes of `symbols`, the first being the window's symbol
// number `index`. Returns the number of symbols; on a peek that starts no code sets `bad` and stops.
// While >= 12 bits are left, a lookup takes every code within the peek (all start before the end);
// the last bits go one code at a time, so that no code starting past the end is taken.
template <typename Emit>
__device__ __forceinline__ int decode_window(const Tables& t, Cursor& c, bool& bad, Emit&& emit) {
  int count = 0;
  while (c.left >= kMaxCodeLen) {
    const uint32_t e = t.multi[c.peek()];
    const uint32_t k = e >> 28;
    if (k == 0) {
      bad = true;
      return count;
    }
    emit(e, k, count);
    count += static_cast<int>(k);
    c.advance((e >> 24) & 0xFu);
  }
  while (c.left > 0) {
    const uint16_t e = t.table[c.peek()];
    const uint32_t length = entry_length(e);
    if (length - 1u >= static_cast<uint32_t>(kMaxCodeLen)) {
      bad = true;
      return count;
    }
    emit(entry_symbol(e), 1u, count);
    ++count;
    c.advance(length);
  }
  return count;
}

// ---- groups --------------------------------------------------------------------------------------

// Not .aligned: threads may reach it from divergent code (after their own decode loops).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("barrier.sync %0, %1;" : : "r"(id), "r"(threads) : "memory");
}

struct Group {
  int index;    // in the CTA
  int threads;  // G, a multiple of 32
  int tid;      // thread in the group

  // Groups advance independently, so each has its own barrier (0 is __syncthreads').
  __device__ __forceinline__ void sync() const {
    if (threads == 32) {
      __syncwarp();
    } else {
      named_barrier(index + 1, threads);
    }
  }
};

// Exclusive prefix sum of v over the group; *total gets the sum. scratch: the group's 33 ints.
__device__ __forceinline__ int group_scan(int v, int* total, int* scratch, const Group& g) {
  const int lane = g.tid & 31, warp = g.tid >> 5, warps = g.threads >> 5;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += up;
  }
  if (lane == 31) scratch[warp] = incl;
  g.sync();
  if (warp == 0) {
    const int w = lane < warps ? scratch[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(kFullMask, wincl, d);
      if (lane >= d) wincl += up;
    }
    if (lane < warps) scratch[lane] = wincl - w;
    if (lane == 31) scratch[32] = wincl;
  }
  g.sync();
  *total = scratch[32];
  return scratch[warp] + incl - v;
}

// ---- floats from symbols and raw bits ------------------------------------------------------------

// Bits is uint8_t for bytes (the symbol itself; raw is not read), uint16_t for bf16 / fp16, uint32_t
// for fp32.
template <typename Bits>
__device__ __forceinline__ Bits merged(uint32_t symbol, const uint8_t* raw, int64_t i) {
  if constexpr (sizeof(Bits) == 1) {
    return static_cast<uint8_t>(symbol);
  } else if constexpr (sizeof(Bits) == 2) {
    return merge16(symbol, raw[i]);
  } else {
    return merge32(symbol, raw + 3 * i);
  }
}

// Two 16-bit floats from symbol and raw bytes 0, 1 (sel 0x4140) or 2, 3 (sel 0x4342) of two words:
// each byte pair is spread to 16-bit lanes, then merged as merge16 does.
__device__ __forceinline__ uint32_t merge16x2(uint32_t symbols, uint32_t raws, uint32_t sel) {
  const uint32_t s = __byte_perm(symbols, 0, sel);
  const uint32_t r = __byte_perm(raws, 0, sel);
  return ((r & 0x00800080u) << 8) | (s << 7) | (r & 0x007F007Fu);
}

// fp32 bits from a symbol and 24 raw bits.
__device__ __forceinline__ uint32_t merge32w(uint32_t symbol, uint32_t raw) {
  return ((raw & 0x800000u) << 8) | (symbol << 23) | (raw & 0x7FFFFFu);
}

// Elements per 16-byte chunk of output.
template <typename Bits>
constexpr int kVec = 16 / static_cast<int>(sizeof(Bits));

// The bits of the kVec elements from a (a multiple of kVec): symbols at `symbols` (shared, aligned
// as a), raw bytes from global memory.
template <typename Bits>
__device__ __forceinline__ uint4 merge_chunk(const uint8_t* symbols, const uint8_t* raw, int64_t a) {
  if constexpr (sizeof(Bits) == 1) {
    return *reinterpret_cast<const uint4*>(symbols);  // bytes: the 16 staged symbols are the output
  } else if constexpr (sizeof(Bits) == 2) {
    const uint2 s = *reinterpret_cast<const uint2*>(symbols);
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(raw + a));
    return make_uint4(merge16x2(s.x, r.x, 0x4140), merge16x2(s.x, r.x, 0x4342), merge16x2(s.y, r.y, 0x4140),
                      merge16x2(s.y, r.y, 0x4342));
  } else {
    // Element e's raw bits are bytes 3e .. 3e + 2 of the 12 bytes r0 r1 r2 (little-endian).
    const uint32_t s = *reinterpret_cast<const uint32_t*>(symbols);
    const uint32_t* r = reinterpret_cast<const uint32_t*>(raw + 3 * a);
    const uint32_t r0 = __ldg(r), r1 = __ldg(r + 1), r2 = __ldg(r + 2);
    return make_uint4(merge32w(s & 0xFFu, r0 & 0xFFFFFFu),
                      merge32w((s >> 8) & 0xFFu, __funnelshift_r(r0, r1, 24) & 0xFFFFFFu),
                      merge32w((s >> 16) & 0xFFu, __funnelshift_r(r1, r2, 16) & 0xFFFFFFu),
                      merge32w(s >> 24, r2 >> 8));
  }
}

template <DType K>
struct Float;

template <>
struct Float<DType::kBFloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float of(uint32_t b) { return __uint_as_float(b << 16); }
  // Two elements packed in a word, low half first.
  static __device__ __forceinline__ void pair(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xFFFF0000u);
  }
  // Round to nearest even, as torch's float -> bfloat16 cast (NaN -> 0x7FFF, as __float2bfloat16).
  static __device__ __forceinline__ uint16_t from(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Float<DType::kFloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float of(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ void pair(uint32_t w, float& lo, float& hi) {
    lo = of(w & 0xFFFFu);
    hi = of(w >> 16);
  }
  static __device__ __forceinline__ uint16_t from(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Float<DType::kFloat32> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float of(uint32_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ uint32_t from(float v) { return __float_as_uint(v); }
};

// ---- consumers -----------------------------------------------------------------------------------
//
// A sink receives a block's elements [lo, hi) whose symbols are staged at stage[i - base] (base a
// multiple of 16, so chunks of kVec elements are aligned in shared and global memory alike), and
// single elements past the staging capacity through overflow().

template <typename Bits>
struct DecodeSink {
  const uint8_t* raw;
  Bits* out;

  __device__ __forceinline__ void overflow(int64_t i, uint32_t symbol) const { out[i] = merged<Bits>(symbol, raw, i); }

  __device__ __forceinline__ void consume(const uint8_t* stage, int64_t base, int64_t lo, int64_t hi,
                                          const Group& g) const {
    constexpr int V = kVec<Bits>;
    const int64_t stride = int64_t(g.threads) * V;
    for (int64_t a = (lo & ~int64_t(V - 1)) + int64_t(g.tid) * V; a < hi; a += stride) {
      if (a >= lo && a + V <= hi) {
        *reinterpret_cast<uint4*>(out + a) = merge_chunk<Bits>(stage + (a - base), raw, a);
      } else {
        for (int e = 0; e < V; ++e) {
          const int64_t i = a + e;
          if (i >= lo && i < hi) out[i] = merged<Bits>(stage[i - base], raw, i);
        }
      }
    }
  }
};

// Element i of W is (row i / in, column i % in). Thread t takes chunks t, t + G, ... of VEC elements
// (VEC = kVec when in % kVec == 0, so that a chunk never spans two rows; else 1) and sums
// w * x[b][col] per row in registers (acc[b], for row `key`). When any lane of a warp is about to
// leave its row, the warp flushes: a segmented shuffle reduction over lanes with equal keys (the keys
// rise with the lane, chunks being in order), then one fp32 atomicAdd per row and batch row into the
// workspace. A warp thus flushes about once per row it crosses, not once per element.
template <DType K, int VEC, int BMAX>
struct GemvSink {
  using Bits = typename Float<K>::Bits;
  const uint8_t* raw;
  const Bits* x;      // [batch, in]
  float* ws;          // [batch, out]
  int64_t in, out;
  int batch;          // 1 .. BMAX
  int64_t step_rows;  // (G * VEC) / in: rows advanced per round
  int64_t step_cols;  // (G * VEC) % in

  __device__ __forceinline__ void overflow(int64_t i, uint32_t symbol) const {
    const float w = Float<K>::of(merged<Bits>(symbol, raw, i));
    const int64_t row = i / in, col = i - row * in;
    for (int b = 0; b < batch; ++b) atomicAdd(ws + b * out + row, w * Float<K>::of(x[b * in + col]));
  }

  __device__ __forceinline__ void add_one(uint32_t symbol, int64_t i, int64_t col, float (&acc)[BMAX]) const {
    const float w = Float<K>::of(merged<Bits>(symbol, raw, i));
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < batch) acc[b] = fmaf(w, Float<K>::of(x[b * in + col]), acc[b]);
    }
  }

  __device__ __forceinline__ void add_chunk(const uint8_t* symbols, int64_t a, int64_t col, float (&acc)[BMAX]) const {
    const uint4 m = merge_chunk<Bits>(symbols, raw, a);
    if constexpr (sizeof(Bits) == 2) {
      float w[8];
      Float<K>::pair(m.x, w[0], w[1]);
      Float<K>::pair(m.y, w[2], w[3]);
      Float<K>::pair(m.z, w[4], w[5]);
      Float<K>::pair(m.w, w[6], w[7]);
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        if (b < batch) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + b * in + col));
          float xf[8];
          Float<K>::pair(xv.x, xf[0], xf[1]);
          Float<K>::pair(xv.y, xf[2], xf[3]);
          Float<K>::pair(xv.z, xf[4], xf[5]);
          Float<K>::pair(xv.w, xf[6], xf[7]);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[b] = fmaf(w[e], xf[e], acc[b]);
        }
      }
    } else {
      const float w[4] = {__uint_as_float(m.x), __uint_as_float(m.y), __uint_as_float(m.z), __uint_as_float(m.w)};
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        if (b < batch) {
          const float4 xv = __ldg(reinterpret_cast<const float4*>(x + b * in + col));
          acc[b] = fmaf(w[0], xv.x, acc[b]);
          acc[b] = fmaf(w[1], xv.y, acc[b]);
          acc[b] = fmaf(w[2], xv.z, acc[b]);
          acc[b] = fmaf(w[3], xv.w, acc[b]);
        }
      }
    }
  }

  // Adds each lane's acc to row `key` (kNoRow: nothing pending) and clears acc. Whole warp.
  __device__ __forceinline__ void flush(float (&acc)[BMAX], int key, int lane) const {
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int other = __shfl_down_sync(kFullMask, key, d);
      const bool same = lane + d < 32 && other == key;
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        const float v = __shfl_down_sync(kFullMask, acc[b], d);
        if (same) acc[b] += v;
      }
    }
    // Lane l now holds the sum over lanes l .. the end of its key's run; the run's first lane adds it.
    const int before = __shfl_up_sync(kFullMask, key, 1);
    if (key != kNoRow && (lane == 0 || before != key)) {
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        if (b < batch) atomicAdd(ws + b * out + key, acc[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = 0.f;
  }

  __device__ __forceinline__ void consume(const uint8_t* stage, int64_t base, int64_t lo, int64_t hi,
                                          const Group& g) const {
    const int lane = g.tid & 31;
    const int64_t first = lo & ~int64_t(VEC - 1);
    const int64_t stride = int64_t(g.threads) * VEC;
    const int64_t rounds = (hi - first + stride - 1) / stride;  // the same for the whole group
    int64_t a = first + int64_t(g.tid) * VEC;
    int64_t row = a / in, col = a - row * in;
    float acc[BMAX];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = 0.f;
    int key = kNoRow;
    for (int64_t r = 0; r < rounds; ++r) {
      const bool active = a < hi;
      // Lanes with a pending sum: those active last round, a prefix of the warp whose rows rise
      // with the lane, so the flush's runs of equal keys are contiguous.
      const int now = active ? static_cast<int>(row) : kNoRow;
      if (__any_sync(kFullMask, key != kNoRow && now != key)) {
        flush(acc, key, lane);
        key = kNoRow;
      }
      if (active) {
        key = now;
        if (VEC > 1 && a >= lo && a + VEC <= hi) {
          add_chunk(stage + (a - base), a, col, acc);
        } else {
          for (int e = 0; e < VEC; ++e) {
            const int64_t i = a + e;
            if (i >= lo && i < hi) add_one(stage[i - base], i, col + e, acc);
          }
        }
      }
      a += stride;
      col += step_cols;
      row += step_rows;
      if (col >= in) {
        col -= in;
        ++row;
      }
    }
    flush(acc, key, lane);
  }
};

// ---- the block loop ------------------------------------------------------------------------------

struct Plan {
  int group_threads;  // G
  int groups;         // per CTA
  int cap;            // staging bytes per group, a multiple of 16
  int64_t windows;
  int64_t blocks;
  size_t smem;        // dynamic shared memory per CTA
  int per_sm;         // CTAs resident per SM
};

template <typename Sink>
__device__ __forceinline__ void run_blocks(const Stream& s, const Plan& p, const Sink& sink, int* error) {
  extern __shared__ uint4 smem_words[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_words);
  const Tables tables = load_tables(s.table, smem);
  const int gi = static_cast<int>(threadIdx.x) / p.group_threads;
  const Group g{gi, p.group_threads, static_cast<int>(threadIdx.x) - gi * p.group_threads};
  uint8_t* region = smem + kTablesBytes + size_t(gi) * (kScratchBytes + p.cap);
  int* scratch = reinterpret_cast<int*>(region);
  uint8_t* stage = region + kScratchBytes;
  const int cap = p.cap;

  Cursor c;
  c.words = reinterpret_cast<const uint32_t*>(s.codes);
  c.nwords = s.codes_bytes >> 2;
  const int64_t slots = int64_t(gridDim.x) * p.groups;
  for (int64_t b = int64_t(gi) * gridDim.x + blockIdx.x; b < p.blocks; b += slots) {
    const int64_t window = b * s.windows_per_block + g.tid;
    const bool owns = g.tid < s.windows_per_block && window < p.windows;
    bool bad = false;
    int count = 0;
    bool ends_well = true;
    if (owns) {
      c.start(s, window);
      count = decode_window(tables, c, bad, [](uint32_t, uint32_t, int) {});
      ends_well = c.ends_well(s, window, p.windows);
    }
    if (bad) atomicOr(error, kErrorBadCode);
    if (!ends_well) atomicOr(error, kErrorBadEnd);
    int total;
    const int first = group_scan(count, &total, scratch, g);

    const int64_t lo = __ldg(s.block_starts + b), next = __ldg(s.block_starts + b + 1);
    const bool fits = lo >= 0 && lo <= s.n && total <= s.n - lo;
    if (g.tid == 0 && (!fits || next - lo != total || (b == 0 && lo != 0) || (b == p.blocks - 1 && next != s.n))) {
      atomicOr(error, kErrorBadCount);
    }
    if (!fits) {  // the whole group: lo and total are uniform
      g.sync();   // the scratch is read above and rewritten by the next block's scan
      continue;
    }

    const int off = static_cast<int>(lo & 15);  // stage index of element i: i - (lo - off)
    if (owns && count > 0) {
      c.start(s, window);
      const int at0 = off + first;
      const int64_t i0 = lo + first;
      decode_window(tables, c, bad, [&](uint32_t symbols, uint32_t k, int index) {
        const int at = at0 + index;
        if (at + 3 <= cap) {
          stage[at] = static_cast<uint8_t>(symbols);
          if (k > 1) stage[at + 1] = static_cast<uint8_t>(symbols >> 8);
          if (k > 2) stage[at + 2] = static_cast<uint8_t>(symbols >> 16);
        } else {
          for (int q = 0; q < static_cast<int>(k); ++q) {
            const uint32_t symbol = (symbols >> (8 * q)) & 0xFFu;
            if (at + q < cap) {
              stage[at + q] = static_cast<uint8_t>(symbol);
            } else {
              sink.overflow(i0 + index + q, symbol);
            }
          }
        }
      });
    }
    g.sync();
    const int staged = total < cap - off ? total : cap - off;
    sink.consume(stage, lo - off, lo, lo + staged, g);
    // No barrier needed here: the next block rewrites the scratch only after this block's last
    // reads of it (before the barrier above), and the stage only after the next scan's barriers.
  }
}

template <typename Bits>
__global__ void __launch_bounds__(1024) decode_kernel(Stream s, Plan p, Bits* out, int* error) {
  run_blocks(s, p, DecodeSink<Bits>{s.raw, out}, error);
}

template <DType K, int VEC, int BMAX>
__global__ void __launch_bounds__(1024) gemv_kernel(Stream s, Plan p, GemvSink<K, VEC, BMAX> sink, int* error) {
  run_blocks(s, p, sink, error);
}

// y[i] = ws[i] + bias[i % out], cast to the output dtype; NaN everywhere if the decode kernels
// flagged the stream as corrupted (read here, on the device, so that the host never waits).
// Thread per element, grid-stride.
template <DType K>
__global__ void gemv_epilogue_kernel(const float* __restrict__ ws, const typename Float<K>::Bits* __restrict__ bias,
                                     const int* __restrict__ error, typename Float<K>::Bits* __restrict__ y,
                                     int64_t total, int64_t out) {
  const bool corrupted = *error != 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = corrupted ? __uint_as_float(0x7FC00000u) : ws[i];
    if (bias != nullptr) v += Float<K>::of(bias[i % out]);
    y[i] = Float<K>::from(v);
  }
}

// ---- host side -----------------------------------------------------------------------------------

struct Device {
  int id = 0;
  int sms = 0;
  int smem_optin = 0;  // max dynamic shared memory per CTA
};

cudaError_t device_info(Device* d) {
  cudaError_t err = cudaGetDevice(&d->id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, d->id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d->id);
  return err;
}

bool aligned(const void* p, uintptr_t to) { return (reinterpret_cast<uintptr_t>(p) & (to - 1)) == 0; }

cudaError_t check_stream(const Stream& s) {
  if (s.windows_per_block < 1 || s.windows_per_block > kMaxWindowsPerBlock || s.window_bits < 32 ||
      s.window_bits % 32 != 0 || s.window_bits > kMaxWindowBits || s.n < 0 || s.total_bits < 0 ||
      s.codes_bytes < (s.total_bits + 7) / 8 + 8) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(s.codes, 4) || !aligned(s.raw, 16) || !aligned(s.table, 16)) return cudaErrorMisalignedAddress;
  return cudaSuccess;
}

// Staging per group: the symbols of an average full block (n * block bits / total_bits), 1/8 more
// and a margin (rounded up, so that similar layers share a launch configuration), but no more than a
// block can hold; shrunk to what the device's shared memory allows for one group.
cudaError_t make_plan(const Stream& s, const Device& d, Plan* p) {
  p->group_threads = static_cast<int>((s.windows_per_block + 31) / 32 * 32);
  p->windows = (s.total_bits + s.window_bits - 1) / s.window_bits;
  p->blocks = (p->windows + s.windows_per_block - 1) / s.windows_per_block;
  const int64_t block_bits = s.window_bits * s.windows_per_block;
  const double average = static_cast<double>(s.n) * static_cast<double>(block_bits) / static_cast<double>(s.total_bits);
  int64_t cap = static_cast<int64_t>(average * 1.125) + 64;
  if (cap > block_bits) cap = block_bits;
  if (cap > s.n) cap = s.n;
  cap += 16;  // the stage starts at the block's first element mod 16
  cap = cap > 4096 ? (cap + 255) / 256 * 256 : (cap + 15) / 16 * 16;
  const int64_t room = (d.smem_optin - kTablesBytes - kScratchBytes) / 16 * 16;
  if (cap > room) cap = room;
  if (cap < 32) return cudaErrorInvalidConfiguration;
  p->cap = static_cast<int>(cap);
  return cudaSuccess;
}

// Groups per CTA: the count that keeps the most groups resident per SM (the occupancy API counts
// registers, threads and shared memory; more groups per CTA share one copy of the tables), so that
// as many blocks as possible are decoded in the first round of the persistent grid. Remembered per
// kernel, device and layout, since the search costs host time.
struct Fit {
  const void* kernel;
  int device, group_threads, cap, groups, per_sm;
};

template <typename Kernel>
cudaError_t fit_groups(Kernel kernel, const Device& d, Plan* p) {
  static std::mutex mutex;
  static Fit fits[32];
  static int used = 0, next = 0;
  const void* key = reinterpret_cast<const void*>(kernel);
  const std::lock_guard<std::mutex> lock(mutex);
  const Fit* found = nullptr;
  for (int i = 0; i < used && found == nullptr; ++i) {
    const Fit& f = fits[i];
    if (f.kernel == key && f.device == d.id && f.group_threads == p->group_threads && f.cap == p->cap) found = &f;
  }
  Fit fit{key, d.id, p->group_threads, p->cap, 0, 0};
  if (found != nullptr) {
    fit = *found;
  } else {
    // Larger dynamic shared memory needs the kernel's permission; it does not reserve any.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin);
    if (err != cudaSuccess) return err;
    // Named barriers 1..15 serve the groups; one-warp groups use __syncwarp and need none.
    const int by_threads = 1024 / p->group_threads;
    const int by_barriers = p->group_threads == 32 ? 32 : 15;
    const int most = by_threads < by_barriers ? by_threads : by_barriers;
    for (int groups = 1; groups <= most; ++groups) {
      const size_t smem = size_t(kTablesBytes) + size_t(groups) * size_t(kScratchBytes + p->cap);
      if (smem > size_t(d.smem_optin)) break;
      int per_sm = 0;
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, groups * p->group_threads, smem);
      if (err != cudaSuccess) return err;
      if (per_sm > 0 && per_sm * groups >= fit.per_sm * fit.groups) {  // ties: fewer copies of the tables
        fit.groups = groups;
        fit.per_sm = per_sm;
      }
    }
    if (fit.groups == 0) return cudaErrorInvalidConfiguration;
    fits[next] = fit;
    next = (next + 1) % 32;
    if (used < 32) ++used;
  }
  p->groups = fit.groups;
  p->per_sm = fit.per_sm;
  p->smem = size_t(kTablesBytes) + size_t(p->groups) * size_t(kScratchBytes + p->cap);
  return cudaSuccess;
}

// A persistent grid: as many CTAs as are resident at once, never more than there are blocks for
// their groups. Both kernels take (stream, plan, sink or output, error).
template <typename Out>
cudaError_t launch_blocks(void (*kernel)(Stream, Plan, Out, int*), const Stream& s, Plan p, const Device& d, Out out,
                          int* error, cudaStream_t stream) {
  cudaError_t err = fit_groups(kernel, d, &p);
  if (err != cudaSuccess) return err;
  const int64_t wanted = (p.blocks + p.groups - 1) / p.groups;
  const int64_t resident = int64_t(p.per_sm) * d.sms;
  const int grid = static_cast<int>(wanted < resident ? wanted : resident);
  kernel<<<grid, p.groups * p.group_threads, p.smem, stream>>>(s, p, out, error);
  return cudaGetLastError();
}

template <DType K, int VEC, int BMAX>
cudaError_t gemv_rows(const Stream& s, const Plan& p, const Device& d, const void* x, int rows, int64_t in,
                      int64_t out, float* ws, int* error, cudaStream_t stream) {
  using Bits = typename Float<K>::Bits;
  const int64_t step = int64_t(p.group_threads) * VEC;
  const GemvSink<K, VEC, BMAX> sink{s.raw, static_cast<const Bits*>(x), ws, in, out, rows, step / in, step % in};
  return launch_blocks(&gemv_kernel<K, VEC, BMAX>, s, p, d, sink, error, stream);
}

template <DType K, int VEC>
cudaError_t gemv_batch(const Stream& s, const Plan& p, const Device& d, const void* x, int rows, int64_t in,
                       int64_t out, float* ws, int* error, cudaStream_t stream) {
  if (rows <= 1) return gemv_rows<K, VEC, 1>(s, p, d, x, rows, in, out, ws, error, stream);
  if (rows <= 2) return gemv_rows<K, VEC, 2>(s, p, d, x, rows, in, out, ws, error, stream);
  if (rows <= 4) return gemv_rows<K, VEC, 4>(s, p, d, x, rows, in, out, ws, error, stream);
  return gemv_rows<K, VEC, 8>(s, p, d, x, rows, in, out, ws, error, stream);
}

template <DType K>
cudaError_t gemv_typed(const Stream& s, const void* x, int64_t batch, int64_t in, int64_t out, const void* bias,
                       float* ws, int* error, void* y, cudaStream_t stream) {
  using Bits = typename Float<K>::Bits;
  constexpr int V = kVec<Bits>;
  cudaError_t err = cudaSuccess;
  if (s.n > 0) {
    Device d;
    Plan p;
    err = device_info(&d);
    if (err == cudaSuccess) err = make_plan(s, d, &p);
    // At most 8 rows of x per pass over the weight, so that the partial sums stay in registers.
    for (int64_t b0 = 0; err == cudaSuccess && b0 < batch; b0 += 8) {
      const int rows = static_cast<int>(batch - b0 < 8 ? batch - b0 : 8);
      const Bits* xs = static_cast<const Bits*>(x) + b0 * in;
      float* wss = ws + b0 * out;
      err = in % V == 0 ? gemv_batch<K, V>(s, p, d, xs, rows, in, out, wss, error, stream)
                        : gemv_batch<K, 1>(s, p, d, xs, rows, in, out, wss, error, stream);
    }
    if (err != cudaSuccess) return err;
  }
  const int64_t total = batch * out;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 4096 ? blocks : 4096);
  auto epilogue = &gemv_epilogue_kernel<K>;
  epilogue<<<grid, kThreads, 0, stream>>>(ws, static_cast<const Bits*>(bias), error, static_cast<Bits*>(y), total, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t decode(const Stream& s, DType dtype, void* out, int* error, cudaStream_t stream) {
  cudaError_t err = check_stream(s);
  if (err != cudaSuccess) return err;
  if (!aligned(out, 16)) return cudaErrorMisalignedAddress;
  if (s.n == 0) return cudaSuccess;
  Device d;
  Plan p;
  err = device_info(&d);
  if (err == cudaSuccess) err = make_plan(s, d, &p);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::kUInt8:
      return launch_blocks(&decode_kernel<uint8_t>, s, p, d, static_cast<uint8_t*>(out), error, stream);
    case DType::kBFloat16:
    case DType::kFloat16:
      return launch_blocks(&decode_kernel<uint16_t>, s, p, d, static_cast<uint16_t*>(out), error, stream);
    case DType::kFloat32:
      return launch_blocks(&decode_kernel<uint32_t>, s, p, d, static_cast<uint32_t*>(out), error, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gemv(const Stream& s, DType dtype, const void* x, int64_t batch, int64_t in_features,
                 int64_t out_features, const void* bias, float* workspace, int* error, void* y,
                 cudaStream_t stream) {
  cudaError_t err = check_stream(s);
  if (err != cudaSuccess) return err;
  if (batch < 0 || in_features < 0 || out_features < 0 || out_features >= kNoRow ||
      s.n != in_features * out_features) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(x, 16)) return cudaErrorMisalignedAddress;
  if (batch == 0 || out_features == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return gemv_typed<DType::kBFloat16>(s, x, batch, in_features, out_features, bias, workspace, error, y, stream);
    case DType::kFloat16:
      return gemv_typed<DType::kFloat16>(s, x, batch, in_features, out_features, bias, workspace, error, y, stream);
    case DType::kFloat32:
      return gemv_typed<DType::kFloat32>(s, x, batch, in_features, out_features, bias, workspace, error, y, stream);
    case DType::kUInt8: break;  // a product of bytes is not a dfloat_gemv
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowbit::cuda::dfloat
