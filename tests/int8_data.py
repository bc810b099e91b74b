"""Inputs and baselines for the int8 tests and benchmarks.

``bnb_int8_linear`` re-implements bitsandbytes' LLM.int8() algorithm (Linear8bitLt, fp16): whole
columns holding an outlier go to 16-bit, multiplied with the weight *dequantized from int8*; the
rest is quantized per row with the absmax over the non-outlier columns. ``per_token_int8_linear``
is plain W8A8 without the decomposition.
"""

from __future__ import annotations

import torch


def _row_quantize(t: torch.Tensor):
    absmax = t.abs().amax(dim=1, keepdim=True)
    q = torch.round(t * (127.0 / absmax)).nan_to_num(0.0).clamp(-127, 127)
    return q, absmax


def bnb_int8_linear(x: torch.Tensor, w: torch.Tensor, bias=None, threshold: float = 6.0) -> torch.Tensor:
    """-> [M, out] in x's dtype (bitsandbytes computes in fp16 and returns the input's dtype)."""
    dtype = x.dtype
    x, w = x.half().float(), w.half().float()
    wq, w_absmax = _row_quantize(w)
    cols = (x.abs() >= threshold).any(dim=0) if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    xq, x_absmax = _row_quantize(x.masked_fill(cols[None, :], 0.0))
    y = (xq @ wq.T) * (x_absmax * w_absmax.T) / (127.0 * 127.0)
    w_deq = (wq * w_absmax / 127.0).half().float()
    y = y + x[:, cols] @ w_deq[:, cols].T
    if bias is not None:
        y = y + bias.float()
    return y.half().to(dtype)


def per_token_int8_linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    return bnb_int8_linear(x, w, bias, threshold=0.0)


def outlier_activations(rows: int, in_features: int, *, columns: int = 6, scale: float = 25.0, seed: int = 0,
                        dtype=torch.bfloat16, steady: bool = False) -> torch.Tensor:
    """Activations like an LLM's: N(0, 1) with a few outlier feature columns whose magnitude is
    around ``scale``: N(0, 1) times scale * U(0.5, 1.5), so that some of their elements fall below
    the threshold; or with ``steady=True`` +-scale * U(0.5, 1.5), every element large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    cols = torch.randperm(in_features, generator=torch.Generator().manual_seed(1234))[:columns]
    size = scale * (0.5 + torch.rand(rows, columns, generator=g))
    x[:, cols] = size * (x[:, cols].sign() if steady else x[:, cols])
    return x.to(dtype)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()
