"""Helpers shared by the test files: dtype lists, test ids, bit comparison, fp32 tolerances."""

from __future__ import annotations

import torch
from torch import nn

FLOAT16_DTYPES = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def param_id(value) -> str:
    """A test id for a parameter: dtypes without "torch.", shapes as 3x7."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "tensors") -> None:
    """``a`` and ``b`` hold the same bit patterns (NaN payloads, -0.0 and all): torch.equal on
    their integer views. On failure, says where the first difference is and both bit patterns."""
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
    view = _INT_VIEW[a.element_size()]
    ia, ib = a.detach().cpu().contiguous().view(view), b.detach().cpu().contiguous().view(view)
    if torch.equal(ia, ib):
        return
    differ = ia != ib
    first = tuple(differ.nonzero()[0].tolist())
    width = 2 * a.element_size()
    mask = (1 << (8 * a.element_size())) - 1
    raise AssertionError(
        f"{what} differ at {int(differ.sum())} of {a.numel()} elements; first at index {first}: "
        f"{a[first].item()!r} (0x{int(ia[first]) & mask:0{width}x}) vs "
        f"{b[first].item()!r} (0x{int(ib[first]) & mask:0{width}x})")


def fp32_sum_tolerance(dtype: torch.dtype, want: torch.Tensor, terms, counts) -> torch.Tensor:
    """Elementwise bound on |got - want| for two fp32 evaluations of the same sum, rounded to dtype.

    ``terms`` are the magnitudes of the summed parts (|products| summed: |a| @ |b|), ``counts``
    the number of fp32 additions inside each. A part of c additions and one scaling errs by at
    most (c + 1) * u * term (u = eps32 / 2), the final additions of the parts by 3 u * total;
    both results err so, in any order or tree, with or without FMA; rounding each to dtype then
    differs by at most one ulp of the larger, <= eps(dtype) * |value|."""
    eps32 = torch.finfo(torch.float32).eps
    total = sum(terms)
    d = eps32 * (3 * total + sum((c + 1) * t for t, c in zip(terms, counts)))  # 2 results x u
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    return d + eps * (want.double().abs() + d) + torch.finfo(dtype).smallest_normal


def fp32_linear_bound(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """Elementwise bound on |y - (x @ W.T + bias)| for fp32 accumulation, then one rounding to x.dtype.

    With S = |x| @ |W|.T + |bias|: summing the k = in_features products and the bias in fp32, in
    any order or tree, with or without FMA, errs by at most gamma_(k+1) * S <= (k + 1) * eps32 * S
    (gamma_m = m u / (1 - m u), u = eps32 / 2); rounding to x.dtype adds at most
    eps(x.dtype) / 2 * |y| <= eps(x.dtype) * S."""
    s = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        s = s + bias.double().abs()
    k = x.shape[1]
    return ((k + 1) * torch.finfo(torch.float32).eps + torch.finfo(x.dtype).eps) * s


def seeded_linear(in_features: int, out_features: int, bias: bool, dtype, *, seed: int = 0,
                  scale: float = 0.1) -> nn.Linear:
    """A frozen nn.Linear with N(0, scale^2) weights and N(0, 1) bias from ``seed``, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * scale)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear.to(dtype).requires_grad_(False)


def codebook_bound(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   bias, want: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |y - reference| for a codebook product (lowbit.reference.codebook) that
    may sum in any order, round W to x.dtype once and round its output twice (before and after
    the scale and bias).

    With S = |x| @ (|scale| * sum_c |codeword_c|)^T + |bias| (fp64): every fp32 evaluation of the
    K*C + K + 3 additions and products errs by at most (K*C + K + 8) * eps32 * S against the
    exact value; W rounded to x.dtype errs by eps/2 * S, the output's two roundings by eps/2 *
    (S + |y|) each; the reference's one rounding by eps/2 * |want|."""
    from lowbit.reference import codebook as ref

    parts = ref.code_indices(codes)
    total = torch.zeros(codes.shape[0], codes.shape[1], codebooks.shape[-1], dtype=torch.float64)
    for c in range(codes.shape[2]):
        total += codebooks[c, :, 0, :].double().abs()[parts[:, :, c]]
    magnitude = total.reshape(codes.shape[0], -1) * scales.double().abs().reshape(-1, 1)
    s = x.double().abs() @ magnitude.T
    if bias is not None:
        s = s + bias.double().abs()
    k = x.shape[1]
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(x.dtype).eps
    return ((k * codes.shape[2] + k + 8) * eps32 + 2 * eps) * s + eps * want.double().abs() \
        + torch.finfo(x.dtype).smallest_normal


def kv_attention_bound(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scaling: float,
                       want: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |out - reference| for decode attention (lowbit.reference.kv.attention)
    over fp32 keys and values [B, Hkv, T, D], computed in fp32 in any order, with the query scaled
    before or after its dot products, and rounded once to query's dtype.

    Per query and visible token t, fp32 dot products err by at most (D + 2) eps32 S_t with S_t =
    sum_d |q_d k_td| |scaling|; every weight p_t then errs by a factor of at most exp(2 Delta) - 1
    (Delta = 2 max_t (D + 2) eps32 S_t + 8 eps32, both sides' scores and exponentials), the
    weighted sum by (T + 8) eps32 more: with P = sum_t p_t |v_t| (fp64), |out - want| <= 2 (exp(2
    Delta) - 1 + (T + 8) eps32) P, and the two roundings to the output dtype add eps |want|."""
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(query.dtype).eps
    b, hq, length, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    k = keys.double().repeat_interleave(hq // hkv, dim=1)
    v = values.double().repeat_interleave(hq // hkv, dim=1)
    q = query.double()
    s = (q.abs() @ k.abs().transpose(-1, -2)) * abs(scaling)  # [B, Hq, L, T]
    scores = (q @ k.transpose(-1, -2)) * scaling
    if mask is None:
        pos = torch.arange(t)
        mask = pos.unsqueeze(0) <= (t - length + torch.arange(length)).unsqueeze(1)
    visible = mask.expand(b, hq, length, t)
    delta = 2 * ((d + 2) * eps32 * s.masked_fill(~visible, 0)).amax(dim=-1, keepdim=True) + 8 * eps32
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    weighted = p @ v.abs()
    return 2 * (torch.expm1(2 * delta) + (t + 8) * eps32) * weighted + eps * want.double().abs() \
        + torch.finfo(query.dtype).smallest_normal
