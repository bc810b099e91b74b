// C++ CPU encoder and decoder of the dfloat format.
//
// Encoder: each thread owns a contiguous range of elements. Pass 1 sums their code lengths; an
// exclusive prefix sum gives each thread its first stream bit; pass 2 writes the codes, the raw
// bytes, and the gaps and block starts of the windows whose first code it writes. Only the two
// boundary bytes of a thread's bit range can be shared with a neighbour; they are OR-ed atomically.
//
// Decoder: each thread owns whole format blocks, several at a time, interleaved; a block starts at
// its first window's gap and holds block_starts[b + 1] - block_starts[b] codes. Eight stream bytes
// are read at once, which the stream's 8 bytes of padding make safe for any position before
// total_bits, and a multi-code table decodes up to four (or two) codes per lookup.
#include "dfloat.h"

#include <omp.h>
#include <string.h>

#include <algorithm>
#include <list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/dfloat.h"

namespace lowbit::cpu::dfloat {
namespace {

using lowbit::dfloat::entry_length;
using lowbit::dfloat::entry_symbol;
using lowbit::dfloat::gap_of;
using lowbit::dfloat::kPeekMask;

template <typename Bits>
struct Fields;

// Bytes (uint8, e.g. packed 2- or 4-bit codes): the symbol is the whole element, there are no raw
// bits, and the raw buffer is empty (its pointer may be null: nothing is ever added to it).
template <>
struct Fields<uint8_t> {
  static constexpr int kRawBytes = 0;
  static uint32_t symbol(uint8_t x) { return x; }
};

template <>
struct Fields<uint16_t> {
  static constexpr int kRawBytes = 1;
  static uint32_t symbol(uint16_t x) { return (x >> 7) & 0xFFu; }
  static void raw(uint16_t x, uint8_t* out) { out[0] = static_cast<uint8_t>(((x >> 8) & 0x80u) | (x & 0x7Fu)); }
  static uint16_t merge(uint32_t symbol, const uint8_t* raw) { return lowbit::dfloat::merge16(symbol, raw[0]); }
};

template <>
struct Fields<uint32_t> {
  static constexpr int kRawBytes = 3;
  static uint32_t symbol(uint32_t x) { return (x >> 23) & 0xFFu; }
  static void raw(uint32_t x, uint8_t* out) {
    const uint32_t r = ((x >> 8) & 0x800000u) | (x & 0x7FFFFFu);
    out[0] = static_cast<uint8_t>(r);
    out[1] = static_cast<uint8_t>(r >> 8);
    out[2] = static_cast<uint8_t>(r >> 16);
  }
  static uint32_t merge(uint32_t symbol, const uint8_t* raw) { return lowbit::dfloat::merge32(symbol, raw); }
};

struct Range {
  int64_t begin, end;
};

Range thread_range(int64_t n, int thread, int threads) {
  return {n * thread / threads, n * (thread + 1) / threads};
}

// Appends codes LSB-first from stream bit `bit`; bytes that a neighbour may also write are OR-ed
// atomically, the rest stored.
class BitWriter {
 public:
  BitWriter(uint8_t* codes, int64_t bit) : codes_(codes), byte_(bit >> 3), first_(bit >> 3), used_(bit & 7) {}

  void put(uint32_t code, int length) {
    acc_ |= uint64_t(code) << used_;
    used_ += length;  // at most 31 + 12 bits held
    if (used_ >= 32) {
      if (byte_ == first_) {
        for (int k = 0; k < 4; ++k) store(static_cast<uint8_t>(acc_ >> (8 * k)));
      } else {
        // Four bytes in stream (little-endian) order; compilers make this one store.
        uint8_t* p = codes_ + byte_;
        p[0] = static_cast<uint8_t>(acc_);
        p[1] = static_cast<uint8_t>(acc_ >> 8);
        p[2] = static_cast<uint8_t>(acc_ >> 16);
        p[3] = static_cast<uint8_t>(acc_ >> 24);
        byte_ += 4;
      }
      acc_ >>= 32;
      used_ -= 32;
    }
  }

