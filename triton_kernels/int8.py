"""Triton kernels for ``lowbit::int8_prepass``, ``lowbit::int8_matmul`` and ``lowbit::int8_gemv``.

Format: docs/formats.md ("int8") and ``lowbit.reference.int8`` (the spec); the per-element rules
of the pre-pass are those of csrc/common/int8.h. None of the kernels reads anything back to the
host, so all three run inside CUDA graphs:

- ``prepass``: one program per row of x, which it reads once when the row fits one block
  (K <= _PREPASS_MAX_BLOCK), else twice (absmax, then quantize; the second read hits L2). It
  writes the row's xq, row_scale and x_static, and sets col_flags[k] = 1 where the row has an
  outlier: every program writes the same value, so plain byte stores into a zeroed buffer need
  no atomics.
- ``matmul``: program (i, j) owns the output tile [i * BLOCK_M, +BLOCK_M) x [j * BLOCK_N,
  +BLOCK_N) (GROUP_M-swizzled for L2 reuse of the weight). It runs the int8 x int8 -> int32 dot
  over K, then the 16-bit outlier dot over the K tiles whose col_flags are set (skipped without
  reading x elsewhere), then the static-column dot, and fuses the dequantization, bias and cast.
- ``gemv``: program (j, i) owns BLOCK_N rows of the weight and BLOCK_M (<= 16) rows of x; small
  batches have one program per weight block, so the weight is read once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.ops._contract import finish_triton
from lowbit.triton_kernels.tiles import grouped_tile
from lowbit.ops.int8 import check_gemv, check_linear, check_matmul, check_prepass
from lowbit.reference.int8 import fp32_threshold

_PREPASS_MAX_BLOCK = 16384  # widest row a pre-pass program keeps in registers
_PREPASS_LOOP_BLOCK = 4096  # chunk of a wider row, walked twice
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (p + M) - M = rint(p) in fp32, |p| < 2^22
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_GROUP_M = 8
_GEMV_BLOCK_M = 16  # the fewest rows every Triton release's tl.dot takes; smaller batches are masked
# K tile of the gemv: 256 bytes of each int8 weight row per step; fp32 activations (a CUDA-core
# dot) take 32, beyond which the tiles spill registers.
_GEMV_BLOCK_K = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 32}


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a 1-element stand-in of its dtype where it is empty, so that every pointer
    argument is a real allocation (the kernels never read it: their loops run zero times)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _dot_options(x: torch.Tensor) -> dict:
    """How the kernels multiply x-dtype tiles: fp32 operands in full fp32 (not TF32), as the
    reference does. Triton's interpreter (CPU tensors) keeps bf16 as raw uint16 bits, which its
    tl.dot and int8 -> bf16 casts take for the values, so there bf16 operands are widened to fp32
    instead: exact, as their products are in fp32 either way."""
    widen = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return dict(DOT_FP32=widen, PRECISION="ieee" if widen or x.dtype == torch.float32 else "tf32")


# ---- pre-pass --------------------------------------------------------------------------------


@triton.jit
def _split(x_row_ptr, static_mask_ptr, offs, K, threshold, DYNAMIC: tl.constexpr):
    """Loads x[m, offs] -> (int elements in fp32, 0 elsewhere; outlier mask)."""
    in_row = offs < K
    x = tl.load(x_row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    static = tl.load(static_mask_ptr + offs, mask=in_row, other=0) != 0
    if DYNAMIC:
        outlier = in_row & ~static & (tl.abs(x) >= threshold)
    else:
        outlier = offs < 0  # all False
    return tl.where(outlier | static, 0.0, x), outlier


@triton.jit
def _quantize(v, inv):
    """rint(v * inv) as int8, clamped to [-127, 127]; 0 where the product is not finite. The
    launch disables FMA contraction, so the product is rounded to fp32 before the magic add."""
    p = v * inv
    p = tl.where(tl.abs(p) <= _FLT_MAX, p, 0.0)  # NaN, +-Inf -> 0
    r = (p + _ROUND_MAGIC) - _ROUND_MAGIC  # round half to even
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)


@triton.jit
def _int8_prepass_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    static_mask_ptr,  # uint8 [K]: 1 at the static columns
    static_idx_ptr,  # int32 [S]: the static columns
    xq_ptr,  # int8 [M, K]
    row_scale_ptr,  # fp32 [M]
    col_flags_ptr,  # uint8 [K], zeroed: set to 1 at the columns holding an outlier
    x_static_ptr,  # [M, S] of x's dtype
    K,
    S,
    threshold,  # compared in fp32 with |x| widened to fp32
    stride_xm,
    stride_qm,
    stride_sm,
    DYNAMIC: tl.constexpr,  # threshold > 0: the dynamic split is on
    BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,  # K <= BLOCK_K: the row is loaded once and kept in registers
    BLOCK_S: tl.constexpr,
):
    # Program m owns row m: xq[m, :], row_scale[m], x_static[m, :], and the col_flags of its outliers.
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    xq_row = xq_ptr + m * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        v, outlier = _split(x_row, static_mask_ptr, offs, K, threshold, DYNAMIC)
        a = tl.abs(v)
        absmax = tl.max(tl.where(a == a, a, 0.0), axis=0)
        has_nan = tl.max((a != a).to(tl.int32), axis=0) > 0
    else:
        absmax = tl.zeros((), dtype=tl.float32)
        nan_seen = tl.zeros((), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            v, outlier = _split(x_row, static_mask_ptr, k0 + offs, K, threshold, DYNAMIC)
            a = tl.abs(v)
            absmax = tl.maximum(absmax, tl.max(tl.where(a == a, a, 0.0), axis=0))
            nan_seen = tl.maximum(nan_seen, tl.max((a != a).to(tl.int32), axis=0))
            if DYNAMIC:
                tl.store(col_flags_ptr + k0 + offs, tl.full([BLOCK_K], 1, tl.uint8), mask=outlier)
        has_nan = nan_seen > 0
    # NaN wins the absmax (the max of the other elements is taken NaN-free, then replaced).
    absmax = tl.where(has_nan, float("nan"), absmax)
    tl.store(row_scale_ptr + m, tl.math.div_rn(absmax, 127.0))
    inv = tl.math.div_rn(127.0, absmax)  # IEEE division, as the reference's 127 / absmax
    if SINGLE:
        tl.store(xq_row + offs, _quantize(v, inv), mask=offs < K)
        if DYNAMIC:
            tl.store(col_flags_ptr + offs, tl.full([BLOCK_K], 1, tl.uint8), mask=outlier)
    else:
        for k0 in range(0, K, BLOCK_K):
            v, _ = _split(x_row, static_mask_ptr, k0 + offs, K, threshold, DYNAMIC)
            tl.store(xq_row + k0 + offs, _quantize(v, inv), mask=k0 + offs < K)

    # x_static[m, :] = x[m, static_idx]: copied in x's dtype, bit for bit.
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        s_mask = s0 + offs_s < S
        idx = tl.load(static_idx_ptr + s0 + offs_s, mask=s_mask, other=0)
        inside = (idx >= 0) & (idx < K)  # a column out of range (never read) gives NaN, as on CUDA
        xs = tl.load(x_row + idx, mask=s_mask & inside, other=float("nan"))
        tl.store(x_static_ptr + m * stride_sm + s0 + offs_s, xs, mask=s_mask)


def prepass(x, static_mask, static_idx, threshold):
    """x [M, K] -> (xq int8 [M, K], row_scale fp32 [M], col_flags uint8 [K], x_static [M, S]),
    bit-exact against ``lowbit.reference.int8.prepass``. Inputs contiguous, checked by lowbit.ops."""
    threshold = fp32_threshold(threshold)
    m, k = x.shape
    s = static_idx.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    row_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    col_flags = torch.zeros((k,), dtype=torch.uint8, device=x.device)
    x_static = torch.empty((m, s), dtype=x.dtype, device=x.device)
    if m == 0:
        return xq, row_scale, col_flags, x_static
    single = k <= _PREPASS_MAX_BLOCK
    block_k = max(16, triton.next_power_of_2(k)) if single else _PREPASS_LOOP_BLOCK
    num_warps = min(16, max(1, block_k // 512))
    wrap_triton(_int8_prepass_kernel)[(m,)](
        _nonempty(x), _nonempty(static_mask), _nonempty(static_idx), _nonempty(xq), row_scale,
        _nonempty(col_flags), _nonempty(x_static),
        k, s, threshold, x.stride(0), xq.stride(0), x_static.stride(0),
        DYNAMIC=threshold > 0, BLOCK_K=block_k, SINGLE=single, BLOCK_S=64,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return xq, row_scale, col_flags, x_static


# ---- GEMM ------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32 for x-dtype operands; DOT_FP32 widens them first (exact)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _widen(w, dtype: tl.constexpr, DOT_FP32: tl.constexpr):
    """An int8 weight tile as a dot operand of x's ``dtype``: exact, |w| <= 127."""
    if DOT_FP32:
        return w.to(tl.float32)
    else:
        return w.to(dtype)


