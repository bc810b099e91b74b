// A CPU stand-in for the parts of the CUDA runtime and device language that lowbit's kernels use,
// so that csrc/cuda/*.cu runs on the host, thread by thread, in the test suite (tests/cuda_emu.py
// rewrites the launch syntax and dynamic shared memory, then compiles the file with g++ against
// these headers instead of the toolkit's).
//
// Execution model: one launch runs its blocks one after another; a block's threads are fibers
// (ucontext) on the calling OS thread, switched only where CUDA threads synchronize
// (__syncthreads, named barriers, warp shuffles and votes, __syncwarp). So every fiber runs
// between two barriers without interleaving, atomics are plain read-modify-writes, and a
// `__shared__` variable (rewritten to `static`) is one object shared by the block's threads.
// Warp-level operations exchange values through per-warp slots between two warp barriers, which
// count the lanes of their mask still running. A barrier nobody can pass (a lane waiting on
// a lane that never arrives) aborts with a message instead of hanging. Device pointers are host
// pointers; the "device" has kEmuSms multiprocessors.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static

// ---- vector types --------------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// ---- runtime API ---------------------------------------------------------------------------------
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
} cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace emu {

constexpr int kEmuSms = 4;
constexpr int kEmuSmemOptin = 227 * 1024;
constexpr size_t kStack = 512 * 1024;

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "cuda emulation: %s\n", what);
  fflush(stderr);
  abort();
}

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  unsigned tid = 0;
  dim3 thread_idx;
  bool done = false;
  int wait_kind = 0;  // 0 none, 1 block barrier, 2 warp barrier, 3 named barrier
  uint64_t wait_gen = 0;
  int wait_id = 0;
};

struct Warp {
  uint64_t gen = 0;
  unsigned arrived = 0;
  uint64_t slot[32] = {};
  uint32_t frag[32][6] = {};  // tensor-core operands of each lane (mma)
};

struct Block {
  dim3 grid, block, block_idx;
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  uint64_t gen = 0;
  unsigned arrived = 0;
  uint64_t named_gen[16] = {};
  unsigned named_arrived[16] = {};
  ucontext_t main;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
};

// Dynamic shared memory lives in this library's .bss, next to the `__shared__` (static) variables,
// so that a shared-window address (__cvta_generic_to_shared) is a 32-bit offset from it.
alignas(128) inline unsigned char shared_arena[kEmuSmemOptin + 128];

inline Block& block() {
  static Block b;
  return b;
}
inline Fiber* current() { return block().current; }
inline unsigned char* dynamic_shared() { return shared_arena; }

inline unsigned live_in_block() {
  unsigned n = 0;
  for (const Fiber& f : block().fibers) n += !f.done;
  return n;
}
inline unsigned live_mask_of_warp(unsigned w) {
  Block& b = block();
  unsigned mask = 0;
  for (unsigned lane = 0; lane < 32 && w * 32 + lane < b.threads; ++lane)
    if (!b.fibers[w * 32 + lane].done) mask |= 1u << lane;
  return mask;
}

inline void yield() {
  Fiber* f = current();
  swapcontext(&f->ctx, &block().main);
}

// Advances every barrier whose participants have all arrived.
inline void settle() {
  Block& b = block();
  if (b.arrived > 0 && b.arrived >= live_in_block()) {
    b.arrived = 0;
    ++b.gen;
  }
  for (unsigned w = 0; w < b.warps.size(); ++w) {
    Warp& warp = b.warps[w];
    if (warp.arrived == 0) continue;
    // The lanes a warp barrier waits for: those of the first waiter's mask still running.
    unsigned expect = 0;
    for (unsigned lane = 0; lane < 32 && w * 32 + lane < b.threads; ++lane) {
      const Fiber& f = b.fibers[w * 32 + lane];
      if (!f.done && f.wait_kind == 2 && f.wait_gen == warp.gen) expect |= static_cast<unsigned>(f.wait_id);
    }
    expect &= live_mask_of_warp(w);
    if (warp.arrived >= static_cast<unsigned>(__builtin_popcount(expect))) {
      warp.arrived = 0;
      ++warp.gen;
    }
  }
}

inline bool runnable(const Fiber& f) {
  const Block& b = block();
  if (f.done) return false;
  switch (f.wait_kind) {
    case 1: return b.gen > f.wait_gen;
    case 2: return b.warps[f.tid / 32].gen > f.wait_gen;
    case 3: return b.named_gen[f.wait_id] > f.wait_gen;
    default: return true;
  }
}

inline void block_barrier() {
  Block& b = block();
  Fiber* f = current();
  f->wait_kind = 1;
  f->wait_gen = b.gen;
  ++b.arrived;
  yield();
  f->wait_kind = 0;
}

// Lanes of `mask` (those still running) meet here.
inline void warp_barrier(unsigned mask) {
  Block& b = block();
  Fiber* f = current();
  Warp& w = b.warps[f->tid / 32];
  f->wait_kind = 2;
  f->wait_gen = w.gen;
  f->wait_id = static_cast<int>(mask);
  ++w.arrived;
  yield();
  f->wait_kind = 0;
}

