"""Reference of the int8 family (LLM.int8() decomposition): the spec of its encoder and its ops.

A layer y = x W^T + b is stored as (docs/formats.md, "int8"):

- ``weight`` int8 [out, in]: round(W * (127 / absmax)[:, None]), zero in the static columns;
- ``weight_scale`` fp32 [out]: absmax of each row of W over the non-static columns, / 127;
- ``static_idx`` int32 [S] (sorted) and ``static_weight`` [out, S] (16-bit): the input columns
  chosen as outlier features ahead of time (from calibration inputs), whose weight columns are kept
  exactly as they were;
- ``bias`` and ``threshold``.

At run time, the input x [M, in] is split element by element. With t = threshold (t <= 0 turns
the dynamic split off), an element x[m, k] of a non-static column is an *outlier* when
|x[m, k]| >= t, compared in fp32 (t rounded to fp32, not to x's dtype; a t that rounds to 0 is off). Then

    x = x_int + x_dyn + x_static     (disjoint supports)
    x_int     the other elements, quantized per row: row_scale[m] = max |x_int[m, :]| / 127,
              xq = round_half_even(x_int * (127 / max)), an int8 in [-127, 127]
    x_dyn     the outlier elements, multiplied in 16-bit with the dequantized int8 weight
    x_static  the static columns, multiplied with the kept 16-bit weight columns

    y = (xq @ weight^T) * row_scale[:, None] * weight_scale[None, :]      (int32 accumulation)
      + (x_dyn @ weight^T) * weight_scale[None, :]                         (fp32 accumulation)
      + x_static @ static_weight^T + bias                                   (fp32 accumulation)

The split is per element, not per column as in bitsandbytes (which sends a whole column to 16-bit
when any row has an outlier in it): that is what lets one pass over x, with no host
synchronization, produce everything the GEMM needs. ``col_flags[k] = 1`` marks the columns that
hold an outlier element, so kernels can skip the 16-bit side product where there is none.

A row holding NaN gets a NaN scale, so its whole output row is NaN (as nn.Linear gives); other
rows are unaffected. Inf is an outlier (when t > 0) and reaches the output through x_dyn.

Small batches use a weight-only path instead (``gemv``): y = (x @ weight^T) * weight_scale +
x_static @ static_weight^T + bias, activations kept in 16-bit, reading half the bytes of bf16.
"""

from __future__ import annotations

import torch

QMAX = 127
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _round_to_int8(v: torch.Tensor) -> torch.Tensor:
    """round half to even, clamped to [-127, 127]; NaN (from a NaN or Inf scale) becomes 0."""
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.round(v).clamp_(-QMAX, QMAX).to(torch.int8)


