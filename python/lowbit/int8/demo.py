"""The int8 section of ``lowbit demo``: a layer converted to ``Int8Linear`` with and without
calibration, every backend of the decomposed product checked against the reference."""

from __future__ import annotations

import torch

import lowbit
from lowbit.demo import median_seconds, model_weights


def demo(device: torch.device) -> bool:
    """Convert a layer to Int8Linear with and without calibration; check every backend of the
    decomposed product against the reference; time it against bf16 F.linear."""
    source, weights = model_weights()
    name, w = max(weights.items(), key=lambda item: item[1].numel())
    print(f"\nint8: LLM.int8() on {source} {name} {list(w.shape)}, bf16 inputs with 4 outlier features")
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        x = torch.randn(rows, w.shape[1], generator=g)
        x[:, :4] *= 30.0  # outlier features, as large language models have
        return x.to(torch.bfloat16).to(device)

    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(torch.bfloat16).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    x = inputs(256)
    exact = x.float() @ linear.weight.float().T + linear.bias.float()

    def error(y):
        return ((y.float() - exact).norm() / exact.norm()).item()

    plain = lowbit.nn.Int8Linear.from_linear(linear)
    calibrated = lowbit.nn.Int8Linear.from_linear(linear, calibration=inputs(64))
    print(f"  relative error: bf16 F.linear {error(linear(x)):.4f}, Int8Linear {error(plain(x)):.4f}, "
          f"calibrated ({calibrated.static_idx.numel()} static columns) {error(calibrated(x)):.4f}")
    args = (calibrated.weight, calibrated.weight_scale, calibrated.static_mask, calibrated.static_idx,
            calibrated.static_weight, calibrated.bias, 6.0)
    ok = True
    for backend, why in lowbit.backend.available(device).items():
        if why is not None or backend == "reference":
            continue
        rows = x[:16] if backend == "triton" and device.type == "cpu" else x  # the interpreter is slow
        want = lowbit.ops.int8_linear(rows, *args, backend="reference")
        got = lowbit.ops.int8_linear(rows, *args, backend=backend)
        same = torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
        ok &= same
        note = "" if rows is not x else _timing(calibrated, linear, x, device)
        print(f"  {backend:<10} matches the reference: {'yes' if same else 'NO'}  {note}")
    return ok


def _timing(module, linear, x, device) -> str:
    """Ours against the device's fastest dense path: bf16 F.linear, and on the CPU fp32 too (faster
    there without native bf16 instructions)."""
    ours = median_seconds(lambda: module(x), device)
    dense = {"bf16": median_seconds(lambda: linear(x), device)}
    if device.type == "cpu":
        linear32, x32 = torch.nn.Linear(linear.in_features, linear.out_features), x.float()
        with torch.no_grad():
            linear32.weight.copy_(linear.weight.float())
            linear32.bias.copy_(linear.bias.float())
        dense["fp32"] = median_seconds(lambda: linear32(x32), device)
    name, best = min(dense.items(), key=lambda item: item[1])
    others = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in dense.items())
    return f"{ours * 1e3:.3f} ms ({best / ours:.2f}x the fastest dense, {name} F.linear; {others})"
