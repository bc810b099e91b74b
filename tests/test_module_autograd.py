"""Backward through the drop-in modules with respect to their input (the compressed weight is
frozen): the gradient is g @ dequantize() on every backend, nothing else gets a gradient, the
ops' autograd registration holds, and a LoRA adapter trains on top of a frozen base."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import ops
from lowbit.dfloat import compress
from lowbit.int8.format import quantize_linear
from lowbit.nn import DFloatLinear, Int8Linear
from lowbit.reference import int8 as int8_ref
from lowbit.reference.int8 import static_mask

from conftest import param_id, skip_unless_available
from helpers import seeded_linear

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BACKENDS = ["reference", "cpu", "triton"]  # the backends that run CPU tensors (Triton interpreted)
# Tiny layers: Triton's interpreter runs every program in Python.
IN, OUT = 33, 6
STATIC = [4, 20]


def _linear(dtype, bias=True, seed=0):
    return seeded_linear(IN, OUT, bias, dtype, seed=seed, scale=0.2)


def _inputs(dtype, seed=1):
    """[3, IN] (with an outlier above int8's threshold), [2, 2, IN] and [0, IN]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, IN, generator=g)
    x[1, 7] = 8.0
    return [x.to(dtype), torch.randn(2, 2, IN, generator=g).to(dtype), torch.empty(0, IN, dtype=dtype)]


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _input_grad(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    assert y.requires_grad
    y.backward(g)
    return x.grad


def _assert_frozen(module):
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert not t.requires_grad and t.grad is None, name


def _cases(dtypes):
    """(backend, dtype) pairs: every dtype on the fast backends, one under Triton's interpreter."""
    return [pytest.param(b, d, id=f"{b}-{param_id(d)}") for b in BACKENDS for d in dtypes
            if b != "triton" or d == torch.bfloat16]


@pytest.mark.parametrize("backend, dtype", _cases(DTYPES))
@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_dfloat_input_grad_is_bit_exact(mode, backend, dtype):
    skip_unless_available(backend, "cpu")
    linear = _linear(dtype)
    module = DFloatLinear.from_linear(linear, mode=mode, backend=backend)
    if mode == "fused":
        # A fused kernel runs on the CPU for these backends only (cpu falls back to exact).
        assert (module._gemv is not None) == (backend != "cpu")
    w = linear.weight  # what dequantize() gives, bit for bit (test_module_protocol.py)
    # Each decode takes seconds in Triton's interpreter: one input there, the 3-D one.
    for x in _inputs(dtype)[1:2] if backend == "triton" else _inputs(dtype):
        g = torch.randn(*x.shape[:-1], OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
        got = _input_grad(module, x, g)
        want = _input_grad(linear, x, g)  # nn.Linear's own autograd with the original weight
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(_bits(got), _bits(want))
        assert torch.equal(_bits(got), _bits((g.reshape(-1, OUT) @ w).reshape(x.shape)))
    _assert_frozen(module)


def _int8_grad_tolerance(g, w, result, dtype):
    """The backward computes g @ W in fp32 with W the fp32 dequantized weight, then rounds once to
    ``dtype``; ``dequantize()`` gives W rounded to ``dtype``. So against g @ dequantize() in fp64:
      |error| <= eps * sum_n |g_n| |W_nk|          (each W_nk rounded to dtype: eps/2, doubled)
               + OUT * eps32 * sum_n |g_n| |W_nk|  (fp32 accumulation of OUT products)
               + eps * |result|                     (the final rounding to dtype)"""
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    scale = g.double().abs() @ w.double().abs()
    return (eps + OUT * eps32) * scale + eps * result.abs() + 1e-30


@pytest.mark.parametrize("backend, dtype", _cases(DTYPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_int8_input_grad_is_g_times_dequantized_weight(backend, dtype, bias):
    skip_unless_available(backend, "cpu")
    linear = _linear(dtype, bias)
    module = Int8Linear.from_linear(linear, static_idx=torch.tensor(STATIC, dtype=torch.int32), backend=backend)
    w32 = int8_ref.dequantize(module.weight, module.weight_scale, module.static_idx, module.static_weight)
    w = module.dequantize()
    for x in _inputs(dtype):
        g = torch.randn(*x.shape[:-1], OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
        got = _input_grad(module, x, g)
        assert got.dtype == dtype and got.shape == x.shape
        g2 = g.reshape(-1, OUT)
        # The formula, exactly: fp32 product with the fp32 dequantized weight, rounded once.
        assert torch.equal(_bits(got), _bits((g2.float() @ w32).to(dtype).reshape(x.shape)))
        want = g2.double() @ w.double()
        diff = (got.reshape(-1, IN).double() - want).abs()
        tol = _int8_grad_tolerance(g2, w, want, dtype)
        assert bool((diff <= tol).all()), float((diff - tol).max())
    _assert_frozen(module)


def _int8_op_args(dtype):
    linear = _linear(dtype)
    q = quantize_linear(linear.weight, torch.tensor(STATIC, dtype=torch.int32))
    x = _inputs(dtype)[0].requires_grad_()
    mask = static_mask(q.static_idx, IN, "cpu").to(torch.uint8)
    linear_args = (x, q.weight, q.weight_scale, mask, q.static_idx, q.static_weight, linear.bias, 6.0)
    gemv_args = (x, q.weight, q.weight_scale, q.static_idx, q.static_weight, linear.bias)
    return q, linear_args, gemv_args


@pytest.mark.parametrize("backend, dtype", _cases([torch.bfloat16, torch.float32]))
def test_int8_gemv_input_grad(backend, dtype):
    """The module takes the weight-only product on CUDA only; its backward is checked here on the op."""
    skip_unless_available(backend, "cpu")
    q, _, (x, *rest) = _int8_op_args(dtype)
    x = x.detach().requires_grad_()
    y = ops.op("int8_gemv", backend, "cpu")(x, *rest)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(g)
    w32 = int8_ref.dequantize(q.weight, q.weight_scale, q.static_idx, q.static_weight)
    assert torch.equal(_bits(x.grad), _bits((g.float() @ w32).to(dtype)))


def _available_ops():
    for name in ("int8_linear", "int8_gemv", "dfloat_gemv"):
        for backend in BACKENDS:
            if backend in ops.implementations(name):
                yield pytest.param(name, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(_available_ops()))
def test_opcheck_autograd_registration(name, backend):
    skip_unless_available(backend, "cpu")
    dtype = torch.bfloat16
    if name == "dfloat_gemv":
        linear = _linear(dtype)
        stored = compress(linear.weight)
        x = _inputs(dtype)[0].requires_grad_()
        args = (x, *stored.stream_args(), OUT, stored.total_bits, stored.window_bits, stored.windows_per_block,
                linear.bias)
    else:
        _, linear_args, gemv_args = _int8_op_args(dtype)
        args = linear_args if name == "int8_linear" else gemv_args
    torch.library.opcheck(ops.op(name, backend, "cpu"), args, test_utils="test_autograd_registration")


# -- LoRA on a frozen base ------------------------------------------------------------------------
class LoRA(nn.Module):
    """base(x + B A x): a rank-r adapter in front of a frozen layer, so every gradient that reaches
    the adapter went through the base's backward."""

    def __init__(self, base, rank, dtype, generator):
        super().__init__()
        self.base = base
        self.A = nn.Parameter((torch.randn(rank, base.in_features, generator=generator) * 0.1).to(dtype))
        self.B = nn.Parameter(torch.zeros(base.in_features, rank, dtype=dtype))

    def forward(self, x):
        return self.base(x + (x @ self.A.T) @ self.B.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
@pytest.mark.parametrize("family", ["int8", "dfloat"])
def test_lora_trains_on_a_frozen_base(family, dtype):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(32, 16).to(dtype).requires_grad_(False)
    base = (Int8Linear if family == "int8" else DFloatLinear).from_linear(linear)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = LoRA(base, 4, dtype, g)
    # The target: the original layer behind a rank-4 change of its input, which the adapter can learn.
    u, v = torch.randn(32, 4, generator=g) * 0.3, torch.randn(4, 32, generator=g) * 0.3
    x = torch.randn(64, 32, generator=g).to(dtype)
    target = F.linear(x.float() + x.float() @ v.T @ u.T, linear.weight.float(), linear.bias.float())
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["A", "B"]
    optimizer = torch.optim.SGD([model.A, model.B], lr=1.0, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = (model(x).float() - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    _assert_frozen(base)
    for k, t in base.state_dict().items():  # the base did not move
        assert torch.equal(t, frozen[k]), k
