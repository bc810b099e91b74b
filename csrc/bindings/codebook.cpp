// Torch glue of the codebook family on the CPU: the product straight from the codes (on the path
// auto_path picks per host, rows and layer: FMAs on W summed from the codebooks, lookup tables, AVX512-BF16
// dot products, AMX tiles, or decoded tiles of W into the host's dense GEMM), the dequantization,
// and the encoder's nearest-codeword search.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bindings/codebook.h"
#include "bindings/per_weight.h"
#include "cpu/codebook.h"

namespace lowbit {
namespace {

// The most rows the lookup-table product takes (forced only: its cost grows with the rows, one table
// and one lookup per code per row, and the FMA product is faster from 2 rows on).
constexpr int64_t kLutMaxRows = 4;
// Output rows per tile of the decoded product: 256 x 4096 bf16 is 2 MB.
constexpr int64_t kTileRows = 256;

// t as contiguous fp32: t itself when it is, else a copy made once per tensor (codebooks, scales
// and bias are a layer's fixed tensors: converting them in every call would redo the same work).
at::Tensor as_float(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  static PerWeight<at::Tensor> kept;
  return kept.get(t, [](const at::Tensor& v) { return v.to(at::kFloat).contiguous(); });
}

// The layer as the kernels read it; holds the fp32 copies its pointers point into.
struct LayerView {
  at::Tensor codes, books, scales;
  cpu::codebook::Layer layer;