def _inverse_scale(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax as one fp32 division (``127 / tensor`` in PyTorch multiplies by a reciprocal,
    and so does ``tensor / 127`` on CUDA; both round differently)."""
    return torch.full_like(absmax, QMAX) / absmax


def quantize_weight(weight: torch.Tensor, static_idx: torch.Tensor | None = None):
    """W [out, in] -> (weight int8 [out, in], weight_scale fp32 [out], static_weight [out, S]).

    ``static_idx``: int [S] of input columns kept in 16-bit (may be empty or None). Rows are
    independent; they are quantized in chunks of about 1M weights so that the fp32 temporaries
    stay small next to the layer (whole models are converted layer by layer).
    """
    out_features, in_features = weight.shape
    static = static_mask(static_idx, in_features, weight.device)
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    chunk = max(1, (1 << 20) // max(1, in_features))
    for start in range(0, out_features, chunk):
        w_int = weight.detach()[start:start + chunk].float().masked_fill(static, 0.0)
        absmax = w_int.abs().amax(dim=1) if in_features else w_int.new_zeros(w_int.shape[0])
        scale[start:start + chunk] = absmax / torch.full_like(absmax, QMAX)  # a true division on every device
        q[start:start + chunk] = _round_to_int8(w_int.mul_(_inverse_scale(absmax)[:, None]))
    idx = _index(static_idx, weight.device)
    return q, scale, weight.detach()[:, idx].clone()


def static_mask(static_idx: torch.Tensor | None, in_features: int, device) -> torch.Tensor:
    """bool [in]: True at the static columns."""
    mask = torch.zeros(in_features, dtype=torch.bool, device=device)
    if static_idx is not None and static_idx.numel():
        mask[static_idx.long()] = True
    return mask


def _index(static_idx: torch.Tensor | None, device) -> torch.Tensor:
    if static_idx is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return static_idx.to(device=device, dtype=torch.long)


def fp32_threshold(threshold: float) -> float:
    """The threshold as every backend uses it: rounded to fp32 (NaN turns the split off too)."""
    t = torch.tensor(threshold, dtype=torch.float32).item()
    return t if t > 0 else 0.0


def _outliers(x: torch.Tensor, static_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [M, K]: the outlier elements (non-static columns, |x| >= threshold when threshold > 0)."""
    threshold = fp32_threshold(threshold)
    if threshold <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return (x.float().abs() >= threshold) & ~static_mask.bool()[None, :]  # in fp32, as the kernels


def prepass(x: torch.Tensor, static_mask: torch.Tensor, static_idx: torch.Tensor, threshold: float):
    """The activation pre-pass: x [M, K] -> (xq int8 [M, K], row_scale fp32 [M], col_flags uint8 [K],
    x_static [M, S] of x.dtype).

    ``static_mask`` uint8 [K] (1 at the static columns) and ``static_idx`` int32 [S] name the same
    columns.
    """
    xf = x.float()
    outlier = _outliers(x, static_mask, threshold)
    x_int = xf.masked_fill(outlier | static_mask.bool()[None, :], 0.0)
    absmax = x_int.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(x.shape[0])
    row_scale = absmax / torch.full_like(absmax, QMAX)
    xq = _round_to_int8(x_int * _inverse_scale(absmax)[:, None])
    col_flags = outlier.any(dim=0).to(torch.uint8)
    return xq, row_scale, col_flags, x[:, static_idx.long()].clone()


def matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold):
    """The int8 GEMM with its epilogue: y [M, out] of x.dtype from the pre-pass outputs and x itself
    (whose outlier elements it reads). ``static_weight`` [out, S]; ``bias`` [out] or None."""
    # The outlier elements lie in the flagged columns (never static ones: x_static carries those).
    threshold = fp32_threshold(threshold)
    if threshold > 0:
        outlier = (x.float().abs() >= threshold) & col_flags.bool()[None, :]
    else:
        outlier = torch.zeros_like(x, dtype=torch.bool)
    x_dyn = x.float().masked_fill(~outlier, 0.0)
    acc = xq.double() @ weight.double().T  # exact, as int32: |acc| <= 127 * 127 * K < 2^31
    w = weight.float()
    y = acc.float() * row_scale[:, None] * weight_scale[None, :]
    y = y + (x_dyn @ w.T) * weight_scale[None, :]
    y = y + x_static.float() @ static_weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv(x, weight, weight_scale, static_idx, static_weight, bias):
    """Weight-only path: y = (x @ weight^T) * weight_scale + x[:, static] @ static_weight^T + bias,
    fp32 accumulation, activations not quantized."""
    y = (x.float() @ weight.float().T) * weight_scale[None, :]
    y = y + x[:, static_idx.long()].float() @ static_weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold):
    """The whole decomposed product: pre-pass then GEMM."""
    xq, row_scale, col_flags, x_static = prepass(x, static_mask, static_idx, threshold)
    return matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold)


def dequantize(weight, weight_scale, static_idx, static_weight, dtype=torch.float32):
    """The weight the layer stands for: weight * weight_scale per row, with the static columns
    put back as they were kept. -> [out, in] of ``dtype``."""
    w = weight.float() * weight_scale[:, None]
    if static_idx.numel():
        w[:, static_idx.long()] = static_weight.float()
    return w.to(dtype)
