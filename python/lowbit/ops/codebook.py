"""codebook: additive vector quantization in AQLM's layout (docs/formats.md, "codebook"; spec in
``lowbit.reference.codebook``).

Ops: ``codebook_matmul`` (y = x W^T + b straight from the codes), ``codebook_dequantize`` (W
itself, for the module's ``dequantize`` and large-batch fallbacks), and the encoder's hot loop
``_codebook_nearest`` (the nearest codeword of each group under per-element weights).
``codebook_matmul`` is differentiable with respect to x (the codes are frozen).
"""

from __future__ import annotations

import torch

from lowbit.ops._contract import define, op
from lowbit.reference import codebook as _ref

DTYPES = _ref.DTYPES
_TRITON = "lowbit.triton_kernels.codebook"
_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.uint8: "uint8",
          torch.int16: "int16"}


def _name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_devices(what: str, tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{what} must be on one device, got {sorted(map(str, devices))}")


def check_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int, int]:
    """Checks the stored form's three tensors against each other -> (out, in_groups, num_codebooks,
    group_size). Every configuration with kernels: 1 or 2 codebooks of 2^8 (uint8 codes) or 2^16
    (int16 codes) entries, groups of 4 or 8 input weights, one output row per group."""
    if codes.dtype not in (torch.uint8, torch.int16):
        raise TypeError(f"codes must be uint8 (8-bit codes) or int16 (16-bit codes), got {_name(codes.dtype)}")
    if codes.dim() != 3:
        raise ValueError(f"codes must be 3-D [out_features, in_groups, num_codebooks], got shape {list(codes.shape)}")
    out, groups, count = codes.shape
    if count not in _ref.NUM_CODEBOOKS:
        raise ValueError(f"codes' last dimension (num_codebooks) must be one of {_ref.NUM_CODEBOOKS}, got {count}")
    if codebooks.dtype not in _ref.CODEBOOK_DTYPES:
        raise TypeError(f"codebooks must be bfloat16, float16 or float32, got {_name(codebooks.dtype)}")
    nbits = 8 if codes.dtype == torch.uint8 else 16
    if codebooks.dim() != 4:
        raise ValueError(f"codebooks must be 4-D [num_codebooks, 2^nbits, out_group_size = 1, group_size], got shape "
                         f"{list(codebooks.shape)}")
    g = codebooks.shape[3]
    if g not in _ref.GROUP_SIZES:
        raise ValueError(f"codebooks' group_size (last dimension) must be one of {_ref.GROUP_SIZES}, got {g}")
    if codebooks.shape[2] != 1:
        raise ValueError(f"codebooks' out_group_size (dimension 2) must be 1, got {codebooks.shape[2]}")
    want = [count, 1 << nbits, 1, g]
    if list(codebooks.shape) != want:
        raise ValueError(f"codebooks must have shape {want} for {_name(codes.dtype)} codes of {count} codebook(s) "
                         f"({nbits}-bit codes index 2^{nbits} entries), got {list(codebooks.shape)}")
    if scales.dtype not in _ref.CODEBOOK_DTYPES:
        raise TypeError(f"scales must be bfloat16, float16 or float32, got {_name(scales.dtype)}")
    if list(scales.shape) != [out, 1, 1, 1]:
        raise ValueError(f"scales must have shape [{out}, 1, 1, 1] (one per output row of codes), got "
                         f"{list(scales.shape)}")
    return out, groups, count, g


def check_matmul(x, codes, codebooks, scales, bias) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {_name(x.dtype)}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_features], got shape {list(x.shape)}")
    out, groups, _, g = check_weight(codes, codebooks, scales)
    if x.shape[1] != groups * g:
        raise ValueError(f"x's last dimension must be in_groups * group_size = {groups} * {g} = {groups * g}, got "
                         f"{x.shape[1]}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must be {_name(x.dtype)} (x's dtype), got {_name(bias.dtype)}")
    if bias is not None and list(bias.shape) != [out]:
        raise ValueError(f"bias must have shape [{out}], got {list(bias.shape)}")
    _check_devices("x, codes, codebooks, scales and bias", (x, codes, codebooks, scales, bias))


def check_dequantize(codes, codebooks, scales, dtype) -> None:
    check_weight(codes, codebooks, scales)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    _check_devices("codes, codebooks and scales", (codes, codebooks, scales))