  void finish() {
    for (; used_ >= 8; used_ -= 8, acc_ >>= 8) store(static_cast<uint8_t>(acc_));
    if (used_ > 0) __atomic_fetch_or(&codes_[byte_], static_cast<uint8_t>(acc_), __ATOMIC_RELAXED);
  }

 private:
  void store(uint8_t value) {
    if (byte_ == first_) {
      __atomic_fetch_or(&codes_[byte_], value, __ATOMIC_RELAXED);
    } else {
      codes_[byte_] = value;
    }
    ++byte_;
  }

  uint8_t* codes_;
  int64_t byte_, first_;
  uint64_t acc_ = 0;
  int used_;
};

}  // namespace

template <typename Bits>
void histogram(const Bits* x, int64_t n, int64_t* counts) {
  std::fill(counts, counts + 256, 0);
#pragma omp parallel if (n > (1 << 16))
  {
    int64_t local[256] = {0};
    const Range r = thread_range(n, omp_get_thread_num(), omp_get_num_threads());
    for (int64_t i = r.begin; i < r.end; ++i) ++local[Fields<Bits>::symbol(x[i])];
#pragma omp critical
    for (int s = 0; s < 256; ++s) counts[s] += local[s];
  }
}

template <typename Bits>
const char* encode(const Bits* x, int64_t n, const uint8_t* lengths, const uint32_t* codewords, Stream out) {
  using F = Fields<Bits>;
  const int threads = n > (1 << 16) ? omp_get_max_threads() : 1;
  std::vector<int64_t> first_bit(threads + 1, 0);
  const int64_t W = out.window_bits, G = out.windows_per_block;
  const char* error = nullptr;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const Range r = thread_range(n, t, threads);
    int64_t bits = 0;
    bool uncoded = false;
    for (int64_t i = r.begin; i < r.end; ++i) {
      const uint8_t length = lengths[F::symbol(x[i])];
      uncoded |= length == 0;
      bits += length;
    }
    first_bit[t + 1] = uncoded ? -1 : bits;
#pragma omp barrier
#pragma omp single
    {
      for (int k = 0; k < threads; ++k) {
        if (first_bit[k + 1] < 0) error = "a symbol that occurs has no code (length 0)";
        first_bit[k + 1] += first_bit[k];
      }
      // The buffers were sized for total_bits: writing a longer stream would overflow them.
      if (!error && first_bit[threads] != out.total_bits) error = "total_bits disagrees with the code lengths";
    }  // implicit barrier: every thread sees `error`
    if (!error) {
      int64_t start = first_bit[t];
      BitWriter writer(out.codes, start);
      // Start of the previous element's code: window j gets its gap from the first code starting
      // at or after j * W, i.e. the element with prev_start < j * W <= start.
      int64_t prev_start = r.begin == 0 ? -1 : start - lengths[F::symbol(x[r.begin - 1])];
      for (int64_t i = r.begin; i < r.end; ++i) {
        const uint32_t s = F::symbol(x[i]);
        const int64_t window = start / W;
        if (prev_start < window * W) {  // codes are shorter than a window: at most one boundary
          out.gaps[window] = static_cast<uint8_t>(start - window * W);
          if (window % G == 0) out.block_starts[window / G] = i;
        }
        writer.put(codewords[s], lengths[s]);
        if constexpr (F::kRawBytes > 0) F::raw(x[i], out.raw + i * F::kRawBytes);
        prev_start = start;
        start += lengths[s];
      }
      writer.finish();
    }
  }
  if (error) return error;
  const int64_t windows = (out.total_bits + W - 1) / W;
  out.block_starts[(windows + G - 1) / G] = n;
  // The last window holds no code start when the last code runs into it from the window before:
  // its gap points at the end of the stream, and a block it begins is empty.
  if (n > 0) {
    const int64_t last = windows - 1;
    const int64_t last_start = out.total_bits - lengths[F::symbol(x[n - 1])];
    if (last * W > last_start) {
      out.gaps[last] = static_cast<uint8_t>(out.total_bits - last * W);
      if (last % G == 0) out.block_starts[last / G] = n;
    }
  }
  return nullptr;
}

