"""int8: LLM.int8() decomposition (docs/formats.md, "int8"; spec in ``lowbit.reference.int8``).

Ops: ``int8_prepass`` (the activation pre-pass), ``int8_matmul`` (int8 GEMM + fused epilogue),
``int8_linear`` (the two together), ``int8_gemv`` (weight-only product for small batches), and
the CPU GEMM's private epilogue ``_int8_epilogue``. ``int8_linear`` and ``int8_gemv`` are
differentiable with respect to x (the weight is frozen), so adapters can train on top.
"""

from __future__ import annotations

import torch

from lowbit.ops._contract import define, op
from lowbit.reference import int8 as _ref

DTYPES = _ref.DTYPES
# The int32 accumulator holds any sum of in_features products of two int8 in [-127, 127].
MAX_IN_FEATURES = (2**31 - 1) // (127 * 127)
_TRITON = "lowbit.triton_kernels.int8"


def _check_devices(what: str, tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{what} must be on one device, got {sorted(map(str, devices))}")


def _check_tensor(name: str, t: torch.Tensor, dtypes, shape) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_x(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_features], got shape {list(x.shape)}")
    if x.shape[1] > MAX_IN_FEATURES:
        raise ValueError(f"in_features must be at most {MAX_IN_FEATURES} (int32 accumulation), got {x.shape[1]}")


def _check_static_idx(static_idx) -> None:
    if static_idx.dtype != torch.int32 or static_idx.dim() != 1:
        raise TypeError(f"static_idx must be a 1-D int32 tensor, got {static_idx.dtype} of shape "
                        f"{list(static_idx.shape)}")


def _check_static(x, static_mask, static_idx) -> None:
    _check_tensor("static_mask", static_mask, (torch.uint8,), [x.shape[1]])
    _check_static_idx(static_idx)


def _check_weight(x, weight, weight_scale, static_weight, bias, static_count: int) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be int8 [out_features, {x.shape[1]}], got {weight.dtype} of shape "
                         f"{list(weight.shape)}")
    out_features = weight.shape[0]
    _check_tensor("weight_scale", weight_scale, (torch.float32,), [out_features])
    _check_tensor("static_weight", static_weight, (x.dtype,), [out_features, static_count])
    if bias is not None:
        _check_tensor("bias", bias, (x.dtype,), [out_features])


def check_prepass(x, static_mask, static_idx, threshold):
    check_x(x)
    _check_static(x, static_mask, static_idx)
    _check_devices("x, static_mask and static_idx", (x, static_mask, static_idx))


def check_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold):
    check_x(x)
    m, k = x.shape
    _check_tensor("xq", xq, (torch.int8,), [m, k])
    _check_tensor("row_scale", row_scale, (torch.float32,), [m])
    _check_tensor("col_flags", col_flags, (torch.uint8,), [k])
    if x_static.dtype != x.dtype or x_static.dim() != 2 or x_static.shape[0] != m:
        raise ValueError(f"x_static must be {x.dtype} [{m}, S], got {x_static.dtype} of shape {list(x_static.shape)}")
    _check_weight(x, weight, weight_scale, static_weight, bias, x_static.shape[1])
    _check_devices("x, the pre-pass outputs and the weight's tensors",
                   (x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias))


def check_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold):
    check_x(x)
    _check_static(x, static_mask, static_idx)
    _check_weight(x, weight, weight_scale, static_weight, bias, static_idx.shape[0])
    _check_devices("x and the weight's tensors", (x, weight, weight_scale, static_mask, static_idx, static_weight, bias))


def check_gemv(x, weight, weight_scale, static_idx, static_weight, bias):
    check_x(x)
    _check_static_idx(static_idx)
    _check_weight(x, weight, weight_scale, static_weight, bias, static_idx.shape[0])
    _check_devices("x and the weight's tensors", (x, weight, weight_scale, static_idx, static_weight, bias))


def _fake_prepass(x, static_mask, static_idx, threshold):
    check_prepass(x, static_mask, static_idx, threshold)
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((k,), dtype=torch.uint8), x.new_empty((m, static_idx.shape[0])))


