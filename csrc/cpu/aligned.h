// Aligned<T>: a per-thread scratch buffer whose start is 64-byte aligned, grown as needed; shared
// by the AMX kernels (int8_amx.cpp, codebook_amx.cpp).
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include <c10/util/Exception.h>

namespace lowbit::cpu {

// A buffer whose start is 64-byte aligned, grown as needed. Tile loads and stores whose 64-byte rows
// straddle two cache lines run at less than half speed: a plain std::vector, whose large
// allocations begin 16 bytes into a page, measured 1.5-1.8 int8 TOP/s per core where aligned
// buffers ran 3.9-4.3 (bench/native/amx_tile_rates.cpp).
template <typename T>
class Aligned {
 public:
  Aligned() = default;
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() { free(data_); }
  T* at_least(int64_t count) {
    if (count > count_) {
      free(data_);
      const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
      data_ = static_cast<T*>(aligned_alloc(64, bytes));
      TORCH_CHECK(data_ != nullptr, "lowbit: out of memory for an AMX kernel's ", bytes, "-byte buffer");
      count_ = count;
    }
    return data_;
  }
  T* data() { return data_; }

 private:
  T* data_ = nullptr;
  int64_t count_ = 0;
};

}  // namespace lowbit::cpu
