"""The CPU backend of ``lowbit::int8_matmul``: the int8 GEMM and the outlier side product's
factors, with what can be kept from call to call kept per weight tensor.

The GEMM runs in oneDNN's int8 kernels (``torch.ops.onednn.qlinear_pointwise``) with the weight
packed once: ``torch._int_mm`` re-packs the weight at every call, which costs more than the
multiplication itself for small batches. oneDNN wants unsigned activations, so xq goes in as
xq + 128 (its sign bit flipped) with a zero point of 128, and it returns the int32 accumulator as
fp32 (exactly the fp32 value the epilogue would convert it to). Where oneDNN's int8 ops are
missing or fail a first exactness check against ``torch._int_mm``, ``_int_mm`` runs.

The outlier side product needs the weight's columns at the flagged inputs; outlier features are
the same from call to call in practice, so the last gathered columns are kept too. What is kept
follows in-place changes of the weight (its version counter), not changes made through ``.data``.
"""

from __future__ import annotations

import functools
import weakref

import torch

from lowbit.reference.int8 import fp32_threshold

# Below this many input features the packed path is not worth it (and oneDNN mishandles K = 1).
_MIN_IN_FEATURES = 16


class _Kept:
    """What is derived from one weight tensor, valid while its version counter is unchanged.
    Each attribute is one tuple, replaced whole, so concurrent callers never mix two of them."""

    def __init__(self, weight: torch.Tensor):
        self.ref = weakref.ref(weight)
        self.version = _version(weight)
        self.packed = None  # (packed weight, unit scales, zero points)
        self.columns = None  # (the last flagged columns, the weight's columns there as fp32 [D, N])


def _version(weight: torch.Tensor) -> int:
    # Inference tensors keep no version counter; they cannot be changed outside inference mode.
    # Changes through ``.data`` bypass the counter and are not seen.
    return -1 if weight.is_inference() else weight._version


# id(weight) -> _Kept. Keyed by id, as tensors compare elementwise; an entry goes with its tensor.
_kept: dict[int, _Kept] = {}


def _kept_for(weight: torch.Tensor) -> _Kept:
    entry = _kept.get(id(weight))
    if entry is None or entry.ref() is not weight or entry.version != _version(weight):
        fresh = entry is None or entry.ref() is not weight
        entry = _Kept(weight)
        _kept[id(weight)] = entry
        if fresh:
            weakref.finalize(weight, _kept.pop, id(weight), None)
    return entry


def _pack(weight: torch.Tensor) -> tuple:
    n = weight.shape[0]
    return torch.ops.onednn.qlinear_prepack(weight, None), torch.ones(n), torch.zeros(n, dtype=torch.int64)


def _onednn_gemm(xq: torch.Tensor, packed: tuple) -> torch.Tensor:
    weight, scales, zero_points = packed
    shifted = xq.view(torch.uint8).bitwise_xor(0x80)  # int8 v -> uint8 v + 128
    return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, weight, scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether the packed oneDNN path exists here and agrees exactly with torch._int_mm."""
    try:
        with torch.inference_mode(False):
            g = torch.Generator().manual_seed(0)
            xq = torch.randint(-127, 128, (5, 96), generator=g, dtype=torch.int8)
            w = torch.randint(-127, 128, (7, 96), generator=g, dtype=torch.int8)
            return torch.equal(_onednn_gemm(xq, _pack(w)), torch._int_mm(xq, w.t()).float())
    except Exception:  # noqa: BLE001 - any failure means: use torch._int_mm
        return False


def int8_gemm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xq int8 [M, K] @ weight int8 [N, K]^T -> the exact accumulator [M, N], int32 or fp32."""
    m, k = xq.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32)
    if k >= _MIN_IN_FEATURES and onednn_available():
        entry = _kept_for(weight)
        packed = entry.packed
        if packed is None:
            packed = entry.packed = _pack(weight)
        return _onednn_gemm(xq, packed)
    return torch._int_mm(xq, weight.t())


def outlier_factors(x: torch.Tensor, col_flags: torch.Tensor, weight: torch.Tensor, threshold: float):
    """(dyn_x fp32 [M, D], dyn_w fp32 [D, N]) over the D flagged columns, or (None, None): the
    outlier elements of x and the int8 weight's columns there (not yet scaled by weight_scale)."""
    threshold = fp32_threshold(threshold)
    cols = col_flags.nonzero().flatten() if threshold > 0 else None
    if cols is None or cols.numel() == 0:
        return None, None
    dyn_x = x.index_select(1, cols).float()
    dyn_x = torch.where(dyn_x.abs() >= threshold, dyn_x, 0.0)
    entry = _kept_for(weight)
    columns = entry.columns
    if columns is None or not torch.equal(columns[0], cols):
        columns = entry.columns = (cols, weight.t().index_select(0, cols).float())  # gathers rows in parallel
    return dyn_x, columns[1]


def matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold):
    """``lowbit::int8_matmul`` on the CPU: oneDNN's GEMM, then the C++ epilogue."""
    dyn_x, dyn_w = outlier_factors(x, col_flags, weight, threshold)
    return torch.ops.lowbit._int8_epilogue_native(int8_gemm(xq, weight), row_scale, weight_scale, dyn_x, dyn_w,
                                                  x_static, static_weight, bias)
