"""Triton kernels of the kv family (docs/formats.md "kv"; spec ``lowbit.reference.kv``):
``lowbit::kv_decode_attention``, attention of a few query tokens over a quantized KV layer, and
``lowbit::kv_quantize``, the quantize+pack of whole blocks.

Decode attention.

Program (i, s) owns KV head i (batch row i // Hkv) and split s of its tokens, in chunks of G (the
packed blocks, then the residual window). It holds all NQ = (Hq / Hkv) * L queries that read the
head (grouped-query attention: each KV head is read once), dequantizes each chunk's keys and values
in registers (code * scale + zero, fp32), and runs an online softmax over the chunks; the splits'
maxima, sums and unnormalized outputs go to a workspace that the launcher merges (a few kilobytes).
Scores and outputs are tl.dot products in IEEE fp32 (no TF32), so that the kernel stays within the
fp32 bound its tests derive.
Nothing is read back to the host, so the kernel runs inside CUDA graphs.

Quantize. Program i owns BLOCK_R groups (G tokens of one key channel, or G channels of one token's
values) and computes, bit for bit as the reference for finite states, each group's zero (its
minimum rounded down to the states' dtype), scale ((max - zero) / (2^bits - 1) rounded up) and
codes (round half to even of (x - zero) / scale), packed P = 8 / bits to a byte. Divisions are
IEEE (tl.div_rn; Triton's ``/`` is approximate), and the rounding to an integer is the exact
(y + 2^23) - 2^23, valid for 0 <= y < 2^22, which every finite state's y is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.ops._contract import finish_triton
from lowbit.ops.kv import check_quantize

_MIN_SPLIT_TOKENS = 256


@triton.jit
def _kv_decode_attention_kernel(
    q_ptr,  # [B, Hq, L, D] (query's dtype), contiguous
    kc_ptr, ks_ptr, kz_ptr,  # keys: codes [B, Hkv, nb, D, G / P] uint8; scale, zero [B, Hkv, nb, D]
    vc_ptr, vs_ptr, vz_ptr,  # values: codes [B, Hkv, nb G, D / P] uint8; scale, zero [B, Hkv, nb G, D / G]
    kr_ptr, vr_ptr,  # residual window [B, Hkv, r, D]
    mask_ptr,  # bool [B or 1, Hq or 1, L, T] (unused without HAS_MASK)
    m_ptr, l_ptr, acc_ptr,  # workspace: [B Hkv, splits, NQ] fp32 twice, [B Hkv, splits, NQ, D] fp32
    Hq, Hkv, L, D, nb, r, chunks_per_split, scaling,
    stride_mb, stride_mh,  # the mask's batch and head strides (0 where it broadcasts)
    G: tl.constexpr, BITS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = head // Hkv
    hk = head % Hkv
    qpg = Hq // Hkv
    nq = qpg * L
    P: tl.constexpr = 8 // BITS
    LOW: tl.constexpr = (1 << BITS) - 1
    total = nb * G + r

    qi = tl.arange(0, BLOCK_Q)  # query row: head hk * qpg + qi // L, position qi % L
    dd = tl.arange(0, BLOCK_D)
    tt = tl.arange(0, BLOCK_T)
    q_ok = qi < nq
    d_ok = dd < D
    q_rows = (b * Hq + hk * qpg + qi // L) * L + qi % L
    q = tl.load(q_ptr + q_rows[:, None] * D + dd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scaling

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)

    chunks = nb + (r + G - 1) // G
    c0 = split * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, chunks)
    kv_head = b * Hkv + hk
    for c in range(c0, c1):
        pos = c * G + tt  # absolute token positions of the chunk's lanes
        if c < nb:
            t_ok = tt < G
            kd_ok = t_ok[:, None] & d_ok[None, :]
            # keys: code of token t, channel d in byte d * (G / P) + t / P of block c, slot t % P
            kbyte = tl.load(kc_ptr + ((kv_head * nb + c) * D + dd[None, :]) * (G // P) + tt[:, None] // P,
                            mask=kd_ok, other=0)
            kcode = (kbyte.to(tl.int32) >> ((tt[:, None] % P) * BITS)) & LOW
            ks = tl.load(ks_ptr + (kv_head * nb + c) * D + dd, mask=d_ok, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + (kv_head * nb + c) * D + dd, mask=d_ok, other=0.0).to(tl.float32)
            k = kcode.to(tl.float32) * ks[None, :] + kz[None, :]
            # values: code of token t, channel d in byte d / P of its row, slot d % P; groups of G channels
            vrow = kv_head * nb * G + pos
            vbyte = tl.load(vc_ptr + vrow[:, None] * (D // P) + dd[None, :] // P, mask=kd_ok, other=0)
            vcode = (vbyte.to(tl.int32) >> ((dd[None, :] % P) * BITS)) & LOW
            vs = tl.load(vs_ptr + vrow[:, None] * (D // G) + dd[None, :] // G, mask=kd_ok, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + vrow[:, None] * (D // G) + dd[None, :] // G, mask=kd_ok, other=0.0).to(tl.float32)
            v = vcode.to(tl.float32) * vs + vz
        else:
            rt = pos - nb * G
            t_ok = (tt < G) & (rt < r)
            kd_ok = t_ok[:, None] & d_ok[None, :]
            rrow = kv_head * r + rt
            k = tl.load(kr_ptr + rrow[:, None] * D + dd[None, :], mask=kd_ok, other=0.0).to(tl.float32)
            v = tl.load(vr_ptr + rrow[:, None] * D + dd[None, :], mask=kd_ok, other=0.0).to(tl.float32)
        k = tl.where(kd_ok, k, 0.0)
        v = tl.where(kd_ok, v, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_Q, BLOCK_T], fp32 products and sums
        if HAS_MASK:
            mrow = b * stride_mb + (hk * qpg + qi // L) * stride_mh + (qi % L) * total
            visible = tl.load(mask_ptr + mrow[:, None] + pos[None, :],
                              mask=q_ok[:, None] & t_ok[None, :], other=0) != 0
        else:
            visible = pos[None, :] <= (total - L + qi % L)[:, None]
        visible = visible & t_ok[None, :] & q_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen nothing yet keep m = -inf: shift by 0 there, so exp gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        corr = tl.exp(m_i - shift)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = tl.dot(p, v, acc * corr[:, None], input_precision="ieee")
        m_i = m_new

    out = (kv_head * splits + split) * nq + qi
    tl.store(m_ptr + out, m_i, mask=q_ok)
    tl.store(l_ptr + out, l_i, mask=q_ok)
    tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])


def decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                     mask: Optional[torch.Tensor], bits: int, group: int, scaling: float) -> torch.Tensor:
    """Arguments checked by lowbit.ops (lowbit/ops/kv.py); returns [B, Hq, L, D] in query's dtype."""
    b, hq, length, d = query.shape
    hkv, r, nb = k_residual.shape[1], k_residual.shape[2], k_codes.shape[2]
    nq = (hq // hkv) * length
    args = [t.contiguous() for t in (query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual)]
    total = nb * group + r
    chunks = -(-total // group)
    splits = max(1, min(chunks, total // _MIN_SPLIT_TOKENS, 64))
    per_split = -(-chunks // splits)
    splits = max(1, -(-chunks // per_split))
    ws = dict(device=query.device, dtype=torch.float32)
    m = torch.empty((b * hkv, splits, nq), **ws)
    lsum = torch.empty((b * hkv, splits, nq), **ws)
    acc = torch.empty((b * hkv, splits, nq, d), **ws)
    if mask is not None:
        mask_t = mask.contiguous()
        stride_mb = mask_t.stride(0) if mask_t.shape[0] > 1 else 0
        stride_mh = mask_t.stride(1) if mask_t.shape[1] > 1 else 0
    else:
        mask_t, stride_mb, stride_mh = args[0], 0, 0
    block_q, block_d = max(16, triton.next_power_of_2(nq)), max(16, triton.next_power_of_2(d))
    if total > 0:
        wrap_triton(_kv_decode_attention_kernel)[(b * hkv, splits)](
            *args, mask_t, m, lsum, acc, hq, hkv, length, d, nb, r, per_split, float(scaling), stride_mb, stride_mh,
            G=group, BITS=bits, HAS_MASK=mask is not None, BLOCK_Q=block_q, BLOCK_T=max(16, triton.next_power_of_2(group)),
            BLOCK_D=block_d, num_warps=4 if block_q * block_d <= 4096 else 8,
            enable_fp_fusion=False)  # K and V dequantized as the reference (the product, then the sum)
    else:
        m.fill_(float("-inf"))
        lsum.zero_()
        acc.zero_()
    # Merge the splits from the overall maximum; a query that saw no token gets zeros.
    top = m.amax(dim=1, keepdim=True)
    weight = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp(m - torch.where(
        top == float("-inf"), torch.zeros_like(top), top)))
    num = (acc * weight[..., None]).sum(dim=1)
    den = (lsum * weight).sum(dim=1)
    out = torch.where(den[..., None] > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None],
                      torch.zeros_like(num))
    # [B Hkv, nq = (qpg, L), D] -> [B, Hq, L, D]
    return out.reshape(b, hkv, hq // hkv, length, d).reshape(b, hq, length, d).to(query.dtype)


@triton_op("lowbit::kv_decode_attention_triton", mutates_args=())
def kv_decode_attention_triton(query: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                               v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                               k_residual: torch.Tensor, v_residual: torch.Tensor, mask: Optional[torch.Tensor],
                               bits: int, group: int, scaling: float) -> torch.Tensor:
    return decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual, mask,
                            bits, group, scaling)


@triton.jit
def _round_toward(v, DTYPE: tl.constexpr, STORE16: tl.constexpr, DOWN: tl.constexpr):
    """fp32 v in DTYPE, rounded down (or up) where the nearest value lies on the wrong side: one step
    of the sign-magnitude bit pattern (away from zero: +1, toward it: -1; a zero steps to the
    smallest subnormal of the side). An fp32 DTYPE holds v exactly."""
    s = v.to(DTYPE)
    if STORE16:
        f = s.to(tl.float32)
        wrong = (f > v) if DOWN else (f < v)
        b = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        at_zero = (b & 0x7FFF) == 0
        negative = (b & 0x8000) != 0
        if DOWN:
            stepped = tl.where(at_zero, 0x8001, tl.where(negative, b + 1, b - 1))
        else:
            stepped = tl.where(at_zero, 1, tl.where(negative, b - 1, b + 1))
        s = tl.where(wrong, stepped.to(tl.int16).to(DTYPE, bitcast=True), s)
    return s


@triton.jit
def _kv_quantize_kernel(
    x_ptr,  # the states (keys or values) [B, H, T, D], contiguous
    codes_ptr,  # uint8 [rows, G / P]: group r's codes, P to a byte, lowest element in the lowest bits
    scale_ptr, zero_ptr,  # [rows] of the states' dtype
    rows, C,  # groups; group r is G elements at x + (r // C) G C + r % C, C apart (keys: C = D; values: 1)
    G: tl.constexpr, BITS: tl.constexpr, STORE16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,  # groups per program; bytes per group, padded to a power of 2
):
    P: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    DTYPE: tl.constexpr = scale_ptr.dtype.element_ty
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    uu = tl.arange(0, P)
    r_ok = rr < rows
    i = kk[None, :, None] * P + uu[None, None, :]  # element of the group: byte k, slot u
    ok = r_ok[:, None, None] & (i < G)
    base = (rr // C) * G * C + rr % C
    x = tl.load(x_ptr + base[:, None, None] + i * C, mask=ok, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(tl.where(ok, x, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(ok, x, float("-inf")), axis=2), axis=1)
    zero = _round_toward(lo, DTYPE, STORE16, True)
    zf = zero.to(tl.float32)
    scale = _round_toward(tl.div_rn(hi - zf, tl.full(hi.shape, QMAX, tl.float32)), DTYPE, STORE16, False)
    sf = scale.to(tl.float32)
    positive = sf > 0
    y = tl.div_rn(x - zf[:, None, None], tl.where(positive, sf, 1.0)[:, None, None])
    q = (y + 8388608.0) - 8388608.0
    q = tl.where(positive[:, None, None], q, 0.0)
    # Only non-finite states can leave the range; the clamp keeps their codes in it.
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
    byte = tl.sum(q << (uu[None, None, :] * BITS), axis=2)  # disjoint bits: the sum is their OR
    tl.store(codes_ptr + rr[:, None] * (G // P) + kk[None, :], byte.to(tl.uint8),
             mask=r_ok[:, None] & (kk[None, :] < G // P))
    tl.store(scale_ptr + rr, scale, mask=r_ok)
    tl.store(zero_ptr + rr, zero, mask=r_ok)


def quantize_groups(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rows: int,
                    stride: int, bits: int, group: int) -> None:
    """Quantizes the ``rows`` groups of ``group`` elements, ``stride`` apart, of x (contiguous) into
    codes, scale and zero: keys with stride D (a group per block and channel), values with stride 1
    (a group per token and G channels)."""
    if rows == 0:
        return
    per = 8 // bits
    block_k = triton.next_power_of_2(group // per)
    block_r = max(1, 2048 // (block_k * per))
    wrap_triton(_kv_quantize_kernel)[(triton.cdiv(rows, block_r),)](
        x, codes, scale, zero, rows, stride, G=group, BITS=bits, STORE16=x.element_size() == 2, BLOCK_R=block_r,
        BLOCK_K=block_k, enable_fp_fusion=False)  # bit-exact


def quantize(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int):
    """keys, values [B, H, T, D] -> (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) as
    ``lowbit.ops.kv_quantize`` documents them."""
    check_quantize(keys, values, bits, group)
    b, h, t, d = keys.shape
    keys, values = keys.contiguous(), values.contiguous()
    per = 8 // bits
    u8 = dict(dtype=torch.uint8, device=keys.device)
    out = (torch.empty((b, h, t // group, d, group // per), **u8), keys.new_empty((b, h, t // group, d)),
           keys.new_empty((b, h, t // group, d)), torch.empty((b, h, t, d // per), **u8),
           keys.new_empty((b, h, t, d // group)), keys.new_empty((b, h, t, d // group)))
    quantize_groups(keys, *out[:3], b * h * (t // group) * d, d, bits, group)
    quantize_groups(values, *out[3:], b * h * t * (d // group), 1, bits, group)
    return out


@triton_op("lowbit::kv_quantize_triton", mutates_args=())
def kv_quantize_triton(keys: torch.Tensor, values: torch.Tensor, bits: int,
                       group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor]:
    return quantize(keys, values, bits, group)


finish_triton(kv_quantize_triton)
