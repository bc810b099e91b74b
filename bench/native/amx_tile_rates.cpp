// How fast this core runs AMX int8 tile products (tdpbssd) with their operands loaded from L1, one
// or both from L2, and with no loads at all: the bound on csrc/cpu/int8_amx.cpp's 2 x 2 register
// block (4 tile loads per 4 products). Linux on x86-64 with AMX only.
//   g++ -O2 -mamx-tile -mamx-int8 bench/native/amx_tile_rates.cpp -o /tmp/amx_tile_rates && /tmp/amx_tile_rates
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>

#include "../../csrc/cpu/amx_tiles.h"

// A 64-byte-aligned buffer of `bytes` ones, its start moved `offset` bytes on.
struct Buffer {
  int8_t* base;
  int8_t* start;
  size_t bytes;
  Buffer(size_t n, size_t offset) : base(static_cast<int8_t*>(aligned_alloc(64, n + 64))), start(base + offset), bytes(n) {
    memset(base, 1, n + 64);
  }
  ~Buffer() { free(base); }
  int8_t* data() const { return start; }
  size_t size() const { return bytes; }
};

// int8 TOP/s of one core: 4 products per step over A and B buffers of the given sizes (cycled
// through), or with no loads when both are 0; `offset` moves both off 64-byte alignment.
static double rate(long a_bytes, long b_bytes, size_t offset = 0) {
  Buffer a(a_bytes ? a_bytes : 2048, offset), b(b_bytes ? b_bytes : 2048, offset);
  alignas(64) static int32_t c[32 * 32];
  const long a_steps = a.size() / 2048, b_steps = b.size() / 2048, steps = a_steps > b_steps ? a_steps : b_steps;
  const bool load = a_bytes > 0;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a.data(), 64);
  _tile_loadd(5, a.data() + 1024, 64);
  _tile_loadd(6, b.data(), 64);
  _tile_loadd(7, b.data() + 1024, 64);
  const long reps = 4000000000L / (steps * 4 * 16 * 16 * 64);
  const auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps; ++r) {
    for (long s = 0; s < steps; ++s) {
      if (load) {
        const int8_t* pa = a.data() + (s % a_steps) * 2048;
        const int8_t* pb = b.data() + (s % b_steps) * 2048;
        _tile_loadd(4, pa, 64);
        _tile_loadd(6, pb, 64);
        _tile_loadd(5, pa + 1024, 64);
        _tile_loadd(7, pb + 1024, 64);
      }
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_stored(0, c, 128);
  return reps * steps * 4.0 * 16 * 16 * 64 * 2 / sec / 1e12;
}

int main() {
  if (!lowbit::cpu::amx::request_tile_data()) {
    printf("this CPU or OS offers no AMX tile data\n");
    return 1;
  }
  lowbit::cpu::amx::configure_16x64();  // the kernel's configuration
  printf("int8 TOP/s per core, 2 x 2 tile block\n");
  printf("  no loads:            %.2f\n", rate(0, 0));
  printf("  A 8 KB, B 8 KB (L1): %.2f\n", rate(8 << 10, 8 << 10));
  printf("  A 8 KB, B 256 KB (L2): %.2f\n", rate(8 << 10, 256 << 10));
  printf("  A 8 KB, B 1 MB (L2): %.2f\n", rate(8 << 10, 1 << 20));
  printf("  A 128 KB, B 128 KB (both L2): %.2f\n", rate(128 << 10, 128 << 10));
  printf("  A 128 KB, B 128 KB, rows 16 bytes off 64-byte alignment: %.2f\n", rate(128 << 10, 128 << 10, 16));
  _tile_release();
  return 0;
}