// bar.sync id, count: `count` threads (whole warps) meet at barrier id.
inline void named_barrier(unsigned id, unsigned count) {
  Block& b = block();
  Fiber* f = current();
  if (id >= 16) fail("named barrier id above 15");
  f->wait_kind = 3;
  f->wait_gen = b.named_gen[id];
  f->wait_id = static_cast<int>(id);
  if (++b.named_arrived[id] >= count) {
    b.named_arrived[id] = 0;
    ++b.named_gen[id];
  }
  yield();
  f->wait_kind = 0;
}

inline void fiber_entry() {
  Block& b = block();
  (*b.body)();
  b.current->done = true;
  swapcontext(&b.current->ctx, &b.main);
}

inline void run_block(const std::function<void()>& body) {
  Block& b = block();
  b.body = &body;
  b.gen = 0;
  b.arrived = 0;
  for (int i = 0; i < 16; ++i) b.named_gen[i] = b.named_arrived[i] = 0;
  b.warps.assign((b.threads + 31) / 32, Warp{});
  static std::vector<void*> stacks;
  while (stacks.size() < b.threads) {
    void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) fail("no memory for a fiber stack");
    stacks.push_back(s);
  }
  b.fibers.assign(b.threads, Fiber{});
  for (unsigned t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = t;
    f.thread_idx = dim3(t % b.block.x, t / b.block.x % b.block.y, t / (b.block.x * b.block.y));
    f.stack = stacks[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool any = false, progressed = false;
    for (Fiber& f : b.fibers) {
      if (f.done) continue;
      any = true;
      if (!runnable(f)) continue;
      b.current = &f;
      swapcontext(&b.main, &f.ctx);
      b.current = nullptr;
      progressed = true;
      settle();
    }
    if (!any) break;
    if (!progressed) {
      settle();
      bool now = false;
      for (const Fiber& f : b.fibers) now = now || runnable(f);
      if (!now) fail("deadlock: threads wait at a barrier the others never reach");
    }
  }
}

template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 blockdim, size_t smem, cudaStream_t, void (*kernel)(KArgs...), Args&&... args) {
  const unsigned threads = blockdim.x * blockdim.y * blockdim.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > static_cast<size_t>(kEmuSmemOptin)) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  Block& b = block();
  b.grid = grid;
  b.block = blockdim;
  b.threads = threads;
  memset(shared_arena, 0xA5, smem);  // not zero: kernels must not rely on it
  const std::function<void()> body = [&]() { kernel(static_cast<KArgs>(args)...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block(body);
      }
}

}  // namespace emu

#define threadIdx (::emu::current()->thread_idx)
#define blockIdx (::emu::block().block_idx)
#define blockDim (::emu::block().block)
#define gridDim (::emu::block().grid)
constexpr int warpSize = 32;

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "cuda emulation error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = emu::kEmuSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::kEmuSmemOptin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;  // static shared memory: not tracked here
  int maxThreadsPerBlock = 1024;
  int numRegs = 0;
};
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K) {
  *a = cudaFuncAttributes{};
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int value) {
  return value <= emu::kEmuSmemOptin ? cudaSuccess : cudaErrorInvalidValue;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  int by_threads = threads > 0 ? 2048 / threads : 0;
  int by_smem = smem > 0 ? static_cast<int>(emu::kEmuSmemOptin / smem) : 32;
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) { return cudaMemsetAsync(p, v, n); }
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  memmove(d, s, n);
  return cudaSuccess;
}

