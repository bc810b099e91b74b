"""Triton kernels for ``lowbit::pack_bits`` and ``lowbit::unpack_bits``.

Layout: see ``lowbit.reference.bitpack``. Both kernels view the tensor as rows of the last
dimension and give each program BLOCK consecutive output elements of the flattened output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.ops._contract import finish_triton
from lowbit.ops.bitpack import check_pack, check_unpack

_BLOCK = 1024


@triton.jit
def _pack_bits_kernel(
    values_ptr,  # uint8 [rows, n], contiguous
    packed_ptr,  # uint8 [rows, nbytes], contiguous
    total,  # rows * nbytes
    n,
    nbytes,
    BITS: tl.constexpr,
    PER_BYTE: tl.constexpr,  # 8 // BITS
    BLOCK: tl.constexpr,
):
    # Each program owns BLOCK output bytes; it reads the PER_BYTE values behind each of them.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row = offs // nbytes
    col0 = (offs % nbytes) * PER_BYTE
    slot = tl.arange(0, PER_BYTE)
    col = col0[:, None] + slot[None, :]
    vmask = mask[:, None] & (col < n)
    v = tl.load(values_ptr + row[:, None] * n + col, mask=vmask, other=0).to(tl.int32)
    v = (v & ((1 << BITS) - 1)) << (slot[None, :] * BITS)
    # Slots hold disjoint bits, so the sum is their OR.
    byte = tl.sum(v, axis=1)
    tl.store(packed_ptr + offs, byte.to(tl.uint8), mask=mask)


@triton.jit
def _unpack_bits_kernel(
    packed_ptr,  # uint8 [rows, nbytes], contiguous
    values_ptr,  # uint8 [rows, n], contiguous
    total,  # rows * n
    n,
    nbytes,
    BITS: tl.constexpr,
    PER_BYTE: tl.constexpr,  # 8 // BITS
    BLOCK: tl.constexpr,
):
    # Each program owns BLOCK output values; neighbouring values share a packed byte.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row = offs // n
    col = offs % n
    byte = tl.load(packed_ptr + row * nbytes + col // PER_BYTE, mask=mask, other=0).to(tl.int32)
    v = (byte >> ((col % PER_BYTE) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    tl.store(values_ptr + offs, v.to(tl.uint8), mask=mask)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., n] (contiguous) -> uint8 [..., ceil(n * bits / 8)]"""
    per_byte = 8 // bits
    n = values.shape[-1]
    nbytes = -(-n // per_byte)
    packed = values.new_empty((*values.shape[:-1], nbytes))
    total = packed.numel()
    if total:
        grid = (triton.cdiv(total, _BLOCK),)
        wrap_triton(_pack_bits_kernel)[grid](values, packed, total, n, nbytes, BITS=bits, PER_BYTE=per_byte, BLOCK=_BLOCK,
                                              enable_fp_fusion=False)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n * bits / 8)] (contiguous) -> uint8 [..., n]"""
    per_byte = 8 // bits
    values = packed.new_empty((*packed.shape[:-1], n))
    total = values.numel()
    if total:
        grid = (triton.cdiv(total, _BLOCK),)
        wrap_triton(_unpack_bits_kernel)[grid](
            packed, values, total, n, packed.shape[-1], BITS=bits, PER_BYTE=per_byte, BLOCK=_BLOCK, enable_fp_fusion=False
        )
    return values


@triton_op("lowbit::pack_bits_triton", mutates_args=())
def _pack_bits_op(values: torch.Tensor, bits: int) -> torch.Tensor:
    check_pack(values, bits)
    return pack_bits(values.contiguous(), bits)


@triton_op("lowbit::unpack_bits_triton", mutates_args=())
def _unpack_bits_op(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    check_unpack(packed, bits, n)
    return unpack_bits(packed.contiguous(), bits, n)


finish_triton(_pack_bits_op)
finish_triton(_unpack_bits_op)
