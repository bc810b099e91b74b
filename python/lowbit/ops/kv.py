"""The kv family's ops: decode attention over a quantized layer's packed blocks and residual window
(docs/formats.md, "kv"; spec in ``lowbit.reference.kv``)."""

from __future__ import annotations

import torch

from lowbit.ops._contract import define, op, requested
from lowbit.reference import kv as _ref
from lowbit.reference.bitpack import packed_length

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_QUERIES = 64  # query tokens per call: decode steps, not prefills
CUDA_MAX_HEAD_DIM = 256  # the CUDA decode attention's largest head_dim (its tiles in shared memory)


def _name(dtype):
    return str(dtype)


def _check_bits_group(bits, group):
    if bits not in _ref.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_ref.SUPPORTED_BITS}, got {bits}")
    if group < 1 or group % (8 // bits):
        raise ValueError(f"group must be a positive multiple of {8 // bits} (the codes a byte holds at {bits} bits), "
                         f"got {group}")


def check_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                           mask, bits, group, scaling):
    _check_bits_group(bits, group)
    if query.dtype not in _FLOATS:
        raise TypeError(f"query must be bfloat16, float16 or float32, got {_name(query.dtype)}")
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, query heads, queries, head_dim], got shape {list(query.shape)}")
    b, hq, length, d = query.shape
    if length > MAX_QUERIES:
        raise ValueError(f"query has {length} queries; decode attention takes at most {MAX_QUERIES}")
    if k_residual.dim() != 4:
        raise ValueError(f"k_residual must be [batch, kv heads, tokens, head_dim], got shape {list(k_residual.shape)}")
    hkv, r = k_residual.shape[1], k_residual.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the kv heads ({hkv})")
    if d % group:
        raise ValueError(f"head_dim ({d}) must be a multiple of group ({group})")
    nb = k_codes.shape[2] if k_codes.dim() == 5 else -1
    expected = {
        "k_codes": (torch.uint8, (b, hkv, nb, d, packed_length(group, bits))),
        "k_scale": (query.dtype, (b, hkv, nb, d)), "k_zero": (query.dtype, (b, hkv, nb, d)),
        "v_codes": (torch.uint8, (b, hkv, nb * group, packed_length(d, bits))),
        "v_scale": (query.dtype, (b, hkv, nb * group, d // group)),
        "v_zero": (query.dtype, (b, hkv, nb * group, d // group)),
        "k_residual": (query.dtype, (b, hkv, r, d)), "v_residual": (query.dtype, (b, hkv, r, d)),
    }
    given = dict(k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes, v_scale=v_scale, v_zero=v_zero,
                 k_residual=k_residual, v_residual=v_residual)
    for name, (dtype, shape) in expected.items():
        t = given[name]
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {_name(dtype)}, got {_name(t.dtype)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    if mask is not None:
        tokens = nb * group + r
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True: attend), got {_name(mask.dtype)}")
        if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq) \
                or tuple(mask.shape[2:]) != (length, tokens):
            raise ValueError(f"mask must be [1 or {b}, 1 or {hq}, {length}, {tokens}], got {list(mask.shape)}")
        if mask.device != query.device:
            raise ValueError(f"mask is on {mask.device}, query on {query.device}")


def _fake_decode_attention(query, *rest):
    check_decode_attention(query, *rest)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _reference_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                                mask, bits, group, scaling):
    check_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual, mask,
                           bits, group, scaling)
    keys = torch.cat([_ref.dequantize_keys(k_codes, k_scale, k_zero, bits, group, torch.float32),
                      k_residual.float()], dim=2)
    values = torch.cat([_ref.dequantize_values(v_codes, v_scale, v_zero, bits, group, torch.float32),
                        v_residual.float()], dim=2)
    return _ref.attention(query, keys, values, mask, scaling)


define("kv_decode_attention",
       "(Tensor query, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, Tensor v_scale, "
       "Tensor v_zero, Tensor k_residual, Tensor v_residual, Tensor? mask, int bits, int group, float scaling) "
       "-> Tensor",
       fake=_fake_decode_attention, reference=_reference_decode_attention, native=("cpu", "cuda"),
       triton="lowbit.triton_kernels.kv")


def kv_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual, mask,
                        bits, group, scaling, *, backend=None):
    """softmax(query K^T * scaling + mask) V over a quantized layer: query [B, Hq, L, D] (L up to
    MAX_QUERIES), the packed blocks (keys per channel over ``group`` tokens, values per token over
    ``group`` channels, ``bits`` bits; docs/formats.md "kv"), then the residual window [B, Hkv, r,
    D]; K and V dequantized in fp32. mask: bool [1 or B, 1 or Hq, L, T] (True: attend), or None (the
    queries are the last L positions). Query head i reads KV head i // (Hq / Hkv). Returns [B, Hq,
    L, D] in query's dtype. The CUDA backend takes head_dim up to 256; above that, ``auto`` runs
    Triton on a GPU."""
    if query.device.type == "cuda" and query.shape[-1] > CUDA_MAX_HEAD_DIM and requested(backend) == "auto":
        backend = "triton"
    return op("kv_decode_attention", backend, query.device)(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                                            k_residual, v_residual, mask, bits, group, scaling)


