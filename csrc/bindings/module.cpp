// The Python module lowbit._C. Importing it runs the TORCH_LIBRARY_IMPL blocks of every family's
// glue (csrc/bindings/*.cpp), which attach the kernels to the schemas of python/lowbit/ops/.
#include <torch/extension.h>

#include "bindings/int8.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit's compiled kernels; importing this module registers them with torch.ops.lowbit";
  m.def("with_cuda", []() {
#ifdef LOWBIT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA kernels");
  m.def("cpu_int8_gemm_path", &lowbit::cpu_int8_gemm_path,
        "The path the CPU int8 GEMM takes here: amx, onednn, avx2 or int_mm (LOWBIT_CPU_INT8_GEMM forces one)");
}
