// Torch glue of the int8 family on the CPU: the pre-pass, the int8 GEMM with its epilogue, the
// decomposed product (int8_matmul, int8_linear) and the weight-only GEMV.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

#include "bindings/int8.h"
#include "bindings/per_weight.h"
#include "cpu/int8.h"
#include "cpu/int8_gemm.h"

namespace lowbit {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_prepass_cpu(
    const at::Tensor& x_in, const at::Tensor& static_mask_in, const at::Tensor& static_idx_in, double threshold) {
  int8_checks::check_prepass(x_in, static_mask_in, static_idx_in);
  const at::Tensor x = x_in.contiguous(), static_mask = static_mask_in.contiguous();
  const at::Tensor static_idx = static_idx_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), S = static_idx.numel();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor col_flags = at::empty({K}, x.options().dtype(at::kByte));
  at::Tensor x_static = at::empty({M, S}, x.options());
  dispatch_float_dtype(x.scalar_type(), "x", [&](auto type) {
    using T = typename decltype(type)::type;
    cpu::int8::prepass<T>(x.const_data_ptr<T>(), M, K, static_mask.const_data_ptr<uint8_t>(),
                          static_idx.const_data_ptr<int32_t>(), S, static_cast<float>(threshold),
                          xq.data_ptr<int8_t>(), row_scale.data_ptr<float>(), col_flags.data_ptr<uint8_t>(),
                          x_static.data_ptr<T>());
  });
  return {xq, row_scale, col_flags, x_static};
}