def _fake_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold):
    check_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold):
    check_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_gemv(x, weight, weight_scale, static_idx, static_weight, bias):
    check_gemv(x, weight, weight_scale, static_idx, static_weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _checked(check, fn):
    def run(*args):
        check(*args)
        return fn(*args)
    return run


# Backward with respect to x through the dequantized weight (straight through the quantization of
# x, as bitsandbytes does); the weight, scales and bias are frozen.
def _linear_setup(ctx, inputs, output):
    x, weight, weight_scale, _, static_idx, static_weight = inputs[:6]
    ctx.save_for_backward(weight, weight_scale, static_idx, static_weight)
    ctx.dtype = x.dtype


def _gemv_setup(ctx, inputs, output):
    x, weight, weight_scale, static_idx, static_weight = inputs[:5]
    ctx.save_for_backward(weight, weight_scale, static_idx, static_weight)
    ctx.dtype = x.dtype


def _grad_x(ctx, grad):
    return (grad.float() @ _ref.dequantize(*ctx.saved_tensors)).to(ctx.dtype)


def _linear_backward(ctx, grad):
    return (_grad_x(ctx, grad),) + (None,) * 7


def _gemv_backward(ctx, grad):
    return (_grad_x(ctx, grad),) + (None,) * 5


_WEIGHT = "Tensor weight, Tensor weight_scale"
define("int8_prepass", "(Tensor x, Tensor static_mask, Tensor static_idx, float threshold) -> "
       "(Tensor xq, Tensor row_scale, Tensor col_flags, Tensor x_static)",
       fake=_fake_prepass, reference=_checked(check_prepass, _ref.prepass), triton=_TRITON)
# The GEMM has no CUDA kernel: on GPUs auto picks the Triton one.
define("int8_matmul", "(Tensor x, Tensor xq, Tensor row_scale, Tensor col_flags, Tensor x_static, " + _WEIGHT
       + ", Tensor static_weight, Tensor? bias, float threshold) -> Tensor",
       fake=_fake_matmul, reference=_checked(check_matmul, _ref.matmul), native=("cpu",), triton=_TRITON)
define("int8_linear", "(Tensor x, " + _WEIGHT + ", Tensor static_mask, Tensor static_idx, Tensor static_weight, "
       "Tensor? bias, float threshold) -> Tensor",
       fake=_fake_linear, reference=_checked(check_linear, _ref.linear), native=("cpu",), triton=_TRITON,
       backward=(_linear_setup, _linear_backward))
define("int8_gemv", "(Tensor x, " + _WEIGHT + ", Tensor static_idx, Tensor static_weight, Tensor? bias) -> Tensor",
       fake=_fake_gemv, reference=_checked(check_gemv, _ref.gemv), triton=_TRITON,
       backward=(_gemv_setup, _gemv_backward))


def _fake_epilogue(acc, row_scale, weight_scale, dyn_x, dyn_w, x_static, static_weight, bias):
    return x_static.new_empty(acc.shape)


def _reference_epilogue(acc, row_scale, weight_scale, dyn_x, dyn_w, x_static, static_weight, bias):
    y = acc.float() * row_scale[:, None] * weight_scale[None, :]
    if dyn_x is not None:
        y = y + (dyn_x @ dyn_w) * weight_scale[None, :]
    y = y + x_static.float() @ static_weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x_static.dtype)


GEMM_PATHS = ("auto", "amx", "onednn", "avx2", "int_mm")


def _fake_gemm(xq, weight, path):
    if path not in GEMM_PATHS:
        raise ValueError(f"path must be one of {', '.join(GEMM_PATHS)}, got {path!r}")
    # oneDNN returns the accumulator as fp32 (exact: the epilogue's own conversion), the others int32.
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=torch.float32 if path == "onednn" else torch.int32)


def _reference_gemm(xq, weight, path):
    if xq.numel() and weight.numel():
        return torch._int_mm(xq, weight.t())
    return torch.zeros(xq.shape[0], weight.shape[0], dtype=torch.int32, device=xq.device)


# The CPU int8 GEMM (csrc/bindings/int8.cpp): oneDNN where it is exact here, else lowbit's AVX2
# kernel, else torch._int_mm ("auto"; LOWBIT_CPU_INT8_GEMM forces one); and its epilogue
# (everything after the int32 accumulator).
define("_int8_gemm", "(Tensor xq, Tensor weight, str path) -> Tensor", fake=_fake_gemm, reference=_reference_gemm,
       native=("cpu",))
define("_int8_epilogue", "(Tensor acc, Tensor row_scale, Tensor weight_scale, Tensor? dyn_x, Tensor? dyn_w, "
       "Tensor x_static, Tensor static_weight, Tensor? bias) -> Tensor",
       fake=_fake_epilogue, reference=_reference_epilogue, native=("cpu",))


def _c(t):
    return None if t is None else t.contiguous()


def int8_prepass(x, static_mask, static_idx, threshold, *, backend=None):
    """The activation pre-pass, one read of x [M, K] with no host synchronization:
    -> (xq int8 [M, K], row_scale fp32 [M], col_flags uint8 [K], x_static [M, S]).
    See ``lowbit.reference.int8`` for the exact definition."""
    return op("int8_prepass", backend, x.device)(x.contiguous(), static_mask.contiguous(), static_idx.contiguous(),
                                                 float(threshold))


def int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold, *,
                backend=None):
    """int8 x int8 -> int32 GEMM with the dequantization, the 16-bit outlier and static-column
    products, the bias and the output cast fused: -> [M, out] of x.dtype."""
    args = (x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias)
    return op("int8_matmul", backend, x.device)(*map(_c, args), float(threshold))


def int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias=None, *, backend=None):
    """Weight-only product for small batches: x [M, K] (16-bit, not quantized) with the int8 weight,
    reading half the bytes of a bf16 weight: -> [M, out] of x.dtype."""
    args = (x, weight, weight_scale, static_idx, static_weight, bias)
    return op("int8_gemv", backend, x.device)(*map(_c, args))


def int8_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold, *, backend=None):
    """The decomposed product: ``int8_prepass`` then ``int8_matmul``, both on the chosen backend."""
    args = (x, weight, weight_scale, static_mask, static_idx, static_weight, bias)
    return op("int8_linear", backend, x.device)(*map(_c, args), float(threshold))
