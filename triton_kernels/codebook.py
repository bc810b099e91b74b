"""Triton kernels for ``lowbit::codebook_matmul``, ``lowbit::codebook_dequantize`` and
``lowbit::_codebook_nearest``.

Format: docs/formats.md ("codebook") and ``lowbit.reference.codebook`` (the spec). A weight row n
is cut into groups of G input weights; group j is the sum of NUM_CODEBOOKS codewords, the c-th
being row ``code(n, j, c)`` of codebook c, times the row's scale. Every kernel gathers a whole
codeword (G weights) per code it reads, and none reads anything back to the host, so all of
them run inside CUDA graphs:

- ``gemv`` (small batches, M <= _GEMV_MAX_M): program (i, j) owns weight rows [i * BLOCK_N,
  +BLOCK_N) and x rows [j * BLOCK_M, +BLOCK_M) (one program per weight block: the codes are
  read once). Per step of BLOCK_G groups it reads its rows' codes, gathers their codewords (2x8
  codebooks, 8 KB in fp16, stay in L1; a 1x16 one, 1 MB, in L2), sums them in fp32 and
  multiplies them by x into a [BLOCK_M, BLOCK_N, BLOCK_G, G] fp32 accumulator on the CUDA
  cores, reduced over K once at the end, where the row scales multiply the sums.
- ``matmul`` (larger batches): program pid owns the output tile [i * BLOCK_M, +BLOCK_M) x
  [j * BLOCK_N, +BLOCK_N) (GROUP_M-swizzled, so a weight tile is built by GROUP_M programs in a
  row while its codes sit in L2). Per K step it builds the [BLOCK_N, BLOCK_K] tile of each
  codebook in registers and feeds it to tl.dot with the x tile; the whole weight never exists.
  The products stay fp32-exact (see ``_dot_mode``): 16-bit codewords go into one dot per
  codebook (bf16 or fp16 operands as they are, or both widened to fp32 and multiplied as TF32,
  which holds them exactly); fp32 x or codebooks take the summed tile into an IEEE fp32 dot.
- ``dequantize``: program (i, j) owns W[i * BLOCK_N, +BLOCK_N) x groups [j * BLOCK_G, +BLOCK_G),
  computed as the reference does (0 + codeword_0 + ... in fp32, times the scale, one rounding),
  so it is bit-exact.
- ``nearest``: program i owns points [i * BLOCK_P, +BLOCK_P); it walks the codebook in tiles
  of BLOCK_E entries, each lane of a [BLOCK_P, BLOCK_E] tile keeping its least fp32 distance and
  that entry's index (strictly less replaces, so ties keep the lower index), and reduces the
  lanes once at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.ops._contract import finish_triton
from lowbit.triton_kernels.tiles import grouped_tile
from lowbit.ops.codebook import check_dequantize, check_matmul, check_nearest

_GEMV_MAX_M = 16  # batches up to this many rows take the gemv kernel
_GEMV_ELEMENTS = 4096  # BLOCK_M * BLOCK_N * BLOCK_K of a gemv program (32 fp32 per thread at 4 warps)
_GEMV_MIN_PROGRAMS = 512  # about 4 per SM of an H100 / H200 (132 SMs): gathers need warps to hide latency
_GROUP_M = 8
_INT32_MAX = tl.constexpr(2147483647)

# How the matmul kernel multiplies a codeword tile by an x tile (_dot_mode):
_NATIVE = tl.constexpr(0)  # x and codebooks share a 16-bit dtype: one dot per codebook, as they are
_TF32 = tl.constexpr(1)  # 16-bit, mixed (or bf16 in the interpreter): widened, one TF32 dot per codebook
_IEEE = tl.constexpr(2)  # fp32 x or codebooks: the summed tile in an fp32 (IEEE) dot


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a 1-element stand-in of its dtype where it is empty, so that every pointer
    argument is a real allocation (the kernels never read it: their loops run zero times)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _dot_mode(x: torch.Tensor, codebooks: torch.Tensor) -> int:
    """How the matmul kernel keeps its products exact in fp32, as the reference's are.

    bf16 and fp16 values both fit TF32 (10 mantissa bits, fp32's exponent range), so a 16-bit x
    times 16-bit codewords is exact in a bf16/fp16 dot (same dtype) or a TF32 dot (mixed), and
    accumulated in fp32; the scale multiplies the sums afterwards. Rounding a summed or scaled
    weight to 16 bits instead would err by up to 2^-9 (bf16) or 2^-11 (fp16) of each product,
    where the spec's fp32 weight errs by 2^-24. fp32 operands do not fit TF32: those take an IEEE
    dot. Triton's interpreter (CPU tensors) keeps bf16 as raw uint16 bits, which its tl.dot takes
    for the values, so there bf16 dots are widened too."""
    if x.dtype == torch.float32 or codebooks.dtype == torch.float32:
        return _IEEE.value
    if x.dtype == codebooks.dtype and not (x.device.type == "cpu" and x.dtype == torch.bfloat16):
        return _NATIVE.value
    return _TF32.value


@triton.jit
def _codewords(codes_ptr, codebooks_ptr, n, j, t, mask, stride_cn, c: tl.constexpr, NUM_CODEBOOKS: tl.constexpr,
               NBITS: tl.constexpr):
    """codebooks[c, code(n, j, c), 0, t] -> a tile of the codebooks' dtype, 0 where ``mask`` is off.

    n (weight rows), j (groups) and mask broadcast to the tile's shape but for its last
    dimension, of size 1; t = arange(G) along that last dimension. codes [N, groups,
    NUM_CODEBOOKS] with rows stride_cn apart and the rest contiguous; codebooks [NUM_CODEBOOKS,
    2^NBITS, 1, G] contiguous. Each code names G consecutive values, one vector load of 8 to 32
    bytes; loading the codes with the trailing 1 lets the gather's addresses broadcast along it
    in the codes' own layout."""
    code = tl.load(codes_ptr + n.to(tl.int64) * stride_cn + j * NUM_CODEBOOKS + c, mask=mask, other=0).to(tl.int32)
    if NBITS == 16:
        code = code & 0xFFFF  # int16 codes are unsigned 16-bit indices stored in two's complement
    entry = c * (1 << NBITS) + code  # row of the codebooks viewed as [NUM_CODEBOOKS * 2^NBITS, G]
    return tl.load(codebooks_ptr + entry * t.shape[-1] + t, mask=mask, other=0.0)


@triton.jit
def _weight_sum(codes_ptr, codebooks_ptr, n, j, t, mask, stride_cn, NUM_CODEBOOKS: tl.constexpr,
                NBITS: tl.constexpr):
    """0 + codeword_0 + ... + codeword_{C-1} in fp32, in codebook order: the spec's sum (the 0
    turns a -0.0 codeword into +0.0, as the reference's does). Arguments as ``_codewords``."""
    total = 0.0 + _codewords(codes_ptr, codebooks_ptr, n, j, t, mask, stride_cn, 0, NUM_CODEBOOKS,
                             NBITS).to(tl.float32)
    for c in tl.static_range(1, NUM_CODEBOOKS):
        total += _codewords(codes_ptr, codebooks_ptr, n, j, t, mask, stride_cn, c, NUM_CODEBOOKS,
                            NBITS).to(tl.float32)
    return total


# ---- gemv (small batches) --------------------------------------------------------------------


@triton.jit
def _codebook_gemv_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16, K = groups * G, rows stride_xm apart, each contiguous
    codes_ptr,  # uint8 / int16 [N, groups, NUM_CODEBOOKS], rows stride_cn apart, the rest contiguous
    codebooks_ptr,  # [NUM_CODEBOOKS, 2^NBITS, 1, G] fp32 / fp16 / bf16, contiguous
    scales_ptr,  # [N] (of [N, 1, 1, 1]) fp32 / fp16 / bf16
    bias_ptr,  # [N] of x's dtype (unused without HAS_BIAS)
    y_ptr,  # [M, N] of x's dtype
    M,
    N,
    groups,
    stride_xm,
    stride_cn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups per step: BLOCK_K = BLOCK_G * G inputs
):
    # Program (i, j) owns weight rows [i * BLOCK_N, +BLOCK_N) and x rows [j * BLOCK_M, +BLOCK_M).
    # Every tile is [x rows, weight rows, groups, G], the codes and codewords broadcast along x
    # rows and x along weight rows: one layout throughout (a thread holds whole codewords, the x
    # values they meet and those lanes' partial sums), so the loop moves no data between threads,
    # and a thread's loads repeated along a broadcast dimension merge into one. The lanes are
    # summed once, after the loop.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    zero_m = tl.zeros((BLOCK_M, 1, 1, 1), dtype=tl.int32)
    n = offs_n[None, :, None, None] + zero_m  # [BLOCK_M, BLOCK_N, 1, 1]
    # Groups as not contiguous: with one codebook the codes are, and their load would take a
    # layout of its own (4 codes per thread) that the gathers' addresses then have to move to.
    g = tl.max_contiguous(tl.arange(0, BLOCK_G), [1])[None, None, :, None]  # [1, 1, BLOCK_G, 1]
    t = tl.arange(0, G)[None, None, None, :]  # [1, 1, 1, G]
    rows_x = x_ptr + offs_m[:, None, None, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1, 1, 1]
    # n >= 0 (always true) gives the x loads the weight-row dimension, hence the codewords' layout.
    x_rows_in = m_mask[:, None, None, None] & (n >= 0)  # [BLOCK_M, BLOCK_N, 1, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G, G), dtype=tl.float32)
    for j0 in range(0, groups, BLOCK_G):
        j = j0 + g
        w = _weight_sum(codes_ptr, codebooks_ptr, n, j, t, (n < N) & (j < groups), stride_cn, NUM_CODEBOOKS, NBITS)
        xv = tl.load(rows_x + j * G + t, mask=x_rows_in & (j < groups), other=0.0)
        acc += xv.to(tl.float32) * w

    scale = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = tl.sum(tl.sum(acc, axis=3), axis=2) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemv_config(m: int, n: int, g: int) -> dict:
    """x rows padded to a power of two; 16 weight rows per program for up to 4 x rows, else 8,
    halved (to 4 at least) while that leaves fewer than _GEMV_MIN_PROGRAMS programs; the K step
    fills _GEMV_ELEMENTS accumulator lanes (128 to 1024 inputs at M = 1), one group at least."""
    block_m = triton.next_power_of_2(m)
    block_n = 16 if block_m <= 4 else 8
    while block_n > 4 and triton.cdiv(n, block_n) < _GEMV_MIN_PROGRAMS:
        block_n //= 2
    block_k = max(g, _GEMV_ELEMENTS // (block_m * block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_k // g, num_warps=4, num_stages=2)


# ---- matmul (larger batches) -----------------------------------------------------------------


@triton.jit
def _codebook_matmul_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16, K = groups * G, rows stride_xm apart, each contiguous
    codes_ptr,  # uint8 / int16 [N, groups, NUM_CODEBOOKS], rows stride_cn apart, the rest contiguous
    codebooks_ptr,  # [NUM_CODEBOOKS, 2^NBITS, 1, G] fp32 / fp16 / bf16, contiguous
    scales_ptr,  # [N] (of [N, 1, 1, 1]) fp32 / fp16 / bf16
    bias_ptr,  # [N] of x's dtype (unused without HAS_BIAS)
    y_ptr,  # [M, N] of x's dtype
    M,
    N,
    groups,
    stride_xm,
    stride_cn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    DOT: tl.constexpr,  # _NATIVE, _TF32 or _IEEE (see _dot_mode)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups per K step: BLOCK_K = BLOCK_G * G
    GROUP_M: tl.constexpr,
):
    # Program pid owns the output tile (pid_m, pid_n); GROUP_M consecutive row tiles walk the
    # column tiles together, so the codes of a weight tile are read from L2 by GROUP_M programs.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    BLOCK_K: tl.constexpr = BLOCK_G * G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n = offs_n[:, None, None]  # [BLOCK_N, 1, 1]
    g = tl.max_contiguous(tl.arange(0, BLOCK_G), [1])[None, :, None]  # [1, BLOCK_G, 1], as in the gemv
    t = tl.arange(0, G)[None, None, :]  # [1, 1, G]
    rows_x = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    K = groups * G

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, groups, BLOCK_G):
        j = j0 + g
        w_mask = (n < N) & (j < groups)
        k = j0 * G + offs_k
        xv = tl.load(rows_x + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        if DOT == _IEEE:
            w = _weight_sum(codes_ptr, codebooks_ptr, n, j, t, w_mask, stride_cn, NUM_CODEBOOKS, NBITS)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # input j * G + t
            acc = tl.dot(xv.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            for c in tl.static_range(NUM_CODEBOOKS):
                w = _codewords(codes_ptr, codebooks_ptr, n, j, t, w_mask, stride_cn, c, NUM_CODEBOOKS, NBITS)
                w = tl.reshape(w, (BLOCK_N, BLOCK_K))
                if DOT == _NATIVE:
                    acc = tl.dot(xv, tl.trans(w), acc)
                else:
                    acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="tf32")

    scale = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _matmul_config(m: int, mode: int, g: int) -> dict:
    """Fixed tiles for H100/H200, no autotuning. Tensor-core dots (_NATIVE, _TF32): 128 x 128
    output tiles with 8 warps once M fills them, 64 x 128 for M <= 64, rows padded to a power of
    two (16 at least) by 64 columns below; K steps of 32 inputs (64 took 255 registers on sm_80,
    gathers and mma fragments together, and spilled with groups of 4). IEEE dots run on the CUDA cores
    with both operands in registers: 64 x 64 tiles with 8 warps (32 x 64, 4 warps for M <= 32)
    and K steps of 16 (32 spilled)."""
    if mode == _IEEE.value:
        block_m, block_n, block_k, num_warps = (64, 64, 16, 8) if m > 32 else (32, 64, 16, 4)
    elif m > 64:
        block_m, block_n, block_k, num_warps = 128, 128, 32, 8
    elif m > 32:
        block_m, block_n, block_k, num_warps = 64, 128, 32, 8
    else:
        block_m, block_n, block_k, num_warps = max(16, triton.next_power_of_2(m)), 64, 32, 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_k // g, GROUP_M=_GROUP_M, num_warps=num_warps,
                num_stages=3)


