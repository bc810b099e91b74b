// C entry points of csrc/cuda/codebook.cu run on the CPU (tests/cuda_emu.py), called through ctypes.
#include LOWBIT_EMU_SOURCE

namespace cb = lowbit::cuda::codebook;

extern "C" {

// dims: out_features, in_groups, num_codebooks, nbits, group_size; dtypes: x, codebooks, scales.
int emu_codebook_matmul(const int* dtypes, const void* x, int64_t rows, const void* codes, const void* codebooks,
                        const void* scales, const int64_t* dims, const void* bias, void* y) {
  cb::Weight w;
  w.codes = codes;
  w.codebooks = codebooks;
  w.scales = scales;
  w.out_features = dims[0];
  w.in_groups = dims[1];
  w.num_codebooks = static_cast<int>(dims[2]);
  w.nbits = static_cast<int>(dims[3]);
  w.group_size = static_cast<int>(dims[4]);
  w.codebook_dtype = static_cast<cb::DType>(dtypes[1]);
  w.scale_dtype = static_cast<cb::DType>(dtypes[2]);
  return cb::matmul(static_cast<cb::DType>(dtypes[0]), x, rows, w, bias, y, nullptr);
}

}  // extern "C"
