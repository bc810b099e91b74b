// The AMX tile set-up lowbit's kernels use (palette 1, eight tiles of 16 rows x 64 bytes) and the
// Linux permission request for tile data; shared with bench/native/amx_tile_rates.cpp, so the probe
// measures the configuration the kernel runs.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace lowbit::cpu::amx {

// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): true when Linux grants this process the tile
// state (once per process; every thread may then use it).
inline bool request_tile_data() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures tiles 0-7 as 16 rows x 64 bytes on the calling thread.
__attribute__((target("amx-tile"))) inline void configure_16x64() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // gcc 12 does not see that ldtilecfg reads the config and drops the stores above without this.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

}  // namespace lowbit::cpu::amx
#endif