def matmul(x, codes, codebooks, scales, bias):
    """y = x W^T + bias with W the codes' weight (``lowbit.reference.codebook.matmul``) -> [M, N]
    of x's dtype, fp32 accumulation. x [M, K] may have any strides. Checked by lowbit.ops.

    x [M, groups * g], codes [N, groups, C] uint8 / int16, codebooks [C, 2^B, 1, g], scales
    [N, 1, 1, 1], bias [N] or None."""
    m = x.shape[0]
    n, groups, count = codes.shape
    if x.stride(1) != 1:  # the kernels take rows at any stride, the elements of a row contiguous
        x = x.contiguous()
    g = codebooks.shape[3]
    nbits = 8 if codes.dtype == torch.uint8 else 16
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
    args = (_nonempty(x), _nonempty(codes), codebooks, scales, scales if bias is None else bias.contiguous(), y,
            m, n, groups, x.stride(0), codes.stride(0), y.stride(0))
    common = dict(HAS_BIAS=bias is not None, NUM_CODEBOOKS=count, NBITS=nbits, G=g)
    if m <= _GEMV_MAX_M:
        config = _gemv_config(m, n, g)
        grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
        wrap_triton(_codebook_gemv_kernel)[grid](*args, **common, **config, enable_fp_fusion=True)  # within the bound
    else:
        mode = _dot_mode(x, codebooks)
        config = _matmul_config(m, mode, g)
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        wrap_triton(_codebook_matmul_kernel)[grid](*args, **common, DOT=mode, **config, enable_fp_fusion=True)
    return y


