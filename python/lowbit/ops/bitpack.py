"""Bit packing: uint8 values of 1, 2, 4 or 8 bits, packed along the last dimension
(docs/formats.md, "Packed integers"; spec in ``lowbit.reference.bitpack``)."""

from __future__ import annotations

import torch

from lowbit.ops._contract import define, op
from lowbit.reference import bitpack as _ref


def check_bits(bits: int) -> None:
    if bits not in _ref.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_ref.SUPPORTED_BITS}, got {bits}")


def check_pack(values: torch.Tensor, bits: int) -> None:
    check_bits(bits)
    if values.dtype != torch.uint8:
        raise TypeError(f"values must be a uint8 tensor, got {values.dtype}")
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension, got a 0-dim tensor")


def check_unpack(packed: torch.Tensor, bits: int, n: int) -> None:
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension, got a 0-dim tensor")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    expected = _ref.packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes in its last dimension; {n} values of {bits} bits "
            f"take {expected}"
        )


def _fake_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    check_pack(values, bits)
    return values.new_empty((*values.shape[:-1], _ref.packed_length(values.shape[-1], bits)))


def _fake_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    check_unpack(packed, bits, n)
    return packed.new_empty((*packed.shape[:-1], n))


def _reference_pack(values, bits):
    check_pack(values, bits)
    return _ref.pack_bits(values, bits)


def _reference_unpack(packed, bits, n):
    check_unpack(packed, bits, n)
    return _ref.unpack_bits(packed, bits, n)


define("pack_bits", "(Tensor values, int bits) -> Tensor", fake=_fake_pack, reference=_reference_pack,
       triton="lowbit.triton_kernels.bitpack")
define("unpack_bits", "(Tensor packed, int bits, int n) -> Tensor", fake=_fake_unpack,
       reference=_reference_unpack, triton="lowbit.triton_kernels.bitpack")


def pack_bits(values: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack uint8 values of ``bits`` bits (1, 2, 4 or 8) along the last dimension.

    values: uint8 [..., n] -> uint8 [..., ceil(n * bits / 8)]. Only the low ``bits`` bits of each
    value are kept. The layout is in docs/formats.md ("Packed integers").
    """
    return op("pack_bits", backend, values.device)(values, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    return op("unpack_bits", backend, packed.device)(packed, bits, n)