namespace {

// Multi-code table entry: for a 12-bit peek, the first one to kCodes codes it holds completely.
// The fields have bytes of their own so that a lookup reads each with one load, no shifts or masks.
// A peek that starts no code gets count 0 and bits 12: decoding moves on, and the check sees it.
template <int kCodes>
struct MultiEntry {
  std::conditional_t<kCodes == 4, uint32_t, uint16_t> symbols;  // one byte each
  uint8_t count;                                                 // codes
  uint8_t bits;                                                  // their total length
};

struct TableShape {
  bool complete;     // every peek starts a code
  int64_t rich;      // peeks that hold three or more codes
};

// Fills the table and describes it. Every peek starts a code for a complete code (Kraft sum 1:
// any Huffman code of two or more symbols); then lookups need no check.
template <int kCodes>
TableShape build_multi_table(const int16_t* table, MultiEntry<kCodes>* multi) {
  TableShape shape{true, 0};
  for (uint32_t peek = 0; peek < lowbit::dfloat::kTableSize; ++peek) {
    uint32_t rest = peek, avail = lowbit::dfloat::kMaxCodeLen, count = 0, symbols = 0;
    while (count < kCodes) {
      const uint16_t e = static_cast<uint16_t>(table[rest & kPeekMask]);
      const uint32_t length = entry_length(e);
      if (length == 0 || length > avail) break;
      symbols |= entry_symbol(e) << (8 * count);
      ++count;
      rest >>= length;
      avail -= length;
    }
    shape.complete &= count > 0;
    shape.rich += count >= 3;
    multi[peek].symbols = static_cast<decltype(multi[peek].symbols)>(symbols);
    multi[peek].count = static_cast<uint8_t>(count);
    multi[peek].bits = static_cast<uint8_t>(lowbit::dfloat::kMaxCodeLen - (count == 0 ? 0 : avail));
  }
  return shape;
}

// The multi-code tables of one decode table. Building them takes longer than decoding a small
// tensor, and a layer decodes the same table at every forward, so the last kCachedTables are kept,
// found by their decode table's contents (hashed, then compared in full).
struct MultiTables {
  std::vector<int16_t> table;  // the decode table they were built from
  uint64_t hash;
  TableShape shape;
  std::vector<MultiEntry<4>> four;
  std::vector<MultiEntry<2>> two;  // empty unless the two-code table is the faster one
};

constexpr size_t kCachedTables = 64;

uint64_t table_hash(const int16_t* table) {
  uint64_t words[lowbit::dfloat::kTableSize / 4];
  memcpy(words, table, sizeof(words));
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (const uint64_t w : words) h = (h ^ w) * 0x100000001B3ull;
  return h;
}

std::shared_ptr<const MultiTables> multi_tables(const int16_t* table) {
  static std::mutex mutex;
  static std::list<std::shared_ptr<const MultiTables>> cache;  // most recently used first
  const uint64_t hash = table_hash(table);
  const size_t bytes = lowbit::dfloat::kTableSize * sizeof(int16_t);
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if ((*it)->hash == hash && memcmp((*it)->table.data(), table, bytes) == 0) {
        cache.splice(cache.begin(), cache, it);
        return cache.front();
      }
    }
  }
  auto built = std::make_shared<MultiTables>();
  built->table.assign(table, table + lowbit::dfloat::kTableSize);
  built->hash = hash;
  built->four.resize(lowbit::dfloat::kTableSize);
  built->shape = build_multi_table(table, built->four.data());
  // Stream bits of a good code are near uniform, so few peeks with three or more codes means few
  // lookups that would yield them (fp16, whose symbols hold three mantissa bits, has almost none):
  // the half-size table of two codes per entry then decodes faster.
  if (built->shape.complete && built->shape.rich * 16 < lowbit::dfloat::kTableSize) {
    built->two.resize(lowbit::dfloat::kTableSize);
    build_multi_table(table, built->two.data());
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_front(built);
  if (cache.size() > kCachedTables) cache.pop_back();
  return built;
}

