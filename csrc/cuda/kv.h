// Launchers of the CUDA kernels of the kv family (KIVI-layout quantized KV cache): decode attention
// straight from the packed blocks and the residual window, and the quantize+pack of whole blocks.
// Spec: python/lowbit/reference/kv.py; format: docs/formats.md ("kv"); the per-group quantization
// steps are shared with the CPU kernel in csrc/common/kv.h. Plain CUDA C++: no torch headers, so the
// file compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lowbit::cuda::kv {

enum class DType { kBFloat16, kFloat16, kFloat32 };

// Largest head_dim the decode kernel takes (its outputs live in registers, 8 channels per lane).
constexpr int64_t kMaxHeadDim = 256;

// A tensor whose data for batch row b and head h starts at p + (b * sb + h * sh) elements, laid out
// contiguously from there (sb or sh 0 where the tensor broadcasts over that dimension).
struct Strided {
  const void* p = nullptr;
  int64_t sb = 0, sh = 0;
};

// One decode-attention call, device pointers. Per (batch row, KV head): k_codes [nb][D][G * bits /
// 8] uint8, k_scale / k_zero [nb][D], v_codes [nb G][D * bits / 8] uint8, v_scale / v_zero [nb G][D
// / G], k_res / v_res [r][D]. Per (batch row, query head): query [L][D], mask [L][nb G + r] bool
// (mask.p null: query l sees the tokens up to nb G + r - L + l). Floats are of dtype.
struct DecodeArgs {
  DType dtype = DType::kFloat32;
  int64_t B = 0, Hq = 0, Hkv = 0, L = 0, D = 0, G = 0, nb = 0, r = 0;
  int bits = 4;
  Strided query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, mask;
  float scaling = 1.f;
  void* out = nullptr;  // [B][Hq][L][D] of dtype, contiguous
};

// How a call is split over the context: `splits` slices of each KV head's tokens, whose partial
// softmax states need `workspace_floats` fp32 of workspace.
struct DecodePlan {
  int64_t splits = 1;
  int64_t workspace_floats = 0;
};

// The plan of a call on the current device. cudaErrorInvalidValue for head_dim above kMaxHeadDim,
// bits not 2, 4 or 8, or G not a positive multiple of 8 / bits dividing D.
cudaError_t decode_plan(const DecodeArgs& a, DecodePlan* plan);

// out = softmax(query K^T * scaling, masked) V for every query head, each KV head's packed tokens
// read once for all the query heads that share it (per tile of up to 16 query rows). K and V are
// dequantized in fp32 as the reference does (code * scale + zero, the product rounded, then the
// sum), scores and sums in fp32 with an online softmax; a query that sees no token gets zeros.
// workspace: plan.workspace_floats fp32 (device). Two launches, no host synchronization: usable
// under CUDA graph capture.
cudaError_t decode_attention(const DecodeArgs& a, const DecodePlan& plan, float* workspace, cudaStream_t stream);

// Whole blocks of keys and values [B][H][T][D] (contiguous, dtype, T a multiple of G) in the packed
// form, bit for bit as the reference for finite states: k_codes [B][H][T/G][D][G bits/8], k_scale /
// k_zero [B][H][T/G][D], v_codes [B][H][T][D bits/8], v_scale / v_zero [B][H][T][D/G].
// cudaErrorInvalidValue for bits not 2, 4 or 8, or G not a positive multiple of 8 / bits dividing D.
cudaError_t quantize(DType dtype, const void* keys, const void* values, int64_t B, int64_t H, int64_t T, int64_t D,
                     int64_t G, int bits, uint8_t* k_codes, void* k_scale, void* k_zero, uint8_t* v_codes,
                     void* v_scale, void* v_zero, cudaStream_t stream);

}  // namespace lowbit::cuda::kv