// x_static @ static_weight^T in fp32, or an undefined tensor when there are no static columns.
at::Tensor static_product(const at::Tensor& x_static, const at::Tensor& static_weight) {
  if (x_static.size(1) == 0) return {};
  return at::matmul(x_static.to(at::kFloat), static_weight.to(at::kFloat).t()).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The epilogue's inputs as the CPU kernels take them: contiguous fp32 factors of the outlier side
// product (dyn_x [M, D], dyn_w [D, N]) and of the static columns (converted only when there are
// any), and the scales. Tensors are kept here so that the Side pointers stay valid.
struct EpilogueInputs {
  at::Tensor dyn_x, dyn_w, stat_x, stat_w, weight_scale, row_scale;
  cpu::int8::Side dyn{}, stat{};

  EpilogueInputs(const at::Tensor& row_scale_in, const at::Tensor& weight_scale_in,
                 const std::optional<at::Tensor>& dyn_x_in, const std::optional<at::Tensor>& dyn_w_in,
                 const at::Tensor& x_static, const at::Tensor& static_weight) {
    if (dyn_x_in.has_value()) dyn_x = dyn_x_in->contiguous();
    if (dyn_w_in.has_value()) dyn_w = dyn_w_in->contiguous();
    const bool has_static = x_static.size(1) > 0;  // no conversions on the common path without any
    if (has_static) {
      stat_x = x_static.to(at::kFloat).contiguous();
      stat_w = static_weight.to(at::kFloat).t().contiguous();
    }
    weight_scale = weight_scale_in.contiguous();
    row_scale = row_scale_in.contiguous();
    dyn = {ptr_or_null<float>(dyn_x), ptr_or_null<float>(dyn_w), dyn_x.defined() ? dyn_x.size(1) : 0};
    stat = {ptr_or_null<float>(stat_x), ptr_or_null<float>(stat_w), has_static ? stat_x.size(1) : 0};
  }
};

// Everything of the int8 GEMM after xq @ weight^T, which the caller ran and passes as acc [M, N]
// (int32, or its exact fp32 image), with the outlier side product's factors dyn_x [M, D] and
// dyn_w [D, N] (fp32, the int8 weight's flagged columns), all from lowbit/int8/cpu_gemm.py.
at::Tensor int8_epilogue_cpu(const at::Tensor& acc_in, const at::Tensor& row_scale, const at::Tensor& weight_scale_in,
                             const std::optional<at::Tensor>& dyn_x_in, const std::optional<at::Tensor>& dyn_w_in,
                             const at::Tensor& x_static, const at::Tensor& static_weight,
                             const std::optional<at::Tensor>& bias_in) {
  int8_checks::check_epilogue(acc_in, row_scale, weight_scale_in, dyn_x_in, dyn_w_in, x_static, static_weight,
                              bias_in);
  const int64_t M = acc_in.size(0), N = acc_in.size(1);
  at::Tensor y = at::empty({M, N}, x_static.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor acc = acc_in.contiguous();
  const EpilogueInputs in(row_scale, weight_scale_in, dyn_x_in, dyn_w_in, x_static, static_weight);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  dispatch_float_dtype(x_static.scalar_type(), "x", [&](auto type) {
    using T = typename decltype(type)::type;
    const auto run = [&](auto* acc_ptr) {
      cpu::int8::epilogue(acc_ptr, M, N, in.row_scale.const_data_ptr<float>(), in.weight_scale.const_data_ptr<float>(),
                          in.dyn, in.stat, ptr_or_null<T>(bias), y.data_ptr<T>());
    };
    if (acc.scalar_type() == at::kInt) {
      run(acc.const_data_ptr<int32_t>());
    } else {
      run(acc.const_data_ptr<float>());
    }
  });
  return y;
}

// ---- the int8 GEMM ------------------------------------------------------------------------------
// oneDNN's int8 kernels (onednn::qlinear_pointwise) with the weight packed once per weight tensor:
// at::_int_mm repacks the weight at every call, which costs more than the product for small
// batches. oneDNN wants unsigned activations, so xq goes in as xq + 128 (its sign bit flipped) with
// a zero point of 128, and it returns the accumulator in fp32 (exact below 2^24, within an fp32
// rounding or two above: the zero point is compensated in fp32), which the epilogue converts anyway.
// Some hosts' oneDNN kernels (AVX2 without VNNI) sum pairs of u8 x s8 products in saturating
// int16, which is wrong for large values: a first call checks an all-127 worst case (and a random
// case) against at::_int_mm, and only an exact oneDNN is used.

const c10::OperatorHandle* find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  return handle.has_value() ? new c10::OperatorHandle(*handle) : nullptr;  // kept for the process
}

struct OneDnn {
  const c10::OperatorHandle* prepack = find_op("onednn::qlinear_prepack");
  const c10::OperatorHandle* linear = find_op("onednn::qlinear_pointwise");

  at::Tensor pack(const at::Tensor& weight) const {
    torch::jit::Stack stack{weight, c10::IValue()};
    prepack->callBoxed(stack);
    return stack[0].toTensor();
  }

  at::Tensor gemm(const at::Tensor& xq, const at::Tensor& packed, int64_t n) const {
    const at::Tensor shifted = xq.view(at::kByte).bitwise_xor(0x80);  // int8 v -> uint8 v + 128
    torch::jit::Stack stack{shifted, 1.0, int64_t(128), packed, at::ones({n}, at::kFloat),
                            at::zeros({n}, at::kLong), c10::IValue(), 1.0, int64_t(0), c10::IValue(at::kFloat),
                            std::string("none"), c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear->callBoxed(stack);
    return stack[0].toTensor();
  }
};

// Below this many input features the packed path is not worth it (and oneDNN mishandles K = 1).
constexpr int64_t kOneDnnMinK = 16;

const OneDnn* onednn_if_exact() {
  static const OneDnn* checked = []() -> const OneDnn* {
    static const OneDnn dnn;
    if (dnn.prepack == nullptr || dnn.linear == nullptr) return nullptr;
    try {
      const at::Tensor worst = at::full({5, 96}, 127, at::kChar), worst_w = at::full({7, 96}, 127, at::kChar);
      at::Tensor rand = at::randint(-127, 128, {5, 96}, at::kChar), rand_w = at::randint(-127, 128, {7, 96}, at::kChar);
      for (const auto& [x, w] : {std::pair{worst, worst_w}, std::pair{rand, rand_w}, std::pair{worst, rand_w.neg()}}) {
        const at::Tensor want = at::_int_mm(x, w.t()).to(at::kFloat);
        if (!at::equal(dnn.gemm(x, dnn.pack(w), w.size(0)), want)) return nullptr;
      }
    } catch (const std::exception&) {
      return nullptr;
    }
    return &dnn;
  }();
  return checked;
}

using PackedWeights = PerWeight<at::Tensor>;

// The paths of the CPU int8 GEMM, all exact: oneDNN (where it passed the worst-case check, with the
// weight packed once per weight tensor: a second copy), lowbit's AVX2 kernel (csrc/cpu/int8_gemm.cpp,
// packs blocks of the row-major weight as it goes: no copy kept), torch._int_mm.
enum class GemmPath { kAuto, kAmx, kOneDnn, kAvx2, kIntMm };

GemmPath parse_path(const std::string& path) {
  if (path == "auto") return GemmPath::kAuto;
  if (path == "amx") return GemmPath::kAmx;
  if (path == "onednn") return GemmPath::kOneDnn;
  if (path == "avx2") return GemmPath::kAvx2;
  if (path == "int_mm") return GemmPath::kIntMm;
  TORCH_CHECK_VALUE(false, "path must be one of auto, amx, onednn, avx2, int_mm, got '", path, "'");
  return GemmPath::kAuto;
}

// The path auto takes: lowbit's AMX kernel where the CPU has AMX int8 (faster than oneDNN's at every
// batch size, measured), else oneDNN where it is exact here (VNNI), else lowbit's AVX2 kernel, else
// torch._int_mm. LOWBIT_CPU_INT8_GEMM forces one (for tests and comparisons); an unavailable one
// raises at the first call.
GemmPath auto_path(int64_t K) {
  static const GemmPath forced = [] {
    const char* env = std::getenv("LOWBIT_CPU_INT8_GEMM");
    return env && *env ? parse_path(env) : GemmPath::kAuto;
  }();
  if (forced != GemmPath::kAuto) return forced;
  if (cpu::int8::amx_available()) return GemmPath::kAmx;
  if (K >= kOneDnnMinK && onednn_if_exact() != nullptr) return GemmPath::kOneDnn;
  if (cpu::int8::avx2_available()) return GemmPath::kAvx2;
  return GemmPath::kIntMm;
}

// The AMX GEMM's packed copy of weight (int8_gemm.h), made once per weight tensor.
at::Tensor amx_weight(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(cpu::int8::amx_available(), "this CPU (or its OS) offers no AMX int8: the amx int8 GEMM cannot run");
  static PackedWeights packed;
  return packed.get(weight, [](const at::Tensor& w) {
    at::Tensor out = at::empty({cpu::int8::amx_packed_bytes(w.size(0), w.size(1))}, w.options());
    cpu::int8::amx_pack(w.const_data_ptr<int8_t>(), w.size(0), w.size(1), out.data_ptr<int8_t>());
    return out;
  });
}

// xq int8 [M, K] @ weight int8 [N, K]^T -> the exact accumulator [M, N], int32 (fp32 from oneDNN).
at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& weight, GemmPath path = GemmPath::kAuto) {
  const int64_t M = xq.size(0), K = xq.size(1), N = weight.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, xq.options().dtype(at::kInt));
  if (path == GemmPath::kAuto) path = auto_path(K);
  switch (path) {
    case GemmPath::kAmx: {
      const at::Tensor w = amx_weight(weight);
      at::Tensor acc = at::empty({M, N}, xq.options().dtype(at::kInt));
      cpu::int8::gemm_amx(xq.const_data_ptr<int8_t>(), M, K, w.const_data_ptr<int8_t>(), N, acc.data_ptr<int32_t>());
      return acc;
    }
    case GemmPath::kOneDnn: {
      const OneDnn* dnn = onednn_if_exact();
      TORCH_CHECK_VALUE(dnn != nullptr, "the oneDNN int8 GEMM is missing or not exact on this host");
      static PackedWeights packed;
      return dnn->gemm(xq, packed.get(weight, [dnn](const at::Tensor& w) { return dnn->pack(w); }), N);
    }
    case GemmPath::kAvx2: {
      TORCH_CHECK_VALUE(cpu::int8::avx2_available(), "this CPU has no AVX2: the avx2 int8 GEMM cannot run");
      at::Tensor acc = at::empty({M, N}, xq.options().dtype(at::kInt));
      cpu::int8::gemm_avx2(xq.const_data_ptr<int8_t>(), M, K, weight.const_data_ptr<int8_t>(), N,
                           acc.data_ptr<int32_t>());
      return acc;
    }
    default:
      // torch._int_mm runs oneDNN where it has it, which returns garbage for K = 1 on some hosts
      // (seen with AMX): so few features are summed in int32 by at::mm instead.
      if (K < kOneDnnMinK) return at::mm(xq.to(at::kInt), weight.to(at::kInt).t());
      return at::_int_mm(xq, weight.t());
  }
}