// The stream being decoded.
struct Input {
  const uint8_t* codes;
  const uint8_t* raw;
  const uint8_t* gaps;
  const int64_t* block_starts;
  const int16_t* table;
  int64_t total_bits, window_bits, windows_per_block, block_bits, blocks;
  int64_t max_block_codes;  // the most codes in a block: the size of a lane's symbol buffer
};

// One format block being decoded: the next code's stream bit `pos` and where its symbol goes.
struct Lane {
  int64_t pos;
  uint8_t* next;          // into symbols, the block's [count] symbols
  uint8_t* symbols_end;   // symbols + count
  int64_t block_end;      // codes of this block start before this bit
  int64_t next_start;     // where the next block's first code starts: this block must end there
  int64_t start, count;   // the block's elements
  uint8_t* symbols;
};

// Four lookups (up to 4 * kCodes codes, at most 48 bits) from one 8-byte read (57 valid bits).
// Each lookup stores its entry's kCodes symbol bytes at `next` (the bytes past its count are
// rewritten by the next lookup). Branch-free: with kCheck, a peek that starts no code only sets
// `bad`.
template <int kCodes, bool kCheck>
inline void decode_step(const uint8_t* codes, const MultiEntry<kCodes>* multi, int64_t& pos, uint8_t*& next,
                        uint32_t& bad) {
  uint64_t word;
  memcpy(&word, codes + (pos >> 3), 8);
  word >>= (pos & 7);
  int64_t advance = 0;
  for (int k = 0; k < 4; ++k) {
    const MultiEntry<kCodes>& entry = multi[word & kPeekMask];
    memcpy(next, &entry.symbols, kCodes);
    next += entry.count;
    if constexpr (kCheck) bad |= entry.count == 0;
    word >>= entry.bits;
    advance += entry.bits;
  }
  pos += advance;
}

// Steps a lane can take with no check: a step reads at most 48 bits and writes at most
// 4 * kCodes symbols, so `steps` of them stay inside the block (which keeps every 8-byte read
// inside the padded buffer) and inside its symbols.
template <int kCodes>
int64_t safe_steps(const Lane& lane) {
  return std::min((lane.symbols_end - lane.next) / (4 * kCodes), (lane.block_end - lane.pos) / 48);
}

// Blocks decoded at once: each lane is a chain of dependent lookups, and more lanes overlap more
// of them. Five or six measure best; with eight, their state spills from registers.
constexpr int kLanes = 6;

// Steps all lanes interleaved while all can. Checking once per batch of safe steps, with the
// lanes' state in local arrays the compiler keeps in registers, keeps the loop to the lookups.
template <int kCodes, bool kCheck>
void decode_lanes(const uint8_t* codes, const MultiEntry<kCodes>* multi, Lane* lanes, uint32_t& bad) {
  for (;;) {
    int64_t steps = safe_steps<kCodes>(lanes[0]);
    for (int l = 1; l < kLanes; ++l) steps = std::min(steps, safe_steps<kCodes>(lanes[l]));
    if (steps == 0) return;
    int64_t pos[kLanes];
    uint8_t* next[kLanes];
    for (int l = 0; l < kLanes; ++l) pos[l] = lanes[l].pos, next[l] = lanes[l].next;
    for (; steps > 0; --steps) {
#pragma GCC unroll 8
      for (int l = 0; l < kLanes; ++l) decode_step<kCodes, kCheck>(codes, multi, pos[l], next[l], bad);
    }
    for (int l = 0; l < kLanes; ++l) lanes[l].pos = pos[l], lanes[l].next = next[l];
  }
}

