// C++ CPU kernels of the codebook family (additive vector quantization, AQLM's layout; spec in
// python/lowbit/reference/codebook.py). Built for plain x86-64, AVX2 and AVX-512 and picked at run
// time (isa.h); OpenMP splits output rows.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <c10/util/BFloat16.h>

namespace lowbit::cpu::codebook {

// One layer's stored form, as the kernels read it.
//   codes: N rows x G groups x C codes, uint8 (8-bit codes) or uint16 (16-bit codes, AQLM's int16
//          read as unsigned), row-major
//   books: C codebooks x E entries x g values, fp32 (converted from the stored dtype)
//   scales: N, fp32
struct Layer {
  const uint8_t* codes8 = nullptr;
  const uint16_t* codes16 = nullptr;
  int64_t N = 0, G = 0, C = 0, g = 0, E = 0;
  const float* books = nullptr;
  const float* scales = nullptr;
};

// The lookup-table product for 8-bit codes: lut [M][G][C][256] (fp32) holds, for each row of x and
// input group j, the dot products of x's group with every codeword of each codebook; then
// y[m, n] = scales[n] * sum_j sum_c lut[m][j][c][code(n, j, c)] + bias[n], y [M, N] fp32.
void lut_matmul(const float* lut, int64_t M, const Layer& w, const float* bias, float* y);

// y [M, N] (fp32) = x [M, K] (fp32) @ W^T + bias, for any M (rows of x in blocks of kFmaMaxBlock),
// W summed from the fp32 codebooks group by group as the reference sums it, never stored, and
// multiplied by fp32 FMAs (AVX2 / AVX-512 builds: 8 feature lanes per output row, summed at the end);
// then each column scaled by scales[n], plus bias[n] (fp32, or null).
constexpr int64_t kFmaMaxBlock = 4;
void fma_matmul(const float* x, int64_t M, const Layer& w, const float* bias, float* y);

// Rows [n0, n1) of W (scaled, summed in fp32 in codebook order, then converted to T: bit-exact
// with the reference when T is float) into out, rows K = G * g apart.
template <typename T>
void decode_rows(const Layer& w, int64_t n0, int64_t n1, T* out);

// Rows [n0, n1) of W without its scales: group j of row n is the table row [g values] at the
// group's index, its code (one codebook) or a + 256 b for two 8-bit codes (a, b) (the table then
// holds codebook 0's entry a plus codebook 1's entry b). Rows K = G * g apart.
template <typename T>
void decode_table_rows(const Layer& w, const T* table, int64_t n0, int64_t n1, T* out);

// Calls fn(C, k16, G) with the layer's configuration as compile-time constants
// (std::integral_constant / std::bool_constant): one codebook or two, 16-bit codes or 8-bit, groups of
// 8 or 4. Two codebooks of 16-bit codes, which no decode table covers, are the callers' to refuse.
template <typename Fn>
void with_configuration(const Layer& w, Fn&& fn) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using G8 = std::integral_constant<int, 8>;
  using G4 = std::integral_constant<int, 4>;
  const bool k16 = w.codes16 != nullptr;
  if (w.g == 8) {
    if (k16) return fn(One{}, std::true_type{}, G8{});
    if (w.C == 2) return fn(Two{}, std::false_type{}, G8{});
    return fn(One{}, std::false_type{}, G8{});
  }
  if (k16) return fn(One{}, std::true_type{}, G4{});
  if (w.C == 2) return fn(Two{}, std::false_type{}, G4{});
  fn(One{}, std::false_type{}, G4{});
}

// Whether matmul_amx_bf16 runs: AMX-BF16 and the tile state (int8_gemm.h, amx_available).
bool amx_bf16_available();

// y [M, N] (bf16) = x [M, K] (bf16) @ W^T on AMX tiles, W decoded as decode_table_rows does (from
// the fp32 codebooks for 8-bit codes, through `table` at the edges and for 16-bit codes; every
// configuration but two codebooks of 16-bit codes), then each column
// scaled by scales[n], plus bias[n] (fp32, or null), rounded once to bf16.
void matmul_amx_bf16(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
                     c10::BFloat16* y);

// The most rows of x matmul_dot_bf16 takes.
constexpr int64_t kDotMaxRows = 4;

// Whether matmul_dot_bf16 runs: AVX512-BF16 on the host, and the AVX-512 build in use (isa.h).
bool dot_bf16_available();

// y [M, N] (bf16) = x [M, K] (bf16) @ W^T for M <= kDotMaxRows, W decoded through `table` as
// decode_table_rows does (every configuration but two codebooks of 16-bit codes), each output row
// of W dotted with x by vdpbf16ps (fp32 sums; subnormals flushed), then each column scaled by
// scales[n], plus bias[n] (fp32, or null), rounded once to bf16.
void matmul_dot_bf16(const c10::BFloat16* x, int64_t M, const Layer& w, const c10::BFloat16* table, const float* bias,
                     c10::BFloat16* y);

// For each of P points [P, g] (fp32), the index of the codebook entry [E, g] with the least
// weighted squared distance sum_t weights[p, t] (p_t - c_t)^2 (weights null: ones), lowest index
// on ties; a NaN distance (from non-finite inputs) wins, the first one, as torch.argmin has it.
void nearest(const float* points, const float* weights, int64_t P, int64_t g, const float* book, int64_t E,
             int32_t* out);

}  // namespace lowbit::cpu::codebook
