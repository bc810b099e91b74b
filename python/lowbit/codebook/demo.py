"""The codebook section of ``lowbit demo``: a real layer encoded to 2 bits per weight (2x8, group
size 8), its error against scalar 2-bit rounding, and every backend checked against the reference."""

from __future__ import annotations

import time

import torch

import lowbit
from lowbit.demo import median_seconds, model_weights
from lowbit.evaluation import rtn


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return (10 * torch.log10(w.square().sum() / (w - approx.double()).square().sum())).item()


def demo(device: torch.device) -> bool:
    """Encode a layer to 2x8 codebooks; compare its error with 2-bit RTN; check every backend of
    the product against the reference; time it against the dense layer."""
    source, weights = model_weights()
    name, w = max(weights.items(), key=lambda item: item[1].numel())
    print(f"\ncodebook: 2-bit additive vector quantization (2x8, group 8) of {source} {name} {list(w.shape)}")
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    start = time.perf_counter()
    module = lowbit.nn.CodebookLinear.from_linear(linear)
    seconds = time.perf_counter() - start
    ours = sqnr_db(linear.weight, module.dequantize().cpu())
    base = sqnr_db(linear.weight, rtn(linear.weight, 2, 64))
    print(f"  encoded in {seconds:.1f} s; {module.bits_per_weight():.2f} bits/weight, SQNR {ours:.2f} dB; "
          f"2-bit RTN, group 64 (2.5 bits/weight): {base:.2f} dB")
    ok = ours > base
    module, linear = module.to(device), linear.to(device)
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(device)
    args = (module.codes, module.codebooks, module.scales, module.bias)
    for backend, why in lowbit.backend.available(device).items():
        if why is not None or backend == "reference":
            continue
        for rows in ((1, 16) if backend == "triton" and device.type == "cpu" else (1, 16, 64)):
            want = lowbit.ops.codebook_matmul(x[:rows], *args, backend="reference")
            got = lowbit.ops.codebook_matmul(x[:rows], *args, backend=backend)
            same = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())
            ok &= same
            note = ""
            if not (backend == "triton" and device.type == "cpu"):
                module.backend = backend
                t_ours = median_seconds(lambda: module(x[:rows]), device)
                t_dense = median_seconds(lambda: linear(x[:rows]), device)
                note = f"{t_ours * 1e3:.3f} ms, {t_dense / t_ours:.2f}x bf16 F.linear"
            print(f"  {backend:<10} {rows:>3} rows  matches the reference: {'yes' if same else 'NO'}  {note}")
    return ok