// ---- device intrinsics ---------------------------------------------------------------------------
inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_barrier(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T emu_exchange(unsigned mask, T v, int (*source)(int lane, int arg, int width), int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  emu::Fiber* f = emu::current();
  emu::Warp& w = emu::block().warps[f->tid / 32];
  const int lane = static_cast<int>(f->tid % 32);
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  emu::warp_barrier(mask);
  const int from = source(lane, arg, width);
  T out;
  memcpy(&out, &w.slot[from], sizeof(T));
  emu::warp_barrier(mask);  // every lane has read before the slots change
  return out;
}
inline int emu_src_xor(int lane, int m, int width) {
  const int to = lane ^ m;
  return (to / width == lane / width) ? to : lane;
}
inline int emu_src_idx(int lane, int src, int width) { return lane / width * width + ((src % width) + width) % width; }
inline int emu_src_down(int lane, int d, int width) { return lane % width + d < width ? lane + d : lane; }
inline int emu_src_up(int lane, int d, int width) { return lane % width >= d ? lane - d : lane; }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return emu_exchange(mask, v, emu_src_xor, m, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu_exchange(mask, v, emu_src_idx, src, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu_exchange(mask, v, emu_src_down, static_cast<int>(d), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu_exchange(mask, v, emu_src_up, static_cast<int>(d), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::Fiber* f = emu::current();
  emu::Warp& w = emu::block().warps[f->tid / 32];
  const int lane = static_cast<int>(f->tid % 32);
  w.slot[lane] = pred != 0;
  emu::warp_barrier(mask);
  const unsigned live = emu::live_mask_of_warp(f->tid / 32) & mask;
  unsigned out = 0;
  for (int i = 0; i < 32; ++i)
    if ((live >> i & 1u) && w.slot[i]) out |= 1u << i;
  emu::warp_barrier(mask);
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const unsigned live = emu::live_mask_of_warp(emu::current()->tid / 32) & mask;
  return __ballot_sync(mask, pred) == live;
}
inline unsigned __activemask() { return emu::live_mask_of_warp(emu::current()->tid / 32); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
void __stcs(T* p, T v) {
  *p = v;
}

inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline int __float_as_int(float f) {
  int u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((both >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t both = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(both >> (shift & 31u));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t both = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((both << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  return __funnelshift_r(lo, hi, shift > 32 ? 32 : shift);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }

// Atomics: fibers switch only at barriers, so a read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
T atomicAnd(T* p, T v) {
  const T old = *p;
  *p = old & v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = old < v ? old : v;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}


// ---- shared-window addresses, cp.async, mma ---------------------------------------------------------
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::shared_arena + 0x80000000LL);
}
namespace emu {
inline void* shared_pointer(uint32_t address) {
  return shared_arena + (static_cast<int64_t>(address) - 0x80000000LL);
}
// cp.async.ca.shared.global [dst], [src], size, src_size: the copy happens at once (the kernels wait
// for their groups before reading; here they are always complete); bytes past src_size are zeros.
inline void cp_async(uint32_t dst, const void* src, int size, int src_size) {
  unsigned char* to = static_cast<unsigned char*>(shared_pointer(dst));
  const int n = src_size < size ? src_size : size;
  if (n > 0) memcpy(to, src, static_cast<size_t>(n));
  if (n < size) memset(to + n, 0, static_cast<size_t>(size - n));
}
}  // namespace emu
// ---- fp16 and bf16 -------------------------------------------------------------------------------
struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};
typedef __half half;

inline float emu_half_to_float(unsigned short h) {
  const unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  unsigned bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: man * 2^-24
      float f = static_cast<float>(man) * 5.9604644775390625e-8f;
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  return __uint_as_float(bits);
}
// Round to nearest even, overflow to inf, NaN kept quiet.
inline unsigned short emu_float_to_half(float f) {
  const unsigned u = __float_as_uint(f);
  const unsigned sign = (u >> 16) & 0x8000u;
  const unsigned a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<unsigned short>(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
  if (a >= 0x477FF000u) return static_cast<unsigned short>(sign | 0x7C00u);  // rounds past 65504
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero, in units of 2^-24
    const float mag = __uint_as_float(a);
    const float q = std::nearbyint(mag * 16777216.f);  // exact in fp32, ties to even
    return static_cast<unsigned short>(sign | static_cast<unsigned>(q));
  }
  const unsigned mant = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23), round
  return static_cast<unsigned short>(sign | (mant >> 13));
}
inline unsigned short emu_float_to_bf16(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float __half2float(__half h) { return emu_half_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{emu_float_to_half(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned>(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{emu_float_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

namespace emu {
inline float half_bits_to_float(uint32_t h, bool bf16) {
  return bf16 ? __uint_as_float(h << 16) : emu_half_to_float(static_cast<unsigned short>(h));
}
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D (16 x 8) += A (16 x 16) B (16 x 8), the warp's
// fragments laid out as the PTX ISA specifies (group g = lane / 4, t = lane % 4: a0 A[g][2t..],
// a1 A[g+8][2t..], a2 A[g][2t+8..], a3 A[g+8][2t+8..]; b0 B[2t..][g], b1 B[2t+8..][g]; d0, d1
// D[g][2t, 2t+1], d2, d3 D[g+8][2t, 2t+1]); products exact in fp32, summed in k order.
template <bool BF16>
void mma16816(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
              uint32_t b0, uint32_t b1) {
  Fiber* f = current();
  Warp& w = block().warps[f->tid / 32];
  const int lane = static_cast<int>(f->tid % 32);
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  memcpy(w.frag[lane], mine, sizeof(mine));
  warp_barrier(0xffffffffu);
  const auto A = [&](int r, int k) {
    const uint32_t reg = w.frag[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)];
    return half_bits_to_float(k % 2 ? reg >> 16 : reg & 0xFFFFu, BF16);
  };
  const auto B = [&](int k, int n) {
    const uint32_t reg = w.frag[n * 4 + (k % 8) / 2][4 + k / 8];
    return half_bits_to_float(k % 2 ? reg >> 16 : reg & 0xFFFFu, BF16);
  };
  const int g = lane / 4, t = lane % 4;
  float* out[4] = {&d0, &d1, &d2, &d3};
  float sums[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), c = 2 * t + i % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(r, k) * B(k, c);
    sums[i] = sum;
  }
  warp_barrier(0xffffffffu);  // every lane has read the fragments
  for (int i = 0; i < 4; ++i) *out[i] += sums[i];
}
}  // namespace emu