# ---- dequantize ------------------------------------------------------------------------------


@triton.jit
def _codebook_dequantize_kernel(
    codes_ptr,  # uint8 / int16 [N, groups, NUM_CODEBOOKS], rows stride_cn apart, the rest contiguous
    codebooks_ptr,  # [NUM_CODEBOOKS, 2^NBITS, 1, G] fp32 / fp16 / bf16, contiguous
    scales_ptr,  # [N] (of [N, 1, 1, 1]) fp32 / fp16 / bf16
    w_ptr,  # [N, groups * G] fp32 / fp16 / bf16
    N,
    groups,
    stride_cn,
    stride_wn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # Program (i, j) owns W[i * BLOCK_N, +BLOCK_N) x groups [j * BLOCK_G, +BLOCK_G): the
    # reference's arithmetic (fp32 sum in codebook order, times the scale, one rounding).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_n[:, None, None]  # [BLOCK_N, 1, 1]
    j = tl.program_id(1) * BLOCK_G + tl.max_contiguous(tl.arange(0, BLOCK_G), [1])[None, :, None]  # as in the gemv
    t = tl.arange(0, G)[None, None, :]  # [1, 1, G]
    mask = (n < N) & (j < groups)
    total = _weight_sum(codes_ptr, codebooks_ptr, n, j, t, mask, stride_cn, NUM_CODEBOOKS, NBITS)
    scale = tl.load(scales_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    w = total * scale
    tl.store(w_ptr + n.to(tl.int64) * stride_wn + j * G + t, w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(codes, codebooks, scales, dtype):
    """W [N, groups * g] in ``dtype``, bit-exact against ``lowbit.reference.codebook.dequantize``
    rounded to ``dtype``. Checked by lowbit.ops."""
    n, groups, count = codes.shape
    g = codebooks.shape[3]
    # Triton's interpreter (CPU tensors) rounds fp32 -> bf16 toward zero, not to nearest even as
    # the GPU does; there the kernel writes fp32 and torch rounds it.
    round_later = codes.device.type == "cpu" and dtype == torch.bfloat16
    w = torch.empty((n, groups * g), dtype=torch.float32 if round_later else dtype, device=codes.device)
    if w.numel() == 0:
        return w.to(dtype)
    codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
    block_n, block_g = 32, 128 // g  # 32 x 128 weights per program
    grid = (triton.cdiv(n, block_n), triton.cdiv(groups, block_g))
    wrap_triton(_codebook_dequantize_kernel)[grid](
        codes, codebooks, scales, w, n, groups, codes.stride(0), w.stride(0),
        NUM_CODEBOOKS=count, NBITS=8 if codes.dtype == torch.uint8 else 16, G=g, BLOCK_N=block_n, BLOCK_G=block_g,
        num_warps=4, enable_fp_fusion=False,  # bit-exact: the product, then the sum
    )
    return w.to(dtype)


# ---- nearest (the encoder's search) ----------------------------------------------------------


@triton.jit
def _codebook_nearest_kernel(
    points_ptr,  # fp32 [P, G], contiguous
    weights_ptr,  # fp32 [P, G], contiguous (unused without HAS_WEIGHTS)
    codebook_ptr,  # fp32 [E, G], contiguous
    out_ptr,  # int32 [P]
    P,
    E,
    HAS_WEIGHTS: tl.constexpr,
    G: tl.constexpr,  # the points' width
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Program i owns points [i * BLOCK_P, +BLOCK_P). Lane (p, e) of the [BLOCK_P, BLOCK_E] tile
    # sees entries e, e + BLOCK_E, ... in increasing order and keeps the least distance and its
    # entry, replacing it only on a strictly smaller one: ties stay with the lower index.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    rows = offs_p.to(tl.int64) * G
    offs_e = tl.arange(0, BLOCK_E)
    best = tl.full((BLOCK_P, BLOCK_E), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.int32) + offs_e[None, :]
    for e0 in range(0, E, BLOCK_E):
        e = e0 + offs_e
        e_mask = e < E
        d = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.float32)
        for t in tl.static_range(G):
            # Columns t of the points (loop-invariant: kept in registers) and of the entry tile.
            pt = tl.load(points_ptr + rows + t, mask=p_mask, other=0.0)
            ct = tl.load(codebook_ptr + e * G + t, mask=e_mask, other=0.0)
            diff = pt[:, None] - ct[None, :]
            if HAS_WEIGHTS:
                wt = tl.load(weights_ptr + rows + t, mask=p_mask, other=0.0)
                d += wt[:, None] * (diff * diff)
            else:
                d += diff * diff
        d = tl.where(d != d, float("-inf"), d)  # the first NaN distance wins, as in torch's argmin
        d = tl.where(e_mask[None, :], d, float("inf"))
        better = d < best
        best = tl.where(better, d, best)
        best_idx = tl.where(better, e[None, :], best_idx)
    least = tl.min(best, axis=1)
    idx = tl.min(tl.where(best == least[:, None], best_idx, _INT32_MAX), axis=1)
    tl.store(out_ptr + offs_p, idx, mask=p_mask)


def nearest(points, weights, codebook):
    """-> int32 [P]: for each row of points [P, g], the codebook [E, g] row of least
    sum_t weights[p, t] (p_t - c_t)^2 evaluated in fp32, ties to the lower index (see
    ``lowbit.reference.codebook.nearest``). Checked by lowbit.ops."""
    p, g = points.shape
    e = codebook.shape[0]
    out = torch.empty((p,), dtype=torch.int32, device=points.device)
    if p == 0:
        return out
    has_weights = weights is not None
    points, codebook = points.contiguous(), codebook.contiguous()
    weights = weights.contiguous() if has_weights else points
    block_p, block_e = 4, 256
    wrap_triton(_codebook_nearest_kernel)[(triton.cdiv(p, block_p),)](
        _nonempty(points), _nonempty(weights), codebook, out, p, e,
        HAS_WEIGHTS=has_weights, G=g, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4,
        enable_fp_fusion=False,  # distances rounded as the reference's: the same argmin
    )
    return out


# The registered ops (``torch.library.triton_op``: inductor and CUDA graphs see the kernels).
@triton_op("lowbit::codebook_matmul_triton", mutates_args=())
def _matmul_op(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    check_matmul(x, codes, codebooks, scales, bias)
    return matmul(x, codes, codebooks, scales, bias)


@triton_op("lowbit::codebook_dequantize_triton", mutates_args=())
def _dequantize_op(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    check_dequantize(codes, codebooks, scales, dtype)
    return dequantize(codes, codebooks, scales, dtype)


@triton_op("lowbit::_codebook_nearest_triton", mutates_args=())
def _nearest_op(points: torch.Tensor, weights: Optional[torch.Tensor], codebook: torch.Tensor) -> torch.Tensor:
    check_nearest(points, weights, codebook)
    return nearest(points, weights, codebook)


for _op in (_matmul_op, _dequantize_op, _nearest_op):
    finish_triton(_op)
