// C entry points of csrc/cuda/bitpack.cu run on the CPU (tests/cuda_emu.py), called through ctypes.
#include LOWBIT_EMU_SOURCE

extern "C" {

int emu_pack_bits(const uint8_t* values, uint8_t* packed, int64_t rows, int64_t n, int bits) {
  return lowbit::cuda::pack_bits(values, packed, rows, n, bits, nullptr);
}

int emu_unpack_bits(const uint8_t* packed, uint8_t* values, int64_t rows, int64_t n, int bits) {
  return lowbit::cuda::unpack_bits(packed, values, rows, n, bits, nullptr);
}

}  // extern "C"