def check_nearest(points, weights, codebook) -> None:
    if points.dtype != torch.float32 or points.dim() != 2:
        raise TypeError(f"points must be a 2-D float32 tensor [P, g], got {_name(points.dtype)} of shape "
                        f"{list(points.shape)}")
    if codebook.dtype != torch.float32 or codebook.dim() != 2 or codebook.shape[1] != points.shape[1]:
        raise ValueError(f"codebook must be float32 [entries, {points.shape[1]}], got {_name(codebook.dtype)} of shape "
                         f"{list(codebook.shape)}")
    if codebook.shape[0] == 0 or codebook.shape[0] > 1 << 16:
        raise ValueError(f"codebook must have 1 to 65536 entries, got {codebook.shape[0]}")
    if weights is not None and (weights.dtype != torch.float32 or weights.shape != points.shape):
        raise ValueError(f"weights must be float32 of the points' shape {list(points.shape)}, got "
                         f"{_name(weights.dtype)} of shape {list(weights.shape)}")
    _check_devices("points, weights and codebook", (points, weights, codebook))


def _fake_matmul(x, codes, codebooks, scales, bias):
    check_matmul(x, codes, codebooks, scales, bias)
    return x.new_empty((x.shape[0], codes.shape[0]))


def _fake_dequantize(codes, codebooks, scales, dtype):
    check_dequantize(codes, codebooks, scales, dtype)
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * codebooks.shape[3]), dtype=dtype)


def _fake_nearest(points, weights, codebook):
    check_nearest(points, weights, codebook)
    return points.new_empty((points.shape[0],), dtype=torch.int32)


def _reference_matmul(x, codes, codebooks, scales, bias):
    check_matmul(x, codes, codebooks, scales, bias)
    return _ref.matmul(x, codes, codebooks, scales, bias)


def _reference_dequantize(codes, codebooks, scales, dtype):
    check_dequantize(codes, codebooks, scales, dtype)
    return _ref.dequantize(codes, codebooks, scales).to(dtype)


def _reference_nearest(points, weights, codebook):
    check_nearest(points, weights, codebook)
    return _ref.nearest(points, weights, codebook)


def _matmul_setup(ctx, inputs, output):
    x, codes, codebooks, scales = inputs[:4]
    ctx.save_for_backward(codes, codebooks, scales)
    ctx.dtype = x.dtype


def _matmul_backward(ctx, grad):
    weight = _ref.dequantize(*ctx.saved_tensors)
    return (grad.float() @ weight).to(ctx.dtype), None, None, None, None


_WEIGHT = "Tensor codes, Tensor codebooks, Tensor scales"
define("codebook_matmul", "(Tensor x, " + _WEIGHT + ", Tensor? bias) -> Tensor", fake=_fake_matmul,
       reference=_reference_matmul, triton=_TRITON, backward=(_matmul_setup, _matmul_backward))
define("codebook_dequantize", "(" + _WEIGHT + ", ScalarType dtype) -> Tensor", fake=_fake_dequantize,
       reference=_reference_dequantize, native=("cpu",), triton=_TRITON)
define("_codebook_nearest", "(Tensor points, Tensor? weights, Tensor codebook) -> Tensor", fake=_fake_nearest,
       reference=_reference_nearest, native=("cpu",), triton=_TRITON)


def _c(t):
    return None if t is None else t.contiguous()


def codebook_matmul(x, codes, codebooks, scales, bias=None, *, backend=None):
    """y = x W^T + bias straight from the codes: x [M, in] (bf16, fp16 or fp32) -> [M, out] of x's
    dtype. codes [out, in / g, C], codebooks [C, 2^B, 1, g], scales [out, 1, 1, 1]."""
    return op("codebook_matmul", backend, x.device)(*map(_c, (x, codes, codebooks, scales, bias)))


def codebook_dequantize(codes, codebooks, scales, dtype=torch.float32, *, backend=None):
    """The weight W [out, in] the codes stand for, in ``dtype`` (computed in fp32, one rounding)."""
    return op("codebook_dequantize", backend, codes.device)(*map(_c, (codes, codebooks, scales)), dtype)


def codebook_nearest(points, codebook, weights=None, *, backend=None):
    """For each row p of points [P, g] (fp32), the index (int32) of the codebook [E, g] row c
    minimizing sum_t weights[p, t] * (p_t - c_t)^2 (weights None: all ones); ties go to the lower
    index."""
    return op("_codebook_nearest", backend, points.device)(points.contiguous(), _c(weights), codebook.contiguous())