  LayerView(const at::Tensor& codes_in, const at::Tensor& codebooks, const at::Tensor& scales_in) {
    codes = codes_in.contiguous();
    books = as_float(codebooks);
    scales = as_float(scales_in);
    layer.N = codes.size(0);
    layer.G = codes.size(1);
    layer.C = codes.size(2);
    layer.E = codebooks.size(1);
    layer.g = codebooks.size(3);
    if (codes.scalar_type() == at::kByte) {
      layer.codes8 = codes.const_data_ptr<uint8_t>();
    } else {
      layer.codes16 = reinterpret_cast<const uint16_t*>(codes.const_data_ptr<int16_t>());
    }
    layer.books = books.const_data_ptr<float>();
    layer.scales = scales.const_data_ptr<float>();
  }
};

// The decode table of a layer's codebooks in dtype (cpu/codebook.h, decode_table_rows): the
// codebook itself for one codebook; for two of 8-bit codes, every sum entry a of codebook 0 plus
// entry b of codebook 1 (in fp32, then rounded once) at a + 256 b; undefined for two of 16-bit
// codes (2^32 sums), which decode summing. Kept per codebooks tensor and dtype.
at::Tensor decode_table(const at::Tensor& codebooks, at::ScalarType dtype) {
  if (codebooks.size(0) == 2 && codebooks.size(1) > 256) return {};
  static PerWeight<at::Tensor> kept[3];
  const int slot = dtype == at::kFloat ? 0 : dtype == at::kBFloat16 ? 1 : 2;
  return kept[slot].get(codebooks, [dtype](const at::Tensor& books) {
    const at::Tensor b = as_float(books).select(2, 0);  // [C, E, g]
    if (books.size(0) == 1) return b[0].to(dtype).contiguous();
    const at::Tensor sums = (b[0].unsqueeze(0) + b[1].unsqueeze(1));  // [b, a, g]: entry a + 256 b
    return sums.reshape({-1, books.size(3)}).to(dtype).contiguous();
  });
}

// Two codebooks of 8-bit codes have a decode table of 65536 sums (1 MB in bf16) per layer; the AMX
// and dot kernels read W through it only when the layer has at least this many groups (16 lookups
// per entry), and sum the fp32 codebooks (16 KB, in L1) otherwise: a small layer would fetch most of
// its table from memory on every call, and keep 1 MB of tables beside a few hundred KB of codes.
// Measured (SmolLM2's 7 linears x 30 layers, 2x8, bf16 x, 16 rows, AMX, 1 thread): 52 ms with the
// tables against 23 ms without; 4096 x 4096 layers are faster with them (27 ms against 40 ms).
constexpr int64_t kTableMinGroups = 16 * 65536;

bool wants_table(const cpu::codebook::Layer& w) {
  return w.codes16 != nullptr || w.C == 1 || w.N * w.G >= kTableMinGroups;
}

// y = x W^T + bias by tiles of output rows: each thread decodes a tile of W into x's dtype (in its
// L2), multiplies it with x through ATen's dense GEMM of that dtype, single-threaded inside the
// parallel region (oneDNN, on AMX for bf16 where the host has it), then scales the tile's columns
// and adds the bias. W is never whole in memory. With a decode table a group is one copy of g
// values (W without its scales, rounded to x's dtype once); without one, groups are summed and
// scaled in fp32 (W rounded to x's dtype once).
at::Tensor tiled_matmul(const at::Tensor& x, const at::Tensor& codebooks, const cpu::codebook::Layer& w,
                        const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), N = w.N, K = w.G * w.g;
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor table = wants_table(w) ? decode_table(codebooks, x.scalar_type()) : at::Tensor();
  const at::Tensor bf = bias.has_value() ? as_float(*bias) : at::Tensor();
  const float* b = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  const int64_t tile = std::min<int64_t>(N, kTileRows);
  const int64_t tiles = (N + tile - 1) / tile;
  const bool inference = c10::InferenceMode::is_enabled();
  dispatch_float_dtype(x.scalar_type(), "x", [&](auto type) {
    using T = typename decltype(type)::type;
    T* out = y.data_ptr<T>();
    const T* tab = table.defined() ? table.const_data_ptr<T>() : nullptr;
#pragma omp parallel num_threads(std::min<int64_t>(tiles, omp_get_max_threads()))
    {
      // The caller's grad and inference modes, in this thread too.
      c10::InferenceMode mode(inference);
      at::NoGradGuard no_grad;
      at::Tensor wt = at::empty({tile, K}, x.options());
      at::Tensor part = at::empty({M, tile}, x.options());
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * tile, rows = std::min(tile, N - n0);
        if (tab != nullptr) {
          cpu::codebook::decode_table_rows<T>(w, tab, n0, n0 + rows, wt.data_ptr<T>());
        } else {
          cpu::codebook::decode_rows<T>(w, n0, n0 + rows, wt.data_ptr<T>());
        }
        at::Tensor pv = part.narrow(1, 0, rows);
        at::mm_out(pv, x, wt.narrow(0, 0, rows).t());
        const T* src = part.const_data_ptr<T>();
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t i = 0; i < rows; ++i) {
            const float v = static_cast<float>(src[m * tile + i]);
            const float scaled = tab != nullptr ? v * w.scales[n0 + i] : v;
            out[m * N + n0 + i] = static_cast<T>(b != nullptr ? scaled + b[n0 + i] : scaled);
          }
        }
      }
    }
  });
  return y;
}

// The path auto takes. Measured on a Xeon with AMX, 1 thread, each layer its own codebooks as in a
// model (SmolLM2's 7 linears x 30 layers, and 6 x 4096 x 4096 + 2 x 14336 x 4096; 2x8; ms per pass,
// bench/test_bench_codebook.py has the same comparison):
//   bf16 x   rows:       1          2          4          8          16
//     FMA             10.7/17.3  10.7/20.0  13.0/25.4  24.5/49.7  46/90
//     AMX             21.0/27.0  15.5/26.3  19.5/26.7  18.4/25.1  21/25
//     dot (table)     39.8/20.0  47.5/18.8  61.9/23.8
//     lookup tables   12.1/13.9  22.7/35.2  51/83
//   fp32 x: FMA 9.7/18.3 at 1 row, 12.1/24.9 at 4, 44.7/91 at 16, 86.7/171 at 32, 171/337 at 64;
//   decoded tiles into ATen's GEMM 105/127, 108/158, 131/201, 154/240, 196/313.
// So: AMX tiles above kFmaMaxRowsBeforeAmx rows of bf16 x where the host has them; the dot product
// for one codebook (its table is the codebook itself, in L1 for 8-bit codes); the lookup tables for
// one row of a layer of at least kLutMinGroups groups; the FMA product up to kFmaMaxRows rows; decoded
// tiles above.
constexpr int64_t kFmaMaxRowsBeforeAmx = 4;
constexpr int64_t kFmaMaxRows = 64;
constexpr int64_t kLutMinGroups = 1 << 20;

