// C entry points of csrc/cuda/int8.cu run on the CPU (tests/cuda_emu.py), called through ctypes.
#include LOWBIT_EMU_SOURCE

namespace i8 = lowbit::cuda::int8;

extern "C" {

int emu_int8_prepass(int dtype, const void* x, const uint8_t* static_mask, const int32_t* static_idx, int64_t rows,
                     int64_t cols, int64_t statics, double threshold, int8_t* xq, float* row_scale,
                     uint8_t* col_flags, void* x_static) {
  return i8::prepass(static_cast<i8::DType>(dtype), x, static_mask, static_idx, rows, cols, statics, threshold, xq,
                     row_scale, col_flags, x_static, nullptr);
}

int emu_int8_gemv(int dtype, const void* x, const int8_t* weight, const float* weight_scale, const int32_t* static_idx,
                  const void* static_weight, const void* bias, int64_t rows, int64_t in_features,
                  int64_t out_features, int64_t statics, void* y) {
  return i8::gemv(static_cast<i8::DType>(dtype), x, weight, weight_scale, static_idx, static_weight, bias, rows,
                  in_features, out_features, statics, y, nullptr);
}

}  // extern "C"