// The outlier side product's factors over the flagged columns: dyn_x [M, D] (the outlier elements
// of x, fp32) and dyn_w [D, N] (the int8 weight's columns there, fp32), or nothing when none is.
std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> outlier_factors(
    const at::Tensor& x, const at::Tensor& col_flags, const at::Tensor& weight, float threshold) {
  if (!(threshold > 0)) return {};
  const at::Tensor flags = col_flags.contiguous();
  const uint8_t* f = flags.const_data_ptr<uint8_t>();
  if (std::none_of(f, f + flags.numel(), [](uint8_t v) { return v != 0; })) return {};
  const at::Tensor cols = col_flags.nonzero().flatten();
  const at::Tensor dyn_x = x.index_select(1, cols).to(at::kFloat);
  // Gathering weight columns reads one byte per row of the weight; outlier features are the same
  // from call to call in practice, so the last gathered columns of each weight are kept.
  static PerWeight<std::pair<at::Tensor, at::Tensor>> kept;
  const auto [kept_cols, dyn_w] = kept.get(
      weight, [&](const at::Tensor& w) { return std::pair{cols, w.t().index_select(0, cols).to(at::kFloat)}; },
      [&](const std::pair<at::Tensor, at::Tensor>& v) { return at::equal(v.first, cols); });
  return {at::where(dyn_x.abs() >= threshold, dyn_x, 0.0), dyn_w};
}

