// C entry points of csrc/cuda/kv.cu run on the CPU (tests/cuda_emu.py builds this file with the
// rewritten kernel source included below), called from Python through ctypes.
#include LOWBIT_EMU_SOURCE

#include <vector>

namespace kvc = lowbit::cuda::kv;

extern "C" {

// dims: B, Hq, Hkv, L, D, G, nb, r, bits. ptrs and strides (sb, sh per tensor, as the CUDA glue
// sets them): query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, mask (null
// for none); out [B][Hq][L][D] contiguous. Returns the cudaError_t of the plan or the launches;
// *splits receives the plan's split count.
int emu_kv_decode_attention(int dtype, const int64_t* dims, const void* const* ptrs, const int64_t* strides,
                            float scaling, void* out, int64_t* splits) {
  kvc::DecodeArgs a;
  a.dtype = static_cast<kvc::DType>(dtype);
  a.B = dims[0], a.Hq = dims[1], a.Hkv = dims[2], a.L = dims[3], a.D = dims[4], a.G = dims[5], a.nb = dims[6];
  a.r = dims[7];
  a.bits = static_cast<int>(dims[8]);
  kvc::Strided* fields[] = {&a.query, &a.k_codes, &a.k_scale, &a.k_zero, &a.v_codes,
                            &a.v_scale, &a.v_zero, &a.k_res, &a.v_res, &a.mask};
  for (int i = 0; i < 10; ++i) {
    fields[i]->p = ptrs[i];
    fields[i]->sb = strides[2 * i];
    fields[i]->sh = strides[2 * i + 1];
  }
  a.scaling = scaling;
  a.out = out;
  kvc::DecodePlan plan;
  cudaError_t err = kvc::decode_plan(a, &plan);
  if (err != cudaSuccess) return err;
  *splits = plan.splits;
  std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats), std::nanf(""));
  return kvc::decode_attention(a, plan, workspace.data(), nullptr);
}

int emu_kv_quantize(int dtype, const void* keys, const void* values, int64_t B, int64_t H, int64_t T, int64_t D,
                    int64_t G, int bits, uint8_t* k_codes, void* k_scale, void* k_zero, uint8_t* v_codes,
                    void* v_scale, void* v_zero) {
  return kvc::quantize(static_cast<kvc::DType>(dtype), keys, values, B, H, T, D, G, bits, k_codes, k_scale, k_zero,
                       v_codes, v_scale, v_zero, nullptr);
}

}  // extern "C"
