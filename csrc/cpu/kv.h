// C++ CPU kernels of the kv family (KIVI-layout quantized KV cache; spec in
// python/lowbit/reference/kv.py): decode attention straight from the packed blocks and the
// residual window. Built for plain x86-64, AVX2 and AVX-512 and picked at run time (isa.h).
#pragma once

#include <stdint.h>

namespace lowbit::cpu::kv {

// A tensor whose data for batch row b and head h starts at p + b * sb + h * sh, laid out
// contiguously from there (sb or sh 0 where the tensor broadcasts over that dimension).
template <typename P>
struct Strided {
  const P* p = nullptr;
  int64_t sb = 0, sh = 0;
  const P* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

// Channel d's place in slot order (kv_kernels.inc) within its group of G channels, P codes a byte.
inline int64_t slot_order(int64_t d, int64_t G, int64_t P) {
  const int64_t g0 = d / G * G, in = d - g0;
  return g0 + (in % P) * (G / P) + in / P;
}

// One call's operands, T the model's dtype (float, c10::BFloat16, c10::Half). Per (b, kv head):
// k_codes [nb][D][packed_length(G, bits)], k_scale / k_zero [nb][D], v_codes [nb G][packed_length(D,
// bits)], v_scale / v_zero [nb G][D / G], k_res / v_res [r][D]. Per (b, query head): query [L][D],
// mask [L][nb G + r] (null: query l sees tokens up to T - L + l).
template <typename T>
struct DecodeArgs {
  int64_t B = 0, Hq = 0, Hkv = 0, L = 0, D = 0, G = 0, bits = 0, nb = 0, r = 0;
  Strided<T> query;
  Strided<uint8_t> k_codes, v_codes;
  Strided<T> k_scale, k_zero, v_scale, v_zero, k_res, v_res;
  Strided<bool> mask;
  float scaling = 1.f;
  T* out = nullptr;  // [B][Hq][L][D], contiguous
};

// out = softmax(query K^T * scaling, masked) V for every query head, each KV head's tokens read
// once for all the query heads that share it. K and V are dequantized in fp32 (code * scale +
// zero, as the reference does), scores and sums in fp32 with an online softmax over chunks of G
// tokens; OpenMP over (batch row, KV head, split of the tokens), splits merged by their maxima.
// A query that sees no token gets zeros. Needs G a multiple of 8 / bits.
template <typename T>
void decode_attention(const DecodeArgs<T>& a);

// Whole blocks of keys and values [B][H][T][D] (contiguous, T a multiple of G) in the packed form,
// bit for bit as the reference for finite states (python/lowbit/reference/kv.py): per group, the
// zero is its minimum rounded down to T, the scale (max - zero) / (2^bits - 1) rounded up to T, a
// code round-half-even((x - zero) / scale) (0 where the scale is 0). Outputs: k_codes
// [B][H][T/G][D][G*bits/8], k_scale / k_zero [B][H][T/G][D], v_codes [B][H][T][D*bits/8], v_scale /
// v_zero [B][H][T][D/G]. OpenMP over (batch row, head, block).
template <typename T>
void quantize(const T* keys, const T* values, int64_t B, int64_t H, int64_t tokens, int64_t D, int64_t G, int bits,
              uint8_t* k_codes, T* k_scale, T* k_zero, uint8_t* v_codes, T* v_scale, T* v_zero);

}  // namespace lowbit::cpu::kv
