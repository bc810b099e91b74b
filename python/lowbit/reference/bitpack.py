"""Reference bit packing of small unsigned integers (the spec of ``lowbit::pack_bits`` and
``lowbit::unpack_bits``).

Layout (docs/formats.md, "Packed integers"): values are packed along the last dimension,
``8 // bits`` values per byte, the value with the lowest index in the lowest bits. For bits=2:

    byte k of a row:  bit 7 6 | 5 4 | 3 2 | 1 0
                          v[4k+3] v[4k+2] v[4k+1] v[4k]

A row of n values takes ceil(n * bits / 8) bytes; the unused high slots of its last byte are 0.
Only the low ``bits`` bits of each value are stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (1, 2, 4, 8)


def packed_length(n: int, bits: int) -> int:
    """Bytes taken by a row of ``n`` values of ``bits`` bits."""
    per_byte = 8 // bits
    return -(-n // per_byte)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., packed_length(n, bits)]"""
    per_byte = 8 // bits
    n = values.shape[-1]
    nbytes = packed_length(n, bits)
    low = (values & ((1 << bits) - 1)).to(torch.int32)
    low = F.pad(low, (0, nbytes * per_byte - n))
    slots = low.reshape(*values.shape[:-1], nbytes, per_byte)
    shifts = torch.arange(per_byte, device=values.device, dtype=torch.int32) * bits
    # The slots occupy disjoint bits, so their sum is their bitwise OR.
    return (slots << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., packed_length(n, bits)] -> uint8 [..., n]"""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    slots = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return slots.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :n].to(torch.uint8)