def check_quantize(keys, values, bits, group):
    _check_bits_group(bits, group)
    if keys.dtype not in _FLOATS:
        raise TypeError(f"keys must be bfloat16, float16 or float32, got {_name(keys.dtype)}")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, heads, tokens, head_dim], got shape {list(keys.shape)}")
    if values.dtype != keys.dtype or values.shape != keys.shape or values.device != keys.device:
        raise ValueError(f"values must match keys ({_name(keys.dtype)} {list(keys.shape)} on {keys.device}), got "
                         f"{_name(values.dtype)} {list(values.shape)} on {values.device}")
    t, d = keys.shape[2], keys.shape[3]
    if t % group:
        raise ValueError(f"keys hold {t} tokens, not a multiple of group ({group}): keys are quantized in whole blocks")
    if d % group:
        raise ValueError(f"head_dim ({d}) must be a multiple of group ({group})")


def _fake_quantize(keys, values, bits, group):
    check_quantize(keys, values, bits, group)
    b, h, t, d = keys.shape
    u8 = dict(dtype=torch.uint8)
    return (keys.new_empty((b, h, t // group, d, packed_length(group, bits)), **u8),
            keys.new_empty((b, h, t // group, d)), keys.new_empty((b, h, t // group, d)),
            keys.new_empty((b, h, t, packed_length(d, bits)), **u8),
            keys.new_empty((b, h, t, d // group)), keys.new_empty((b, h, t, d // group)))


def _reference_quantize(keys, values, bits, group):
    check_quantize(keys, values, bits, group)
    return (*_ref.quantize_keys(keys, bits, group), *_ref.quantize_values(values, bits, group))


define("kv_quantize", "(Tensor keys, Tensor values, int bits, int group) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
       "Tensor)", fake=_fake_quantize, reference=_reference_quantize, native=("cpu", "cuda"),
       triton="lowbit.triton_kernels.kv")


def kv_quantize(keys, values, bits, group, *, backend=None):
    """Whole blocks of a layer's keys and values [B, H, T, D] (T a multiple of ``group``) in the
    packed form (docs/formats.md "kv"): (k_codes [B, H, T/group, D, packed_length(group, bits)],
    k_scale, k_zero [B, H, T/group, D], v_codes [B, H, T, packed_length(D, bits)], v_scale, v_zero
    [B, H, T, D/group]), scales and zeros of the states' dtype; equal bit for bit to
    ``lowbit.reference.kv`` for finite states."""
    return op("kv_quantize", backend, keys.device)(keys, values, bits, group)
