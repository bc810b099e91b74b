// C entry points of csrc/cuda/dfloat.cu run on the CPU (tests/cuda_emu.py), called through ctypes.
#include LOWBIT_EMU_SOURCE

namespace df = lowbit::cuda::dfloat;

namespace {
df::Stream stream_of(const uint8_t* codes, int64_t codes_bytes, const uint8_t* raw, const uint8_t* gaps,
                     const int64_t* block_starts, const int16_t* table, const int64_t* sizes) {
  return {codes, codes_bytes, raw, gaps, block_starts, table, sizes[0], sizes[1], sizes[2], sizes[3]};
}
}  // namespace

extern "C" {

// sizes: n, total_bits, window_bits, windows_per_block. *error: the kernels' error bits.
int emu_dfloat_decode(const uint8_t* codes, int64_t codes_bytes, const uint8_t* raw, const uint8_t* gaps,
                      const int64_t* block_starts, const int16_t* table, const int64_t* sizes, int dtype, void* out,
                      int* error) {
  *error = 0;
  return df::decode(stream_of(codes, codes_bytes, raw, gaps, block_starts, table, sizes),
                    static_cast<df::DType>(dtype), out, error, nullptr);
}

int emu_dfloat_gemv(const uint8_t* codes, int64_t codes_bytes, const uint8_t* raw, const uint8_t* gaps,
                    const int64_t* block_starts, const int16_t* table, const int64_t* sizes, int dtype, const void* x,
                    int64_t batch, int64_t in_features, int64_t out_features, const void* bias, float* workspace,
                    int* error, void* y) {
  *error = 0;
  for (int64_t i = 0; i < batch * out_features; ++i) workspace[i] = 0.f;
  return df::gemv(stream_of(codes, codes_bytes, raw, gaps, block_starts, table, sizes),
                  static_cast<df::DType>(dtype), x, batch, in_features, out_features, bias, workspace, error, y,
                  nullptr);
}

}  // extern "C"
