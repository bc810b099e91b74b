"""Reference KV-cache quantization (KIVI's layout) and attention over it: the spec of the kv
family's kernels (docs/formats.md, "kv").

Keys are quantized per channel over blocks of ``group`` consecutive tokens, values per token over
groups of ``group`` channels, both asymmetric with ``bits`` bits (2, 4 or 8):

    zero  = min of the group, rounded down to the store dtype
    scale = (max - zero) / (2^bits - 1), rounded up to the store dtype
    code  = round((x - zero) / scale)          (fp32, round half to even; 0 where scale is 0)
    x'    = code * scale + zero                (fp32, then the cache's dtype)

Rounding zero down and scale up keeps every code in [0, 2^bits - 1] without clamping, so that
|x - x'| <= scale / 2 (plus the fp32 arithmetic) for every element, the top of the range included.

Packed forms (codes packed with the shared bit packing, ``lowbit.reference.bitpack``):

    keys    [B, H, T, D] -> codes  uint8 [B, H, T / group, D, packed_length(group, bits)]
                            scale, zero    [B, H, T / group, D]      (tokens of a channel packed)
    values  [B, H, T, D] -> codes  uint8 [B, H, T, packed_length(D, bits)]
                            scale, zero    [B, H, T, D / group]      (channels of a token packed)
"""

from __future__ import annotations

import math

import torch

from lowbit.reference.bitpack import pack_bits, unpack_bits

SUPPORTED_BITS = (2, 4, 8)


def _round_toward(value: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """fp32 ``value`` in ``dtype``, rounded down (or up) where the nearest value is on the wrong side."""
    stored = value.to(dtype)
    wrong = stored.float() > value if down else stored.float() < value
    toward = torch.full_like(stored, -math.inf if down else math.inf)
    return torch.where(wrong, torch.nextafter(stored, toward), stored)


def _quantize_groups(x: torch.Tensor, bits: int, store_dtype: torch.dtype):
    """x [..., n] (any float dtype): codes uint8 [..., n], scale and zero [...] (store_dtype), the
    group being the last dimension."""
    xf = x.float()
    qmax = (1 << bits) - 1
    zero = _round_toward(xf.amin(dim=-1), store_dtype, down=True)
    scale = _round_toward((xf.amax(dim=-1) - zero.float()) / qmax, store_dtype, down=False)
    s = scale.float().unsqueeze(-1)
    q = torch.round((xf - zero.float().unsqueeze(-1)) / torch.where(s > 0, s, torch.ones_like(s)))
    q = torch.where(s > 0, q, torch.zeros_like(q))
    # Only non-finite inputs can leave the range; clamping keeps their codes in it.
    return q.clamp(0, qmax).to(torch.uint8), scale, zero


def quantize_keys(keys: torch.Tensor, bits: int, group: int, store_dtype: torch.dtype | None = None):
    """keys [B, H, T, D], T a multiple of group -> (codes uint8 [B, H, T/group, D, packed_length(group,
    bits)], scale [B, H, T/group, D], zero [B, H, T/group, D]) in store_dtype (default keys'
    dtype)."""
    b, h, t, d = keys.shape
    blocks = keys.reshape(b, h, t // group, group, d).transpose(-1, -2)  # [B, H, nb, D, group]
    q, scale, zero = _quantize_groups(blocks, bits, store_dtype or keys.dtype)
    return pack_bits(q, bits), scale, zero


def quantize_values(values: torch.Tensor, bits: int, group: int, store_dtype: torch.dtype | None = None):
    """values [B, H, T, D], D a multiple of group -> (codes uint8 [B, H, T, packed_length(D, bits)],
    scale [B, H, T, D/group], zero [B, H, T, D/group]) in store_dtype (default values' dtype)."""
    b, h, t, d = values.shape
    q, scale, zero = _quantize_groups(values.reshape(b, h, t, d // group, group), bits, store_dtype or values.dtype)
    return pack_bits(q.reshape(b, h, t, d), bits), scale, zero


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The keys [B, H, nb * group, D] (dtype) that quantize_keys' outputs stand for."""
    b, h, nb, d, _ = codes.shape
    q = unpack_bits(codes, bits, group).float()  # [B, H, nb, D, group]
    x = q * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.transpose(-1, -2).reshape(b, h, nb * group, d).to(dtype)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The values [B, H, T, D] (dtype) that quantize_values' outputs stand for."""
    b, h, t, n_groups = scale.shape
    d = n_groups * group
    q = unpack_bits(codes, bits, d).float().reshape(b, h, t, n_groups, group)
    x = q * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(b, h, t, d).to(dtype)


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scaling: float) -> torch.Tensor:
    """softmax(query keys^T * scaling + mask) values in fp32, grouped-query: query [B, Hq, L, D],
    keys and values [B, Hkv, T, D] with Hq a multiple of Hkv (query head i reads KV head
    i // (Hq / Hkv)); mask [B or 1, 1 or Hq, L, T], bool (True: attend) or additive float, or None
    (the L queries are the last L positions: each sees the keys up to its own). Returns
    [B, Hq, L, D] in query's dtype; a query that sees no key gets zeros."""
    b, hq, length, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    k = keys.float().repeat_interleave(hq // hkv, dim=1)
    v = values.float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    if mask is None:
        positions = torch.arange(t, device=query.device)
        mask = positions.unsqueeze(0) <= (t - length + torch.arange(length, device=query.device)).unsqueeze(1)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    else:
        scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with every key masked
    return torch.matmul(weights, v).to(query.dtype)
