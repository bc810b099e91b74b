"""xq @ weight^T on CPU for ``lowbit::int8_matmul``'s cpu backend.

oneDNN's int8 kernels (``torch.ops.onednn.qlinear_pointwise``) with the weight packed once and kept
while the weight tensor lives: ``torch._int_mm`` re-packs the weight at every call, which costs
more than the multiplication itself for small batches. oneDNN wants unsigned activations, so xq
goes in as xq + 128 (its sign bit flipped) with a zero point of 128, and it returns the int32
accumulator as fp32 (exactly the fp32 value the epilogue would convert it to). Where oneDNN's
int8 ops are missing or fail a first exactness check against ``torch._int_mm``, ``_int_mm`` runs.
"""

from __future__ import annotations

import functools
import weakref

import torch

# Below this many input features the packed path is not worth it (and oneDNN mishandles K = 1).
_MIN_IN_FEATURES = 16

# id(weight) -> (weak reference to it, its version counter when packed, packed weight, unit scales,
# zero points). Keyed by id, as tensors compare elementwise; an entry goes when its tensor does.
_packed: dict[int, tuple] = {}


def _pack(weight: torch.Tensor):
    entry = _packed.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _packed.pop, id(weight), None)
        n = weight.shape[0]
        entry = (weakref.ref(weight), weight._version, torch.ops.onednn.qlinear_prepack(weight, None),
                 torch.ones(n), torch.zeros(n, dtype=torch.int64))
        _packed[id(weight)] = entry
    return entry[2:]


def _onednn_gemm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    packed, scales, zero_points = _pack(weight)
    shifted = xq.view(torch.uint8).bitwise_xor(0x80)  # int8 v -> uint8 v + 128
    return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, packed, scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether the packed oneDNN path exists here and agrees exactly with torch._int_mm."""
    try:
        g = torch.Generator().manual_seed(0)
        xq = torch.randint(-127, 128, (5, 96), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (7, 96), generator=g, dtype=torch.int8)
        return torch.equal(_onednn_gemm(xq, w), torch._int_mm(xq, w.t()).float())
    except Exception:  # noqa: BLE001 - any failure means: use torch._int_mm
        return False


def int8_gemm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xq int8 [M, K] @ weight int8 [N, K]^T -> the exact accumulator [M, N], int32 or fp32."""
    m, k = xq.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32)
    if k >= _MIN_IN_FEATURES and onednn_available():
        return _onednn_gemm(xq, weight)
    return torch._int_mm(xq, weight.t())