// int8_epilogue_cpu(int8_gemm(xq, weight), ...), with the epilogue fused into the GEMM where it runs
// on AMX: each block of the accumulator is scaled and written out while it is in L1, so no [M, N]
// int32 accumulator is written, read back, or allocated (a fresh one costs a page fault per 4 KB).
at::Tensor gemm_epilogue(const at::Tensor& xq, const at::Tensor& weight, const at::Tensor& row_scale,
                         const at::Tensor& weight_scale_in, const std::optional<at::Tensor>& dyn_x_in,
                         const std::optional<at::Tensor>& dyn_w_in, const at::Tensor& x_static,
                         const at::Tensor& static_weight, const std::optional<at::Tensor>& bias_in) {
  const int64_t M = xq.size(0), K = xq.size(1), N = weight.size(0);
  if (M == 0 || N == 0 || K == 0 || auto_path(K) != GemmPath::kAmx) {
    return int8_epilogue_cpu(int8_gemm(xq, weight), row_scale, weight_scale_in, dyn_x_in, dyn_w_in, x_static,
                             static_weight, bias_in);
  }
  const at::Tensor packed = amx_weight(weight);
  at::Tensor y = at::empty({M, N}, x_static.options());
  const EpilogueInputs in(row_scale, weight_scale_in, dyn_x_in, dyn_w_in, x_static, static_weight);
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::zeros({N}, at::kFloat);
  const float* rs = in.row_scale.const_data_ptr<float>();
  const float* ws = in.weight_scale.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  const cpu::int8::Side dyn = in.dyn, stat = in.stat;
  dispatch_float_dtype(x_static.scalar_type(), "x", [&](auto type) {
    using T = typename decltype(type)::type;
    T* out = y.data_ptr<T>();
    const cpu::int8::AmxBlockFn finish = [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols, const int32_t* c,
                                             int64_t ldc) {
      cpu::int8::epilogue_block<T>(c, ldc, m0, rows, n0, cols, N, rs, ws, dyn, stat, b, out);
    };
    cpu::int8::gemm_amx(xq.const_data_ptr<int8_t>(), M, K, packed.const_data_ptr<int8_t>(), N, nullptr, &finish);
  });
  return y;
}