@triton.jit
def _static_product(acc, xs_ptr, stride_xs, sw_ptr, offs_m, offs_n, M, N, S,
                    BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x_static[offs_m, :] @ static_weight[offs_n, :]^T (fp32 accumulation).
    ``xs_ptr`` rows are ``stride_xs`` apart; static_weight is [N, S] contiguous."""
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        xs = tl.load(xs_ptr + offs_m[:, None].to(tl.int64) * stride_xs + s[None, :],
                     mask=(offs_m[:, None] < M) & (s[None, :] < S), other=0.0)
        sw = tl.load(sw_ptr + offs_n[None, :].to(tl.int64) * S + s[:, None],
                     mask=(offs_n[None, :] < N) & (s[:, None] < S), other=0.0)
        acc = _dot(xs, sw, acc, DOT_FP32, PRECISION)
    return acc


@triton.jit
def _int8_matmul_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16: read only in K tiles holding an outlier
    xq_ptr,  # int8 [M, K]
    row_scale_ptr,  # fp32 [M]
    col_flags_ptr,  # uint8 [K]
    x_static_ptr,  # [M, S] of x's dtype
    w_ptr,  # int8 [N, K]
    weight_scale_ptr,  # fp32 [N]
    static_weight_ptr,  # [N, S] of x's dtype
    bias_ptr,  # [N] of x's dtype (unused without HAS_BIAS)
    y_ptr,  # [M, N] of x's dtype
    M,
    N,
    K,
    S,
    threshold,  # compared in fp32 with |x| widened to fp32
    stride_xm,
    stride_qm,
    stride_sm,
    stride_wn,
    stride_ym,
    DYNAMIC: tl.constexpr,  # threshold > 0: run the outlier product
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # widen the x-dtype operands of tl.dot to fp32 (see _dot_options)
    PRECISION: tl.constexpr,  # tl.dot input precision of fp32 operands: "ieee" (no TF32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # K tile of the int8 product
    BLOCK_KD: tl.constexpr,  # K tile of the outlier product: the granularity col_flags are skipped at
    BLOCK_S: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Program pid owns the output tile (pid_m, pid_n); GROUP_M consecutive row tiles walk the
    # column tiles together, so a weight tile is read from L2 by GROUP_M programs in a row.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_q = xq_ptr + offs_m[:, None].to(tl.int64) * stride_qm
    cols_w = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # weight tiles as [K, N]

    # xq @ weight^T, exact in int32 (|acc| <= 127 * 127 * K < 2^31, checked by lowbit.ops).
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(rows_q + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0)
        b = tl.load(cols_w + k[:, None], mask=(k[:, None] < K) & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    row_scale = tl.load(row_scale_ptr + offs_m, mask=m_mask, other=0.0)
    weight_scale = tl.load(weight_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * row_scale[:, None] * weight_scale[None, :]

    if DYNAMIC:
        # x_dyn @ weight^T over the K tiles with a flagged column; int8 weights are exact in 16 bits.
        offs_kd = tl.arange(0, BLOCK_KD)
        rows_x = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        dyn = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_KD):
            k = k0 + offs_kd
            flags = tl.load(col_flags_ptr + k, mask=k < K, other=0)
            if tl.max(flags.to(tl.int32), axis=0) > 0:
                xv = tl.load(rows_x + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
                keep = (tl.abs(xv.to(tl.float32)) >= threshold) & (flags[None, :] != 0)
                xd = tl.where(keep, xv, 0.0).to(x_ptr.dtype.element_ty)
                b = tl.load(cols_w + k[:, None], mask=(k[:, None] < K) & n_mask[None, :], other=0)
                dyn = _dot(xd, _widen(b, x_ptr.dtype.element_ty, DOT_FP32), dyn, DOT_FP32, PRECISION)
        y += dyn * weight_scale[None, :]

    y = _static_product(y, x_static_ptr, stride_sm, static_weight_ptr, offs_m, offs_n, M, N, S, BLOCK_S, DOT_FP32,
                        PRECISION)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _matmul_config(m: int) -> dict:
    """Fixed tiles for H100 (sm_90 wgmma), no autotuning: 128 x 128 output tiles with 8 warps
    once M fills them; 64 x 128 for M <= 64; for M <= 32, rows padded to a power of two (16 at
    least) and 64 columns, so that small batches still spread over the SMs. K tiles of 64 keep
    the int8 tiles' pointers and values within the register file (128-wide ones spilled); the
    outlier and static products, rarely hot, take 32."""
    if m > 64:
        block_m, block_n, num_warps = 128, 128, 8
    elif m > 32:
        block_m, block_n, num_warps = 64, 128, 8
    else:
        block_m, block_n, num_warps = max(16, triton.next_power_of_2(m)), 64, 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, BLOCK_KD=32, BLOCK_S=32, GROUP_M=_GROUP_M,
                num_warps=num_warps, num_stages=3)


def matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold):
    """The int8 GEMM with its fused epilogue -> y [M, N] of x.dtype (see
    ``lowbit.reference.int8.matmul``). Inputs contiguous, checked by lowbit.ops."""
    threshold = fp32_threshold(threshold)
    m, k = x.shape
    n = weight.shape[0]
    s = x_static.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    config = _matmul_config(m)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    wrap_triton(_int8_matmul_kernel)[grid](
        _nonempty(x), _nonempty(xq), row_scale, _nonempty(col_flags), _nonempty(x_static), _nonempty(weight),
        weight_scale, _nonempty(static_weight), weight_scale if bias is None else bias, y,
        m, n, k, s, threshold,
        x.stride(0), xq.stride(0), x_static.stride(0), weight.stride(0), y.stride(0),
        DYNAMIC=threshold > 0, HAS_BIAS=bias is not None, **_dot_options(x), **config, enable_fp_fusion=True,
    )
    return y


# ---- gemv ------------------------------------------------------------------------------------


@triton.jit
def _int8_gemv_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    w_ptr,  # int8 [N, K]
    weight_scale_ptr,  # fp32 [N]
    static_idx_ptr,  # int32 [S]
    static_weight_ptr,  # [N, S] of x's dtype
    bias_ptr,  # [N] of x's dtype (unused without HAS_BIAS)
    y_ptr,  # [M, N] of x's dtype
    M,
    N,
    K,
    S,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program (j, i) owns weight rows [j * BLOCK_N, +BLOCK_N) and x rows [i * BLOCK_M, +BLOCK_M):
    # it streams its weight rows once over K, widened to x's dtype (exact), into an fp32 dot.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_x = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    cols_w = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # weight tiles as [K, N]

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        xv = tl.load(rows_x + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(cols_w + k[:, None], mask=(k[:, None] < K) & n_mask[None, :], other=0)
        acc = _dot(xv, _widen(w, x_ptr.dtype.element_ty, DOT_FP32), acc, DOT_FP32, PRECISION)
    weight_scale = tl.load(weight_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * weight_scale[None, :]

    # x[:, static_idx] @ static_weight^T, the columns gathered from x here.
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        idx = tl.load(static_idx_ptr + s, mask=s < S, other=0)
        inside = (idx >= 0) & (idx < K)  # a column out of range (never read) gives NaN, as on CUDA
        xs = tl.load(rows_x + idx[None, :], mask=m_mask[:, None] & (s[None, :] < S) & inside[None, :], other=0.0)
        xs = tl.where(inside[None, :] | (s[None, :] >= S), xs, float("nan"))
        sw = tl.load(static_weight_ptr + offs_n[None, :].to(tl.int64) * S + s[:, None],
                     mask=(s[:, None] < S) & n_mask[None, :], other=0.0)
        y = _dot(xs, sw, y, DOT_FP32, PRECISION)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv(x, weight, weight_scale, static_idx, static_weight, bias):
    """Weight-only product for small batches -> y [M, N] of x.dtype (see
    ``lowbit.reference.int8.gemv``). Inputs contiguous, checked by lowbit.ops.

    Batches of up to 16 rows read the weight once; larger ones once per 16 rows."""
    m, k = x.shape
    n = weight.shape[0]
    s = static_idx.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    # 16 weight rows per program while that leaves under ~2 waves of 132 SMs at 32, else 32.
    block_n = 32 if triton.cdiv(n, 32) >= 264 else 16
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, _GEMV_BLOCK_M))
    wrap_triton(_int8_gemv_kernel)[grid](
        _nonempty(x), _nonempty(weight), weight_scale, _nonempty(static_idx), _nonempty(static_weight),
        weight_scale if bias is None else bias, y,
        m, n, k, s, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, **_dot_options(x),
        BLOCK_M=_GEMV_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_GEMV_BLOCK_K[x.dtype], BLOCK_S=32,
        num_warps=4, num_stages=4, enable_fp_fusion=True,
    )
    return y


# The registered ops (``torch.library.triton_op``: inductor and CUDA graphs see the kernels).
@triton_op("lowbit::int8_prepass_triton", mutates_args=())
def _prepass_op(x: torch.Tensor, static_mask: torch.Tensor, static_idx: torch.Tensor,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_prepass(x, static_mask, static_idx, threshold)
    return prepass(x, static_mask, static_idx, threshold)


@triton_op("lowbit::int8_matmul_triton", mutates_args=())
def _matmul_op(x: torch.Tensor, xq: torch.Tensor, row_scale: torch.Tensor, col_flags: torch.Tensor,
               x_static: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, static_weight: torch.Tensor,
               bias: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
    args = (x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold)
    check_matmul(*args)
    return matmul(*args)


@triton_op("lowbit::int8_linear_triton", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, static_mask: torch.Tensor,
               static_idx: torch.Tensor, static_weight: torch.Tensor, bias: Optional[torch.Tensor],
               threshold: float) -> torch.Tensor:
    check_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold)
    xq, row_scale, col_flags, x_static = prepass(x, static_mask, static_idx, threshold)
    return matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold)


@triton_op("lowbit::int8_gemv_triton", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, static_idx: torch.Tensor,
             static_weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    check_gemv(x, weight, weight_scale, static_idx, static_weight, bias)
    return gemv(x, weight, weight_scale, static_idx, static_weight, bias)


for _op in (_prepass_op, _matmul_op, _linear_op, _gemv_op):
    finish_triton(_op)
