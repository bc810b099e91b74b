"""Triton kernels for ``lowbit::dfloat_decode`` and ``lowbit::dfloat_gemv``.

Format: docs/formats.md ("dfloat") and ``lowbit.reference.dfloat`` (the spec); the C++ twin of
the decode step is csrc/common/dfloat.h. Code stream, least-significant bit first:

    byte:    |     byte 0      |     byte 1      | ...
    bit:      0 1 2 3 4 5 6 7   8 9 ...
    stream:  [code 0 ][code 1    ][code 2] ...      window j = stream bits [j * W, (j + 1) * W)

Both kernels give each program one format block (``windows_per_block`` windows) and each lane of a
LANES-wide vector one window of it; a block wider than LANES is walked LANES windows at a time. A
lane decodes the codes that *start* in its window, from the window's gap until its position passes
the window's end, one code per step:

- phase 1 counts them; an exclusive ``tl.cumsum`` over the lanes plus ``block_starts[b]`` (and
  the counts of the block's earlier chunks) gives each lane the index of its first element;
- phase 2 decodes them again and writes element after element: ``decode`` merges each symbol with
  its raw byte(s) and stores the bit pattern (a uint8 stream has no raw bytes: the symbol is the
  element); ``gemv`` turns it into an fp32 weight, multiplies it by x[:, col] and accumulates per
  lane until its row ends, then adds the row's partial sums into an fp32 [B, out] buffer with one
  atomic add per batch row. A lane's elements are consecutive, so it flushes once per row it
  touches; rows that span lanes, windows or blocks are summed by the atomics. The dense weight
  never reaches global memory.

Every load is masked; a corrupt stream cannot make a kernel read or write out of bounds or loop
forever (a peek that starts no code advances MAX_CODE_LEN bits). The kernels also check the
stream as they go (no code, counts that disagree with block_starts, a window whose last code does
not end where the next window's first code starts) and set a flag: ``decode`` raises FormatError
on it, ``gemv`` (a forward pass, so no host sync) returns NaN everywhere instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.errors import FormatError
from lowbit.ops._contract import finish_triton
from lowbit.ops.dfloat import check_decode, check_gemv
from lowbit.reference.dfloat import LAYOUTS, MAX_CODE_LEN

_MAX_LANES = 128  # windows decoded side by side by one program: one lane per thread at 4 warps
_MAX_BATCH = 8  # batch rows per gemv program; larger batches get more programs along grid axis 1
_INT_VIEW = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
_SIGN32 = tl.constexpr(-(1 << 31))  # the sign bit of an int32


@triton.jit
def _window_bounds(gaps_ptr, window, valid, windows, total_bits, window_bits):
    """Per lane: (gap, end) in bits from the window's start, and the expected end of its last code.

    gap: where the window's first code starts; end: min(window_bits, total_bits - start); a valid
    stream's last code of window j ends where window j + 1's first code starts, or at total_bits."""
    start = window * window_bits
    packed = tl.load(gaps_ptr + (window >> 1), mask=valid, other=0).to(tl.int32)
    gap = (packed >> ((window & 1) * 4).to(tl.int32)) & 0xF
    end = tl.minimum(total_bits - start, window_bits).to(tl.int32)
    nxt = window + 1
    has_next = valid & (nxt < windows)
    packed_next = tl.load(gaps_ptr + (nxt >> 1), mask=has_next, other=0).to(tl.int32)
    gap_next = (packed_next >> ((nxt & 1) * 4).to(tl.int32)) & 0xF
    last_end = tl.minimum(total_bits - start, window_bits + gap_next).to(tl.int32)
    return gap, end, last_end


@triton.jit
def _next_code(codes_ptr, table_ptr, byte0, pos, active, MAX_CODE_LEN: tl.constexpr):
    """Peek MAX_CODE_LEN bits at window-relative bit ``pos`` (window's first byte ``byte0``) and
    look them up: -> (symbol, length). Reads bytes pos / 8 .. pos / 8 + 2, inside the padding."""
    byte = byte0 + (pos >> 3)
    b0 = tl.load(codes_ptr + byte, mask=active, other=0).to(tl.int32)
    b1 = tl.load(codes_ptr + byte + 1, mask=active, other=0).to(tl.int32)
    b2 = tl.load(codes_ptr + byte + 2, mask=active, other=0).to(tl.int32)
    peek = ((b0 | (b1 << 8) | (b2 << 16)) >> (pos & 7)) & ((1 << MAX_CODE_LEN) - 1)
    entry = tl.load(table_ptr + peek, mask=active, other=0).to(tl.int32) & 0xFFFF
    return entry & 0xFF, entry >> 8


@triton.jit
def _count_codes(codes_ptr, table_ptr, byte0, gap, end, last_end, valid, MAX_CODE_LEN: tl.constexpr):
    """Phase 1: -> (codes starting in each lane's window, lanes whose window is corrupt)."""
    pos = gap
    count = tl.zeros_like(gap)
    bad = tl.zeros_like(valid)
    active = valid & (pos < end)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        _, length = _next_code(codes_ptr, table_ptr, byte0, pos, active, MAX_CODE_LEN)
        bad = bad | (active & (length == 0))
        pos = tl.where(active, pos + tl.where(length == 0, MAX_CODE_LEN, length), pos)
        count += active.to(tl.int32)
        active = active & (pos < end)
    bad = bad | (valid & (pos != last_end))
    return count, bad


@triton.jit
def _count_chunk(codes_ptr, gaps_ptr, table_ptr, flag_ptr, b, c, lane, elem_next, total_bits, window_bits,
                 windows, windows_per_block, LANES: tl.constexpr, MAX_CODE_LEN: tl.constexpr):
    """Phase 1 for chunk c of block b: per lane, the window's first byte, its gap, how many codes
    start in it, and the index of its first element (after elem_next). Flags corrupt windows."""
    in_block = c * LANES + lane
    window = b * windows_per_block + in_block
    valid = (in_block < windows_per_block) & (window < windows)
    byte0 = window * (window_bits // 8)
    gap, end, last_end = _window_bounds(gaps_ptr, window, valid, windows, total_bits, window_bits)
    count, bad = _count_codes(codes_ptr, table_ptr, byte0, gap, end, last_end, valid, MAX_CODE_LEN)
    tl.store(flag_ptr + tl.zeros_like(lane), 1, mask=bad)
    elem = elem_next + (tl.cumsum(count, axis=0) - count)
    return byte0, gap, count, elem


@triton.jit
def _merge(raw_ptr, elem, symbol, keep, RAW_BYTES: tl.constexpr, SHIFT: tl.constexpr):
    """Element ``elem``'s bit pattern from its symbol and raw byte(s), as int32 (16-bit patterns
    sign-extended). Formulas of merge16 / merge32 in csrc/common/dfloat.h:

        bf16  s eeeeeeee mmmmmmm    fp16  s eeeee mmmmmmmmmm    raw = s mmmmmmm (1 byte)
        fp32  s eeeeeeee m{23}                                  raw = s m{23} (3 bytes, LE)
        uint8 bbbbbbbb: the symbol; no raw bytes (raw_ptr, an empty tensor's, is never read)
    """
    if RAW_BYTES == 0:
        bits = symbol
    else:
        raw_at = raw_ptr + elem * RAW_BYTES
        raw = tl.load(raw_at, mask=keep, other=0).to(tl.int32)
        if RAW_BYTES == 1:
            bits = (symbol << SHIFT) | (raw & 0x7F)
            bits = bits - ((raw & 0x80) << 8)  # sign bit 15, sign-extended
        else:
            raw |= tl.load(raw_at + 1, mask=keep, other=0).to(tl.int32) << 8
            raw |= tl.load(raw_at + 2, mask=keep, other=0).to(tl.int32) << 16
            bits = (symbol << SHIFT) | (raw & 0x7FFFFF)
            bits = tl.where((raw & 0x800000) != 0, bits | _SIGN32, bits)
    return bits


@triton.jit
def _dfloat_decode_kernel(
    codes_ptr,  # uint8 [padded bytes]: the code stream
    raw_ptr,  # uint8 [n * RAW_BYTES]: raw bits, little-endian per element (empty for uint8)
    gaps_ptr,  # uint8 [ceil(windows / 2)]: 4-bit gaps, low nibble first
    block_starts_ptr,  # int64 [blocks + 1]
    table_ptr,  # int16 [2^MAX_CODE_LEN]: symbol | length << 8
    out_ptr,  # uint8 [n] (uint8) / int16 [n] (bf16, fp16) / int32 [n] (fp32): the output's bit patterns
    flag_ptr,  # int32 [1]: set to 1 where the stream is corrupt
    n,
    total_bits,
    window_bits,
    windows,
    windows_per_block,
    blocks,
    RAW_BYTES: tl.constexpr,  # 0 (uint8), 1 or 3
    SHIFT: tl.constexpr,  # bit position of the symbol's low bit: 0, 7 or 23
    LANES: tl.constexpr,  # windows decoded side by side, a power of two
    MAX_CODE_LEN: tl.constexpr,
):
    # Program b owns block b and writes its elements [block_starts[b], block_starts[b + 1]);
    # lane l owns window b * windows_per_block + c * LANES + l of chunk c.
    b = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, LANES)
    elem_next = tl.load(block_starts_ptr + b)
    elem_end = tl.load(block_starts_ptr + b + 1)
    if b == 0:
        tl.store(flag_ptr, 1, mask=(elem_next != 0) | (tl.load(block_starts_ptr + blocks) != n))
    for c in range(0, tl.cdiv(windows_per_block, LANES)):
        byte0, gap, count, elem = _count_chunk(codes_ptr, gaps_ptr, table_ptr, flag_ptr, b, c, lane, elem_next,
                                               total_bits, window_bits, windows, windows_per_block, LANES,
                                               MAX_CODE_LEN)
        elem_next += tl.sum(count, axis=0)

        pos = gap
        for k in range(0, tl.max(count, axis=0)):
            active = k < count
            symbol, length = _next_code(codes_ptr, table_ptr, byte0, pos, active, MAX_CODE_LEN)
            pos = tl.where(active, pos + tl.where(length == 0, MAX_CODE_LEN, length), pos)
            keep = active & (elem >= 0) & (elem < n) & (elem < elem_end)
            bits = _merge(raw_ptr, elem, symbol, keep, RAW_BYTES, SHIFT)
            tl.store(out_ptr + elem, bits.to(out_ptr.dtype.element_ty), mask=keep)
            elem += active.to(tl.int64)
    tl.store(flag_ptr, 1, mask=elem_next != elem_end)


@triton.jit
def _dfloat_gemv_kernel(
    x_ptr,  # [B, in_features] of the weight's dtype
    codes_ptr,  # uint8 [padded bytes]: the code stream of W [out_features, in_features]
    raw_ptr,  # uint8 [n * RAW_BYTES]
    gaps_ptr,  # uint8 [ceil(windows / 2)]
    block_starts_ptr,  # int64 [blocks + 1]
    table_ptr,  # int16 [2^MAX_CODE_LEN]
    acc_ptr,  # fp32 [B, out_features], zeroed: x @ W.T is added into it
    flag_ptr,  # int32 [1]: set to 1 where the stream is corrupt
    batch,
    n,  # out_features * in_features
    in_features,
    total_bits,
    window_bits,
    windows,
    windows_per_block,
    blocks,
    stride_xb,
    stride_ab,
    DTYPE: tl.constexpr,  # 0 bf16, 1 fp16, 2 fp32
    RAW_BYTES: tl.constexpr,
    SHIFT: tl.constexpr,
    LANES: tl.constexpr,
    BATCH: tl.constexpr,  # batch rows per program, a power of two
    MAX_CODE_LEN: tl.constexpr,
):
    # Program (b, t) owns block b's elements for batch rows [t * BATCH, (t + 1) * BATCH); lane l
    # owns one window as in the decode kernel and keeps a [BATCH] partial sum of its current row.
    b = tl.program_id(0).to(tl.int64)
    rows_b = tl.program_id(1) * BATCH + tl.arange(0, BATCH)
    bmask = rows_b < batch
    lane = tl.arange(0, LANES)
    elem_next = tl.load(block_starts_ptr + b)
    elem_end = tl.load(block_starts_ptr + b + 1)
    if b == 0:
        tl.store(flag_ptr, 1, mask=(elem_next != 0) | (tl.load(block_starts_ptr + blocks) != n))
    for c in range(0, tl.cdiv(windows_per_block, LANES)):
        byte0, gap, count, elem = _count_chunk(codes_ptr, gaps_ptr, table_ptr, flag_ptr, b, c, lane, elem_next,
                                               total_bits, window_bits, windows, windows_per_block, LANES,
                                               MAX_CODE_LEN)
        elem_next += tl.sum(count, axis=0)
        # Row and column of each lane's next element, stepped instead of divided.
        row = elem // in_features
        col = (elem - row * in_features).to(tl.int32)
        partial = tl.zeros((LANES, BATCH), dtype=tl.float32)
        dirty = lane < 0  # all False: no partial sum held yet

        pos = gap
        for k in range(0, tl.max(count, axis=0)):
            active = k < count
            symbol, length = _next_code(codes_ptr, table_ptr, byte0, pos, active, MAX_CODE_LEN)
            pos = tl.where(active, pos + tl.where(length == 0, MAX_CODE_LEN, length), pos)
            keep = active & (elem >= 0) & (elem < n) & (elem < elem_end)
            bits = _merge(raw_ptr, elem, symbol, keep, RAW_BYTES, SHIFT)
            if DTYPE == 0:  # bf16 -> fp32 is exact: the bf16 bits are the fp32's high half
                w = (bits << 16).to(tl.float32, bitcast=True)
            elif DTYPE == 1:
                w = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                w = bits.to(tl.float32, bitcast=True)
            xmask = keep[:, None] & bmask[None, :]
            xv = tl.load(x_ptr + rows_b[None, :] * stride_xb + col[:, None], mask=xmask, other=0.0)
            partial += tl.where(xmask, w[:, None] * xv.to(tl.float32), 0.0)
            dirty = dirty | keep  # the partial sums hold a weight of row `row`, which is in range
            elem += active.to(tl.int64)
            col += active.to(tl.int32)
            row_done = active & (col == in_features)
            tl.atomic_add(acc_ptr + rows_b[None, :] * stride_ab + row[:, None], partial,
                          mask=(row_done & dirty)[:, None] & bmask[None, :], sem="relaxed")
            partial = tl.where(row_done[:, None], 0.0, partial)
            dirty = dirty & ~row_done
            row += row_done.to(tl.int64)
            col = tl.where(row_done, 0, col)
        tl.atomic_add(acc_ptr + rows_b[None, :] * stride_ab + row[:, None], partial,
                      mask=dirty[:, None] & bmask[None, :], sem="relaxed")
    tl.store(flag_ptr, 1, mask=elem_next != elem_end)


def _launch_shape(total_bits: int, window_bits: int, windows_per_block: int) -> tuple[int, int, int, int]:
    """-> (windows, blocks, LANES, num_warps)"""
    windows = -(-total_bits // window_bits)
    blocks = -(-windows // windows_per_block)
    lanes = min(triton.next_power_of_2(windows_per_block), _MAX_LANES)
    return windows, blocks, lanes, max(1, min(4, lanes // 32))


def decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block, check=True):
    """Stream tensors (contiguous, checked by lowbit.ops) -> [n] of ``dtype`` (a float or uint8), bit-exact.

    Raises FormatError when the stream is corrupt, which costs one device-to-host read of a flag
    (skipped while a CUDA graph is being captured, and when ``check`` is false)."""
    width, shift, raw_bytes = LAYOUTS[dtype]
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    windows, blocks, lanes, num_warps = _launch_shape(total_bits, window_bits, windows_per_block)
    flag = torch.zeros(1, dtype=torch.int32, device=codes.device)
    wrap_triton(_dfloat_decode_kernel)[(blocks,)](
        codes, raw, gaps, block_starts, table, out.view(_INT_VIEW[width]), flag,
        n, total_bits, window_bits, windows, windows_per_block, blocks,
        RAW_BYTES=raw_bytes, SHIFT=shift, LANES=lanes, MAX_CODE_LEN=MAX_CODE_LEN,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    # A CUDA graph cannot read the flag while it is captured, nor a compiled graph while it is
    # traced; replaying either skips the check.
    capturing = torch.compiler.is_compiling() or (out.is_cuda and torch.cuda.is_current_stream_capturing())
    if check and not capturing and flag.item():
        raise FormatError("corrupted dfloat stream: the codes disagree with gaps, block_starts or the table")
    return out


_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block,
         bias=None):
    """x [B, in] @ W.T (+ bias) -> [B, out] of x.dtype, W [out, in] decoded on the fly (fp32
    accumulation). A corrupt stream gives NaN everywhere (checked on the device, no host sync)."""
    batch, in_features = x.shape
    _, shift, raw_bytes = LAYOUTS[x.dtype]
    acc = torch.zeros((batch, out_features), dtype=torch.float32, device=x.device)
    if batch and out_features * in_features:
        windows, blocks, lanes, num_warps = _launch_shape(total_bits, window_bits, windows_per_block)
        tile = min(triton.next_power_of_2(batch), _MAX_BATCH)
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        wrap_triton(_dfloat_gemv_kernel)[(blocks, triton.cdiv(batch, tile))](
            x, codes, raw, gaps, block_starts, table, acc, flag,
            batch, out_features * in_features, in_features, total_bits, window_bits, windows, windows_per_block,
            blocks, x.stride(0), acc.stride(0),
            DTYPE=_DTYPE_CODE[x.dtype], RAW_BYTES=raw_bytes, SHIFT=shift, LANES=lanes, BATCH=tile,
            MAX_CODE_LEN=MAX_CODE_LEN, num_warps=num_warps, enable_fp_fusion=True,
        )
        acc = torch.where(flag != 0, float("nan"), acc)
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)


@triton_op("lowbit::dfloat_decode_triton", mutates_args=())
def _decode_op(codes: torch.Tensor, raw: torch.Tensor, gaps: torch.Tensor, block_starts: torch.Tensor,
               table: torch.Tensor, n: int, dtype: torch.dtype, total_bits: int, window_bits: int,
               windows_per_block: int, check: bool = True) -> torch.Tensor:
    args = (codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block)
    check_decode(*args)
    return decode(*args, check)


@triton_op("lowbit::dfloat_gemv_triton", mutates_args=())
def _gemv_op(x: torch.Tensor, codes: torch.Tensor, raw: torch.Tensor, gaps: torch.Tensor, block_starts: torch.Tensor,
             table: torch.Tensor, out_features: int, total_bits: int, window_bits: int, windows_per_block: int,
             bias: Optional[torch.Tensor]) -> torch.Tensor:
    args = (x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block, bias)
    check_gemv(*args)
    return gemv(*args)


finish_triton(_decode_op)
finish_triton(_gemv_op)
