"""Reference of the codebook family (additive vector quantization, AQLM's layout): the spec of its
ops. The encoder that makes the codes is ``lowbit.codebook.encoder``.

A weight W [out, in] is cut into groups of g consecutive input weights (g = ``group_size``, 4 or
8); each group is stored as C codes of B bits (C = ``num_codebooks``, B = ``nbits``), and its value
is the sum of the C codewords the codes name (one from each of C codebooks of 2^B vectors of
length g), times one scale per output row (docs/formats.md, "codebook"):

- ``codes`` [out, in / g, C]: uint8 for B = 8; int16 for B = 16, read as unsigned
  (``code & 0xFFFF``: AQLM stores 16-bit codes in int16, two's complement);
- ``codebooks`` [C, 2^B, 1, g]: bf16, fp16 or fp32 (AQLM: fp16);
- ``scales`` [out, 1, 1, 1]: bf16, fp16 or fp32;
- ``bias`` [out] or None.

    W[n, j*g + t] = scales[n] * (codebooks[0, code(n, j, 0), 0, t] + ... + codebooks[C-1, ...])

every term converted to fp32 and summed in fp32, in codebook order, then scaled; and

    y = x W^T + bias        (fp32 accumulation, one rounding to x's dtype at the end)

which is AQLM's formula (its ``_dequantize_weight`` then ``F.linear``). Kernels may sum in any
order (a lookup table of x-dot-codeword products, dequantized tiles): they match this within an
fp32 accumulation bound.
"""

from __future__ import annotations

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODEBOOK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The configurations with kernels: num_codebooks, nbits and group_size each from these.
NUM_CODEBOOKS = (1, 2)
NBITS = (8, 16)
GROUP_SIZES = (4, 8)
CODE_DTYPES = {8: torch.uint8, 16: torch.int16}


def code_indices(codes: torch.Tensor) -> torch.Tensor:
    """codes (uint8, or int16 read as unsigned) -> int64 indices into a codebook."""
    if codes.dtype == torch.int16:
        return codes.to(torch.int64) & 0xFFFF
    return codes.to(torch.int64)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight the stored form stands for: fp32 [out, in_groups * g].

    codes [out, in_groups, C], codebooks [C, 2^B, 1, g], scales [out, 1, 1, 1]."""
    out, groups, count = codes.shape
    g = codebooks.shape[-1]
    idx = code_indices(codes)
    total = torch.zeros(out, groups, g, dtype=torch.float32, device=codes.device)
    for c in range(count):  # codebook order: the fp32 sum is the spec's
        total = total + codebooks[c, :, 0, :].float()[idx[:, :, c]]
    return (total * scales.reshape(out, 1, 1).float()).reshape(out, groups * g)


def matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias with W = dequantize(codes, codebooks, scales): x [M, in] -> [M, out] of x's
    dtype, accumulated in fp32."""
    y = x.float() @ dequantize(codes, codebooks, scales).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def nearest(points: torch.Tensor, weights: torch.Tensor | None, codebook: torch.Tensor) -> torch.Tensor:
    """The encoder's search: for each row p of points [P, g] (fp32), the index (int32) of the row c
    of codebook [E, g] with the least sum_t weights[p, t] * (p_t - c_t)^2 (weights None: ones),
    evaluated in fp64; ties go to the lower index. Kernels evaluate it in fp32, so between entries
    closer than fp32 rounding they may choose either."""
    out = torch.empty(points.shape[0], dtype=torch.int32, device=points.device)
    book = codebook.double()
    chunk = max(1, (1 << 22) // max(1, codebook.numel()))  # [chunk, E, g] fp64 stays near 32 MB
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk].double()
        w = torch.ones_like(p) if weights is None else weights[start:start + chunk].double()
        d = (w[:, None, :] * (p[:, None, :] - book[None, :, :]).square()).sum(-1)
        out[start:start + chunk] = d.argmin(1).to(torch.int32)  # argmin returns the first minimum
    return out