// Decodes the rest of a lane: in safe steps, then one code at a time (always checked); false if
// the stream runs past the block.
template <int kCodes, bool kCheck>
bool decode_rest(const Input& in, const MultiEntry<kCodes>* multi, Lane& lane, uint32_t& bad) {
  for (int64_t steps; (steps = safe_steps<kCodes>(lane)) > 0;) {
    for (; steps > 0; --steps) decode_step<kCodes, kCheck>(in.codes, multi, lane.pos, lane.next, bad);
  }
  for (; lane.next < lane.symbols_end; ++lane.next) {
    if (lane.pos >= lane.block_end) return false;
    const uint16_t entry = static_cast<uint16_t>(in.table[lowbit::dfloat::peek(in.codes, lane.pos)]);
    const uint32_t length = entry_length(entry);
    bad |= length == 0;
    *lane.next = static_cast<uint8_t>(entry_symbol(entry));
    lane.pos += length == 0 ? lowbit::dfloat::kMaxCodeLen : length;
  }
  return true;
}

// out[k] = merge(symbols[k], raw bits of k) for a block, in a loop the compiler vectorizes
// (the restrict pointers tell it the byte buffers do not alias the output).
void merge_block(const uint8_t* __restrict symbols, const uint8_t* __restrict raw, uint16_t* __restrict out,
                 int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    out[k] = static_cast<uint16_t>(((raw[k] & 0x80u) << 8) | (uint32_t(symbols[k]) << 7) | (raw[k] & 0x7Fu));
  }
}

void merge_block(const uint8_t* __restrict symbols, const uint8_t* __restrict raw, uint32_t* __restrict out,
                 int64_t count) {
  for (int64_t k = 0; k < count; ++k) out[k] = lowbit::dfloat::merge32(symbols[k], raw + 3 * k);
}

// Bytes: the symbols are the elements.
void merge_block(const uint8_t* __restrict symbols, uint8_t* __restrict out, int64_t count) {
  memcpy(out, symbols, count);
}

// Decodes blocks [first, first + count) (count <= kLanes), interleaved, into `buffer` (kLanes
// slots of max_block_codes bytes), then merges each with its raw bits into `out`. Returns whether
// every block's codes matched its gaps and block starts.
template <int kCodes, bool kCheck, typename Bits>
bool decode_blocks(const Input& in, const MultiEntry<kCodes>* multi, int64_t first, int count, uint8_t* buffer,
                   Bits* out) {
  Lane lanes[kLanes];
  for (int l = 0; l < count; ++l) {
    const int64_t b = first + l;
    uint8_t* symbols = buffer + l * in.max_block_codes;
    const int64_t codes_in_block = in.block_starts[b + 1] - in.block_starts[b];
    const int64_t next_start =
        b + 1 < in.blocks ? (b + 1) * in.block_bits + gap_of(in.gaps, (b + 1) * in.windows_per_block) : in.total_bits;
    lanes[l] = Lane{b * in.block_bits + gap_of(in.gaps, b * in.windows_per_block), symbols, symbols + codes_in_block,
                    std::min(in.total_bits, (b + 1) * in.block_bits), next_start, in.block_starts[b], codes_in_block,
                    symbols};
  }
  uint32_t bad = 0;
  if (count == kLanes) decode_lanes<kCodes, kCheck>(in.codes, multi, lanes, bad);
  for (int l = 0; l < count; ++l) {
    Lane& lane = lanes[l];
    const bool inside = decode_rest<kCodes, kCheck>(in, multi, lane, bad);
    if (!inside || lane.pos != lane.next_start) bad = 1;
    if constexpr (Fields<Bits>::kRawBytes == 0) {
      merge_block(lane.symbols, out + lane.start, lane.count);
    } else {
      merge_block(lane.symbols, in.raw + lane.start * Fields<Bits>::kRawBytes, out + lane.start, lane.count);
    }
  }
  return bad == 0;
}

// Decodes all blocks, kLanes per task, on all threads. Returns whether all matched. Threads take
// runs of neighbouring tasks that write about 2 MiB of output, so that they first touch (page
// fault) different huge pages of a fresh output instead of taking turns in the same one; runs
// that short still balance the load.
// Below this many elements the decoder runs on the calling thread.
constexpr int64_t kParallelMin = int64_t(1) << 16;

