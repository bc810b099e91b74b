"""dfloat: lossless floats and bytes, Huffman-coded symbols + raw bits (docs/formats.md, "dfloat";
spec in ``lowbit.reference.dfloat``). Streams decode to bf16, fp16, fp32 or uint8; the fused GEMV
takes the float ones only.

The stream tensors: codes uint8 [padded bytes], raw uint8 [n * raw_bytes], gaps uint8
[ceil(windows / 2)] (4-bit packed), block_starts int64 [blocks + 1], table int16 [4096].
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.ops._contract import define, op, raising_format_errors
from lowbit.reference import dfloat as _ref

# Limits of the format (a GPU thread decodes one window; a block's windows share a thread block).
# csrc/bindings/dfloat.h holds the same numbers.
MAX_WINDOW_BITS = 1 << 20
MAX_WINDOWS_PER_BLOCK = 1024

_STREAM = "Tensor codes, Tensor raw, Tensor gaps, Tensor block_starts, Tensor table"


def _names(dtypes) -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def _check_dtype(dtype, name: str) -> None:
    """A dtype that dfloat codes (an element type of ``x``, a stream's output ``dtype``)."""
    if dtype not in _ref.LAYOUTS:
        raise TypeError(f"{name} must be one of {_names(_ref.LAYOUTS)}, got {dtype}")


def check_window_shape(window_bits: int, windows_per_block: int, error=FormatError) -> None:
    if not (32 <= window_bits <= MAX_WINDOW_BITS and window_bits % 32 == 0
            and 1 <= windows_per_block <= MAX_WINDOWS_PER_BLOCK):
        raise error(f"window_bits must be a multiple of 32 in [32, {MAX_WINDOW_BITS}] and windows_per_block "
                    f"in [1, {MAX_WINDOWS_PER_BLOCK}], got {window_bits} and {windows_per_block}")


def check_stream(n, dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits, windows_per_block) -> None:
    """Shape and dtype checks of a stream that need no data (so they also run on fake tensors);
    what the data says is checked by the decoders. The rules break only for corrupted data."""
    _check_dtype(dtype, "dtype")
    for name, t, want in (("codes", codes, torch.uint8), ("raw", raw, torch.uint8), ("gaps", gaps, torch.uint8),
                          ("block_starts", block_starts, torch.int64), ("table", table, torch.int16)):
        if t.dtype != want or t.dim() != 1:
            raise FormatError(f"{name} must be a 1-D {want} tensor, got {t.dtype} with shape {list(t.shape)}")
    check_window_shape(window_bits, windows_per_block)
    if total_bits < 0:
        raise FormatError(f"total_bits must be >= 0, got {total_bits}")
    windows = -(-total_bits // window_bits)
    blocks = -(-windows // windows_per_block)
    checks = (
        ("raw", raw.numel(), n * _ref.LAYOUTS[dtype][2]),
        ("gaps", gaps.numel(), -(-windows // 2)),
        ("block_starts", block_starts.numel(), blocks + 1),
        ("table", table.numel(), 1 << _ref.MAX_CODE_LEN),
    )
    for name, got, want in checks:
        if got != want:
            raise FormatError(f"{name} has {got} elements, expected {want} for {n} values in {total_bits} code bits")
    if codes.numel() < -(-total_bits // 8) + 8:
        raise FormatError(f"codes has {codes.numel()} bytes; {total_bits} code bits need {-(-total_bits // 8) + 8} "
                          "with the padding")
    if total_bits < n or total_bits > n * _ref.MAX_CODE_LEN:
        raise FormatError(f"total_bits = {total_bits} is impossible for {n} values")
    devices = {t.device for t in (codes, raw, gaps, block_starts, table)}
    if len(devices) != 1:
        raise ValueError(f"the stream tensors must be on one device, got {sorted(map(str, devices))}")


def check_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_stream(n, dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits, windows_per_block)


def _fake_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block,
                 check=True):
    check_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block)
    return codes.new_empty((n,), dtype=dtype)


def _reference_decode(*args, check=True):
    args = args[:10]  # ``check`` positionally too: the reference always checks (on the host, at no cost)
    check_decode(*args)
    return _ref.decode(*args)


def check_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block,
               bias=None):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {list(x.shape)}")
    if x.dtype not in _ref.FLOAT_DTYPES:  # a uint8 stream decodes, but a product needs floats
        raise TypeError(f"x must be one of {_names(_ref.FLOAT_DTYPES)} (dfloat_gemv multiplies by a float "
                        f"weight), got {x.dtype}")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    check_stream(out_features * x.shape[1], x.dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits,
                 windows_per_block)
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_features}] of {x.dtype}, got {list(bias.shape)} of {bias.dtype}")
    devices = {t.device for t in (x, codes, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x and the weight's tensors must be on one device, got {sorted(map(str, devices))}")


def _fake_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block,
               bias=None):
    check_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block,
               bias)
    return x.new_empty((x.shape[0], out_features))


def _reference_gemv(*args):
    check_gemv(*args)
    return _ref.gemv(*args)


def _gemv_setup(ctx, inputs, output):
    x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits, windows_per_block, _ = inputs
    ctx.save_for_backward(codes, raw, gaps, block_starts, table)
    ctx.shape = (out_features, x.shape[1], x.dtype, total_bits, window_bits, windows_per_block)


def _gemv_backward(ctx, grad):
    """The weight is frozen: only x gets a gradient, grad @ W with W decoded exactly."""
    out_features, in_features, dtype, total_bits, window_bits, windows_per_block = ctx.shape
    weight = dfloat_decode(*ctx.saved_tensors, out_features * in_features, dtype, total_bits, window_bits,
                           windows_per_block).reshape(out_features, in_features)
    return (grad @ weight,) + (None,) * 10


define("dfloat_decode", f"({_STREAM}, int n, ScalarType dtype, int total_bits, int window_bits, "
       "int windows_per_block, bool check=True) -> Tensor", fake=_fake_decode, reference=_reference_decode,
       triton="lowbit.triton_kernels.dfloat")
define("dfloat_gemv", f"(Tensor x, {_STREAM}, int out_features, int total_bits, int window_bits, "
       "int windows_per_block, Tensor? bias) -> Tensor", fake=_fake_gemv, reference=_reference_gemv,
       native=("cuda",), triton="lowbit.triton_kernels.dfloat", backward=(_gemv_setup, _gemv_backward))


# The encoder's steps run on CPU tensors: the C++ encoder (backend cpu) or the reference.
def _fake_histogram(x):
    _check_dtype(x.dtype, "x")
    return x.new_empty((_ref.NUM_SYMBOLS,), dtype=torch.int64)


def _fake_encode(x, lengths, codewords, total_bits, window_bits, windows_per_block):
    _check_dtype(x.dtype, "x")
    windows = -(-total_bits // window_bits)
    padded = -(-(-(-total_bits // 8) + 8) // 8) * 8
    u8 = dict(dtype=torch.uint8)
    return (x.new_empty((padded,), **u8), x.new_empty((x.numel() * _ref.LAYOUTS[x.dtype][2],), **u8),
            x.new_empty((-(-windows // 2),), **u8),
            x.new_empty((-(-windows // windows_per_block) + 1,), dtype=torch.int64))


def _reference_histogram(x):
    _check_dtype(x.dtype, "x")
    return _ref.histogram(_ref.split_fields(x)[0])


def _reference_encode(x, lengths, codewords, total_bits, window_bits, windows_per_block):
    _check_dtype(x.dtype, "x")
    check_window_shape(window_bits, windows_per_block, ValueError)
    symbols, raw = _ref.split_fields(x)
    codes, gaps, block_starts, bits = _ref.encode_stream(symbols, lengths, window_bits, windows_per_block)
    if bits != total_bits:
        raise ValueError(f"total_bits = {total_bits} but the codes take {bits} bits")
    return codes, raw, gaps, block_starts


define("dfloat_histogram", "(Tensor x) -> Tensor", fake=_fake_histogram, reference=_reference_histogram,
       native=("cpu",))
define("dfloat_encode", "(Tensor x, Tensor lengths, Tensor codewords, int total_bits, int window_bits, "
       "int windows_per_block) -> (Tensor codes, Tensor raw, Tensor gaps, Tensor block_starts)",
       fake=_fake_encode, reference=_reference_encode, native=("cpu",))


@raising_format_errors
def dfloat_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block,
                  *, check=True, backend=None) -> torch.Tensor:
    """Decode a dfloat stream to a flat tensor [n] of ``dtype`` (bf16, fp16, fp32 or uint8), bit-exact.

    A stream whose codes disagree with its gaps and block starts raises ``FormatError`` on every
    backend (on a GPU this costs one host synchronization, skipped while capturing a CUDA graph).
    check=False skips that synchronization on a GPU, for streams already validated (a stored form's
    checksum is checked when it is loaded): a corrupted stream then decodes to unspecified values,
    never reading or writing out of bounds. The CPU kernels and the reference always check (at no
    cost there).
    """
    return op("dfloat_decode", backend, codes.device)(
        codes.contiguous(), raw.contiguous(), gaps.contiguous(), block_starts.contiguous(), table.contiguous(), n,
        dtype, total_bits, window_bits, windows_per_block, check)


@raising_format_errors
def dfloat_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits,
                windows_per_block, bias=None, *, backend=None) -> torch.Tensor:
    """x [B, in] @ W.T (+ bias) -> [B, out], W [out, in] read from its dfloat stream without
    materializing it (fused backends); fp32 accumulation. Differentiable with respect to x. x is
    bf16, fp16 or fp32 (a uint8 stream is not a weight: TypeError).

    The fused kernels never synchronize with the host: a corrupted stream gives an all-NaN output
    there, while the reference raises ``FormatError``. Stored forms are checked (checksum) when
    loaded, so this only concerns streams built by hand.
    """
    return op("dfloat_gemv", backend, x.device)(
        x.contiguous(), codes.contiguous(), raw.contiguous(), gaps.contiguous(), block_starts.contiguous(),
        table.contiguous(), out_features, total_bits, window_bits, windows_per_block,
        None if bias is None else bias.contiguous())
