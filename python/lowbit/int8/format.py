"""The int8 stored form and its encoder (docs/formats.md, "int8")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.reference import int8 as _ref


@dataclass
class Int8Weight:
    """A quantized weight: ``weight`` int8 [out, in], ``weight_scale`` fp32 [out], ``static_idx``
    int32 [S], ``static_weight`` [out, S] (16-bit, the kept columns)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    static_idx: torch.Tensor
    static_weight: torch.Tensor


def static_columns(calibration: torch.Tensor | list[torch.Tensor], threshold: float,
                   max_columns: int | None = None) -> torch.Tensor:
    """The input columns to keep in 16-bit: those where some calibration row reaches ``threshold``
    (the columns LLM.int8() would send to 16-bit for these inputs), at most ``max_columns`` of them
    (the largest first). Returns sorted int32 column indices.

    calibration: a tensor [..., in_features] (or a list of them) of sample inputs to the layer.
    """
    parts = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    if not parts:
        raise ValueError("calibration must hold at least one tensor")
    in_features = parts[0].shape[-1]
    peak = torch.zeros(in_features, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        if part.shape[-1] != in_features:
            raise ValueError(f"calibration tensors must share their last dimension ({in_features}), "
                             f"got {list(part.shape)}")
        if part.numel():
            peak = torch.maximum(peak, part.detach().reshape(-1, in_features).float().abs().nan_to_num(0.0).amax(0))
    if threshold <= 0:
        return torch.zeros(0, dtype=torch.int32)
    cols = (peak >= threshold).nonzero().flatten()
    if max_columns is not None and cols.numel() > max_columns:
        cols = cols[peak[cols].argsort(descending=True)[:max_columns]]
    return cols.sort().values.to(torch.int32).cpu()


def quantize_linear(weight: torch.Tensor, static_idx: torch.Tensor | None = None) -> Int8Weight:
    """Quantize W [out, in] (bf16, fp16 or fp32): per-row absmax int8 over the non-static columns,
    the static columns kept as they are."""
    if not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, got {weight.dtype} of shape {list(weight.shape)}")
    idx = torch.zeros(0, dtype=torch.int32) if static_idx is None else torch.as_tensor(static_idx)
    idx = idx.to(device=weight.device, dtype=torch.int32).flatten()
    if idx.numel():
        if idx.min() < 0 or idx.max() >= weight.shape[1]:
            raise ValueError(f"static columns must lie in [0, {weight.shape[1]}), got {idx.tolist()}")
        idx = idx.unique(sorted=True).to(torch.int32)
    q, scale, kept = _ref.quantize_weight(weight, idx)
    return Int8Weight(q, scale, idx, kept)