enum class Path { kAuto, kDot, kAmx, kFma, kLut, kTiled };

Path parse_path(const std::string& path) {
  if (path == "auto") return Path::kAuto;
  if (path == "dot") return Path::kDot;
  if (path == "amx") return Path::kAmx;
  if (path == "fma") return Path::kFma;
  if (path == "lut") return Path::kLut;
  if (path == "tiled") return Path::kTiled;
  TORCH_CHECK_VALUE(false, "LOWBIT_CPU_CODEBOOK must be one of auto, dot, amx, fma, lut, tiled, got '", path, "'");
  return Path::kAuto;
}

// The product's path for this x and layer. LOWBIT_CPU_CODEBOOK forces one (for tests and
// comparisons; read once): a path that cannot take this input (dot or amx without their
// instructions or bf16 x, or for two codebooks of 16-bit codes; lut with 16-bit codes or above
// kLutMaxRows rows) raises ValueError.
Path auto_path(int64_t M, const cpu::codebook::Layer& w, bool dot, bool amx, bool lut) {
  if (amx && M > kFmaMaxRowsBeforeAmx) return Path::kAmx;
  if (dot && w.C == 1) return Path::kDot;
  if (lut && M == 1 && w.N * w.G >= kLutMinGroups) return Path::kLut;
  if (M <= kFmaMaxRows) return Path::kFma;
  return amx ? Path::kAmx : Path::kTiled;
}

Path choose_path(at::ScalarType dtype, int64_t M, const cpu::codebook::Layer& w) {
  static const Path forced = [] {
    const char* env = std::getenv("LOWBIT_CPU_CODEBOOK");
    return env && *env ? parse_path(env) : Path::kAuto;
  }();
  const bool bf16 = dtype == at::kBFloat16 && !(w.C == 2 && w.codes16 != nullptr);
  const bool amx = bf16 && cpu::codebook::amx_bf16_available();
  const bool dot = bf16 && M <= cpu::codebook::kDotMaxRows && cpu::codebook::dot_bf16_available();
  const bool lut = w.codes8 != nullptr && M <= kLutMaxRows;
  switch (forced) {
    case Path::kAuto:
      break;
    case Path::kDot:
      TORCH_CHECK_VALUE(dot, "LOWBIT_CPU_CODEBOOK=dot needs AVX512-BF16 (and the AVX-512 build), bf16 x of at most ",
                        cpu::codebook::kDotMaxRows, " rows, and not two codebooks of 16-bit codes");
      return forced;
    case Path::kAmx:
      TORCH_CHECK_VALUE(amx, "LOWBIT_CPU_CODEBOOK=amx needs AMX-BF16 (and the AVX-512 build), bf16 x, and not two "
                        "codebooks of 16-bit codes");
      return forced;
    case Path::kLut:
      TORCH_CHECK_VALUE(lut, "LOWBIT_CPU_CODEBOOK=lut needs 8-bit codes and at most ", kLutMaxRows, " rows");
      return forced;
    default:
      return forced;
  }
  return auto_path(M, w, dot, amx, lut);
}