at::Tensor int8_matmul_cpu(const at::Tensor& x, const at::Tensor& xq, const at::Tensor& row_scale,
                           const at::Tensor& col_flags, const at::Tensor& x_static, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const at::Tensor& static_weight,
                           const std::optional<at::Tensor>& bias, double threshold) {
  int8_checks::check_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias);
  const auto [dyn_x, dyn_w] = outlier_factors(x, col_flags, weight, static_cast<float>(threshold));
  return gemm_epilogue(xq.contiguous(), weight.contiguous(), row_scale, weight_scale, dyn_x, dyn_w, x_static,
                       static_weight, bias);
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                           const at::Tensor& static_mask, const at::Tensor& static_idx,
                           const at::Tensor& static_weight, const std::optional<at::Tensor>& bias, double threshold) {
  int8_checks::check_weight(x, weight, weight_scale, static_weight, static_idx.size(0), bias);
  const auto [xq, row_scale, col_flags, x_static] = int8_prepass_cpu(x, static_mask, static_idx, threshold);
  const auto [dyn_x, dyn_w] = outlier_factors(x, col_flags, weight, static_cast<float>(threshold));
  return gemm_epilogue(xq, weight.contiguous(), row_scale, weight_scale, dyn_x, dyn_w, x_static, static_weight,
                       bias);
}

// lowbit::_int8_gemm(xq, weight, path): the GEMM alone, on a path (auto, onednn, avx2, int_mm).
at::Tensor int8_gemm_cpu(const at::Tensor& xq, const at::Tensor& weight, c10::string_view path) {
  TORCH_CHECK_TYPE(xq.scalar_type() == at::kChar && weight.scalar_type() == at::kChar, "xq and weight must be int8");
  TORCH_CHECK_VALUE(xq.dim() == 2 && weight.dim() == 2 && xq.size(1) == weight.size(1),
                    "xq [M, K] and weight [N, K] must share K, got ", xq.sizes(), " and ", weight.sizes());
  return int8_gemm(xq.contiguous(), weight.contiguous(), parse_path(std::string(path)));
}

at::Tensor int8_gemv_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& weight_scale_in,
                         const at::Tensor& static_idx, const at::Tensor& static_weight,
                         const std::optional<at::Tensor>& bias_in) {
  int8_checks::check_gemv(x_in, weight_in, weight_scale_in, static_idx, static_weight, bias_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), weight_scale = weight_scale_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor extra = static_product(x.index_select(1, static_idx.to(at::kLong)), static_weight);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  dispatch_float_dtype(x.scalar_type(), "x", [&](auto type) {
    using T = typename decltype(type)::type;
    cpu::int8::gemv<T>(x.const_data_ptr<T>(), M, K, weight.const_data_ptr<int8_t>(), N,
                       weight_scale.const_data_ptr<float>(), ptr_or_null<float>(extra), ptr_or_null<T>(bias),
                       y.data_ptr<T>());
  });
  return y;
}

}  // namespace

std::string cpu_int8_gemm_path() {
  switch (auto_path(kOneDnnMinK)) {
    case GemmPath::kAmx: return "amx";
    case GemmPath::kOneDnn: return "onednn";
    case GemmPath::kAvx2: return "avx2";
    default: return "int_mm";
  }
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_prepass", &int8_prepass_cpu);
  m.impl("_int8_epilogue", &int8_epilogue_cpu);
  m.impl("int8_gemv", &int8_gemv_cpu);
  m.impl("int8_matmul", &int8_matmul_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("_int8_gemm", &int8_gemm_cpu);
}

}  // namespace lowbit
