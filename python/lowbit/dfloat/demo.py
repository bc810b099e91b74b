"""The dfloat section of ``lowbit demo``: a model's weights compressed losslessly, decoded on every
backend and compared bit for bit, and ``DFloatLinear`` in place of ``nn.Linear``."""

from __future__ import annotations

import torch

import lowbit
from lowbit.demo import model_weights


def demo(device: torch.device) -> bool:
    """Compress a model's weights losslessly; decode them on every backend; run DFloatLinear."""
    source, weights = model_weights()
    print(f"\ndfloat: lossless compression of {source}, {len(weights)} weight matrices")
    print(f"  {'dtype':<8} {'weights':>11} {'bits/weight':>12} {'bound':>7} {'of 16/32 bit':>13}  exact on")
    ok = True
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tensors = [w.to(dtype).to(device) for w in weights.values()]
        numel = sum(t.numel() for t in tensors)
        compressed = [lowbit.dfloat.compress(t) for t in tensors]
        bits = sum(8 * c.nbytes for c in compressed) / numel
        bound = sum(lowbit.dfloat.entropy_bound(t)["exponent"] * t.numel() for t in tensors) / numel
        exact_on = []
        for backend, why in lowbit.backend.available(device).items():
            if why is not None or backend not in lowbit.backend.implementations("dfloat_decode"):
                continue
            pairs = list(zip(tensors, compressed))
            if backend == "reference" or (backend == "triton" and device.type == "cpu"):
                # Slow here (plain PyTorch, Triton's interpreter): check a slice of one matrix.
                piece = tensors[0][:16]
                pairs = [(piece, lowbit.dfloat.compress(piece))]
            exact = all(torch.equal(c.decompress(backend=backend).view(torch.uint8), t.view(torch.uint8))
                        for t, c in pairs)
            ok &= exact
            exact_on.append(backend + ("" if exact else " (MISMATCH)"))
        width = tensors[0].element_size() * 8
        print(f"  {str(dtype)[6:]:<8} {numel:>11,} {bits:>12.3f} {bound:>7.3f} {bits / width:>13.1%}  "
              + ", ".join(exact_on))
    name, w = next(iter(weights.items()))
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(torch.bfloat16).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    module = lowbit.nn.DFloatLinear.from_linear(linear)
    x = torch.randn(4, w.shape[1], device=device).to(torch.bfloat16)
    same = torch.equal(module(x), linear(x))
    ok &= same
    print(f"  DFloatLinear in place of nn.Linear ({name}, bf16, batch 4): output "
          + ("bit-identical" if same else "DIFFERENT"))
    return ok