at::Tensor codebook_matmul_cpu(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& codebooks,
                               const at::Tensor& scales, const std::optional<at::Tensor>& bias_in) {
  codebook_checks::check_matmul(x_in, codes, codebooks, scales, bias_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = codes.size(0);
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const LayerView view(codes, codebooks, scales);
  if (x.size(1) == 0) {
    return bias.has_value() ? bias->unsqueeze(0).expand({M, N}).contiguous() : at::zeros({M, N}, x.options());
  }
  const Path path = choose_path(x.scalar_type(), M, view.layer);
  const at::Tensor bf = bias.has_value() ? as_float(*bias) : at::Tensor();
  const float* b = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  switch (path) {
    case Path::kDot:
    case Path::kAmx: {
      const bool table_used = path == Path::kDot || wants_table(view.layer);
      const at::Tensor table = table_used ? decode_table(codebooks, at::kBFloat16) : at::Tensor();
      at::Tensor y = at::empty({M, N}, x.options());
      (path == Path::kDot ? cpu::codebook::matmul_dot_bf16 : cpu::codebook::matmul_amx_bf16)(
          x.const_data_ptr<c10::BFloat16>(), M, view.layer, table.defined() ? table.const_data_ptr<c10::BFloat16>() : nullptr,
          b, y.data_ptr<c10::BFloat16>());
      return y;
    }
    case Path::kFma: {
      const at::Tensor xf = x.to(at::kFloat).contiguous();
      at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
      cpu::codebook::fma_matmul(xf.const_data_ptr<float>(), M, view.layer, b, y.data_ptr<float>());
      return y.to(x.scalar_type());
    }
    case Path::kLut: {
      // The tables are one small fp32 GEMM: x's groups [M * G, g] times every codeword [C * 256, g].
      const int64_t g = view.layer.g;
      const at::Tensor lut = at::mm(x.to(at::kFloat).reshape({-1, g}), view.books.reshape({-1, g}).t());
      at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
      cpu::codebook::lut_matmul(lut.const_data_ptr<float>(), M, view.layer, b, y.data_ptr<float>());
      return y.to(x.scalar_type());
    }
    default:
      break;
  }
  return tiled_matmul(x, codebooks, view.layer, bias);
}

at::Tensor codebook_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                                   at::ScalarType dtype) {
  codebook_checks::check_weight(codes, codebooks, scales);
  TORCH_CHECK_TYPE(codebook_checks::is_float_dtype(dtype), "dtype must be bfloat16, float16 or float32, got ",
                   dtype_name(dtype));
  const LayerView view(codes, codebooks, scales);
  const int64_t N = view.layer.N, K = view.layer.G * view.layer.g;
  at::Tensor w = at::empty({N, K}, codes.options().dtype(dtype));
  dispatch_float_dtype(dtype, "dtype", [&](auto type) {
    using T = typename decltype(type)::type;
    T* out = w.data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      cpu::codebook::decode_rows<T>(view.layer, n0, n1, out + n0 * K);
    });
  });
  return w;
}

at::Tensor codebook_nearest_cpu(const at::Tensor& points_in, const std::optional<at::Tensor>& weights_in,
                                const at::Tensor& codebook_in) {
  TORCH_CHECK_TYPE(points_in.scalar_type() == at::kFloat && points_in.dim() == 2,
                   "points must be a 2-D float32 tensor, got ", dtype_name(points_in.scalar_type()), " of shape ",
                   points_in.sizes());
  const int64_t P = points_in.size(0), g = points_in.size(1);
  TORCH_CHECK_VALUE(codebook_in.scalar_type() == at::kFloat && codebook_in.dim() == 2 && codebook_in.size(1) == g,
                    "codebook must be float32 [entries, ", g, "], got ", dtype_name(codebook_in.scalar_type()),
                    " of shape ", codebook_in.sizes());
  const int64_t E = codebook_in.size(0);
  TORCH_CHECK_VALUE(E >= 1 && E <= 65536, "codebook must have 1 to 65536 entries, got ", E);
  if (weights_in.has_value()) {
    TORCH_CHECK_VALUE(weights_in->scalar_type() == at::kFloat && weights_in->sizes() == points_in.sizes(),
                      "weights must be float32 of the points' shape ", points_in.sizes(), ", got ",
                      dtype_name(weights_in->scalar_type()), " of shape ", weights_in->sizes());
  }
  const at::Tensor points = points_in.contiguous(), codebook = codebook_in.contiguous();
  const at::Tensor weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({P}, points.options().dtype(at::kInt));
  if (P == 0) return out;
  cpu::codebook::nearest(points.const_data_ptr<float>(), weights.defined() ? weights.const_data_ptr<float>() : nullptr,
                         P, g, codebook.const_data_ptr<float>(), E, out.data_ptr<int32_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("codebook_matmul", &codebook_matmul_cpu);
  m.impl("codebook_dequantize", &codebook_dequantize_cpu);
  m.impl("_codebook_nearest", &codebook_nearest_cpu);
}

}  // namespace lowbit