template <int kCodes, bool kCheck, typename Bits>
bool decode_all(const Input& in, const MultiEntry<kCodes>* multi, int64_t n, Bits* out) {
  const int64_t tasks = (in.blocks + kLanes - 1) / kLanes;
  const auto decode_task = [&](int64_t task, uint8_t* buffer) {
    const int64_t first = task * kLanes;
    const int count = static_cast<int>(std::min<int64_t>(kLanes, in.blocks - first));
    return decode_blocks<kCodes, kCheck>(in, multi, first, count, buffer, out);
  };
  if (n <= kParallelMin) {
    // A small tensor (a layer decoded at every forward) on the calling thread, without an OpenMP
    // region and with a kept buffer: their set-up would cost more than the decoding.
    thread_local std::vector<uint8_t> buffer;
    if (buffer.size() < static_cast<size_t>(kLanes * in.max_block_codes)) buffer.resize(kLanes * in.max_block_codes);
    bool ok = true;
    for (int64_t task = 0; task < tasks; ++task) ok &= decode_task(task, buffer.data());
    return ok;
  }
  const int64_t run = std::max<int64_t>(1, (int64_t(2) << 20) * tasks / (n * int64_t(sizeof(Bits)) + 1));
  int corrupt = 0;
#pragma omp parallel reduction(| : corrupt)
  {
    std::vector<uint8_t> buffer(kLanes * in.max_block_codes);
#pragma omp for schedule(dynamic, run)
    for (int64_t task = 0; task < tasks; ++task) corrupt |= !decode_task(task, buffer.data());
  }
  return !corrupt;
}

}  // namespace

template <typename Bits>
const char* decode(const uint8_t* codes, int64_t codes_bytes, const uint8_t* raw, const uint8_t* gaps,
                   const int64_t* block_starts, const int16_t* table, int64_t n, int64_t total_bits,
                   int64_t window_bits, int64_t windows_per_block, Bits* out) {
  const int64_t block_bits = window_bits * windows_per_block;
  const int64_t windows = (total_bits + window_bits - 1) / window_bits;
  const int64_t blocks = (windows + windows_per_block - 1) / windows_per_block;
  if (codes_bytes < (total_bits + 7) / 8 + 8) return "the code buffer is shorter than total_bits and its padding";
  if (block_starts[0] != 0 || block_starts[blocks] != n) return "block_starts must run from 0 to n";
  int64_t max_block_codes = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    // A block cannot hold more codes than it has bits.
    const int64_t count = block_starts[b + 1] - block_starts[b];
    if (count < 0 || count > block_bits) return "block_starts do not fit the blocks";
    max_block_codes = std::max(max_block_codes, count);
  }
  const Input in{codes, raw, gaps, block_starts, table, total_bits, window_bits, windows_per_block, block_bits, blocks,
                 max_block_codes};
  const std::shared_ptr<const MultiTables> tables = multi_tables(table);
  bool ok;
  if (!tables->shape.complete) {
    ok = decode_all<4, true>(in, tables->four.data(), n, out);
  } else if (tables->two.empty()) {
    ok = decode_all<4, false>(in, tables->four.data(), n, out);
  } else {
    ok = decode_all<2, false>(in, tables->two.data(), n, out);
  }
  return ok ? nullptr : "the code stream does not match block_starts and gaps (corrupted data)";
}

template void histogram<uint8_t>(const uint8_t*, int64_t, int64_t*);
template void histogram<uint16_t>(const uint16_t*, int64_t, int64_t*);
template void histogram<uint32_t>(const uint32_t*, int64_t, int64_t*);
template const char* encode<uint8_t>(const uint8_t*, int64_t, const uint8_t*, const uint32_t*, Stream);
template const char* encode<uint16_t>(const uint16_t*, int64_t, const uint8_t*, const uint32_t*, Stream);
template const char* encode<uint32_t>(const uint32_t*, int64_t, const uint8_t*, const uint32_t*, Stream);
template const char* decode<uint8_t>(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, const int64_t*,
                                     const int16_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*);
template const char* decode<uint16_t>(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, const int64_t*,
                                      const int16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*);
template const char* decode<uint32_t>(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, const int64_t*,
                                      const int16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*);

}  // namespace lowbit::cpu::dfloat
