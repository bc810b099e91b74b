"""The Triton kernels of lowbit::dfloat_decode / lowbit::dfloat_gemv against the reference.

Streams come from the reference encoder, from real-looking weights and from adversarial bit
patterns; small windows and blocks make even short streams cross many of them. Decode must be
bit-exact (``torch.equal`` on the integer view); gemv must stay within the fp32-accumulation bound
derived in ``helpers.fp32_linear_bound``. Shapes are small: on CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.errors import FormatError
from lowbit.reference import dfloat as ref

from conftest import skip_unless_available
from dfloat_data import every_byte, packed_codes, uniform_bytes
from helpers import fp32_linear_bound


def _opcheck_utils(backend: str, device) -> tuple[str, ...]:
    """opcheck's checks for a backend. Under Triton's interpreter (CPU tensors) a kernel reads real
    data, so AOT dispatch, which runs the kernel on fake tensors, is checked on GPUs only."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:-1] if backend == "triton" and torch.device(device).type == "cpu" else utils


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.uint8: torch.uint8}
# (window_bits, windows_per_block): many tiny windows and blocks, a few, and the stored default.
LAYOUTS = [(32, 2), (64, 4), (256, 128)]
# Blocks of more windows than one program decodes side by side (128): programs walk them in chunks.
WIDE_BLOCK = (32, 160)


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _layout_id(layout):
    return f"w{layout[0]}x{layout[1]}"


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request):
    skip_unless_available("triton", request.param)
    return request.param


def _kernels():
    from lowbit.triton_kernels import dfloat

    return dfloat


def _encode(x, layout, lengths=None):
    """float tensor -> (stream tensors for the ops, total_bits); ``lengths`` defaults to Huffman's."""
    symbols, raw = ref.split_fields(x)
    if lengths is None:
        lengths = ref.code_lengths(ref.histogram(symbols))
    codes, gaps, block_starts, total_bits = ref.encode_stream(symbols, lengths, *layout)
    return (codes, raw, gaps, block_starts, ref.decode_table(lengths)), total_bits


def _check_decode(x, layout, device, lengths=None):
    """Decode x's stream with the Triton kernel; bit-exact against x and the reference decoder."""
    stream, total_bits = _encode(x, layout, lengths)
    args = (x.numel(), x.dtype, total_bits, *layout)
    expected = ref.decode(*stream, *args)
    got = _kernels().decode(*(t.to(device) for t in stream), *args)
    assert got.dtype == x.dtype and got.shape == (x.numel(),) and got.device.type == device
    view = INT_VIEW[x.dtype]
    assert torch.equal(expected.view(view), x.reshape(-1).view(view))
    assert torch.equal(got.cpu().view(view), expected.view(view))


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _random_bits(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    view = INT_VIEW[dtype]
    info = torch.iinfo(view)
    return torch.randint(info.min, info.max + 1, (n,), generator=g, dtype=torch.int64).to(view).view(dtype)


# ---- decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=_layout_id)
@pytest.mark.parametrize("n", [1, 7, 97], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_weights(device, dtype, n, layout):
    _check_decode(_weights((n,), dtype, seed=n), layout, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_weights_1025(device, dtype):
    _check_decode(_weights((1025,), dtype, seed=3), (256, 128), device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_wide_blocks(device, dtype):
    # 200 to 350 windows of 32 bits: 160 per block, walked in two chunks of lanes.
    x = _weights((2049,), dtype, seed=11)
    assert _encode(x, WIDE_BLOCK)[0][3].numel() >= 3, "expected two blocks or more"
    _check_decode(x, WIDE_BLOCK, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_decode_every_16_bit_pattern(device, dtype):
    # NaN payloads, +-Inf, -0.0, subnormals: the symbols are uniform, so every code has 8 bits.
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(0)
    _check_decode(bits[torch.randperm(bits.numel(), generator=g)].view(dtype), (256, 128), device)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_decode_random_fp32_bits(device, layout):
    _check_decode(_random_bits(1025 if layout[1] == 128 else 97, torch.float32, seed=4), layout, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_special_values(device, dtype):
    info = torch.finfo(dtype)
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny, -info.tiny, info.tiny / 4, info.max,
              -info.max, info.eps, 1.0, -1.0]
    x = torch.tensor(values, dtype=dtype)
    view = INT_VIEW[dtype]
    nan_payloads = torch.tensor([-1, torch.iinfo(view).max, torch.iinfo(view).min + 1], dtype=view).view(dtype)
    _check_decode(torch.cat([x, nan_payloads]), (32, 2), device)


@pytest.mark.parametrize("n", [1, 97], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_one_repeated_value(device, dtype, n):
    # One symbol: 1-bit codes, 32 of them per window.
    _check_decode(torch.full((n,), -0.75, dtype=dtype), (32, 2), device)


def _skewed_lengths():
    """Code lengths 1, 2, ..., 12, 12 for symbols 0..12: the longest codes the format allows."""
    counts = torch.zeros(ref.NUM_SYMBOLS, dtype=torch.int64)
    counts[:13] = torch.tensor([1 << (12 - i) for i in range(13)])
    lengths = ref.code_lengths(counts)
    assert lengths[:13].tolist() == list(range(1, 13)) + [12]
    return lengths


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=_layout_id)
def test_decode_12_bit_codes(device, layout):
    # fp32 with exponents 0..12 (symbols of 1..12-bit codes), long codes common: peeks straddle
    # three bytes and windows start mid-code.
    g = torch.Generator().manual_seed(5)
    exponents = torch.randint(0, 13, (150,), generator=g)
    signs = torch.randint(0, 2, (150,), generator=g)
    bits = (exponents << 23) | torch.randint(0, 1 << 23, (150,), generator=g) | (signs << 31)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    _check_decode(x, layout, device, lengths=_skewed_lengths())


@pytest.mark.parametrize("windows_per_block", [1, 2], ids=lambda g: f"x{g}")
def test_decode_empty_last_window(device, windows_per_block):
    # Three 12-bit codes fill bits [0, 36): window 1 = [32, 64) holds no code start, its gap
    # points at total_bits, and it decodes nothing.
    x = torch.full((3,), 2.0**-115, dtype=torch.float32)  # exponent 12: a 12-bit code each
    assert ref.split_fields(x)[0].tolist() == [12, 12, 12]
    _check_decode(x, (32, windows_per_block), device, lengths=_skewed_lengths())


def test_decode_empty(device):
    stream, total_bits = _encode(torch.empty(0, dtype=torch.bfloat16), (32, 2))
    out = _kernels().decode(*(t.to(device) for t in stream), 0, torch.bfloat16, total_bits, 32, 2)
    assert out.shape == (0,) and out.dtype == torch.bfloat16


# ---- decode to bytes (uint8: the symbol is the byte, no raw bits) -------------------------------

BYTE_KINDS = {"packed4": lambda n: packed_codes(n, bits=4, seed=n), "uniform": lambda n: uniform_bytes(n, seed=n)}


# Every layout up to 97 bytes; 1025 bytes in the default layout (tiny windows of it would take the
# interpreter long, and n97 already crosses many of them).
BYTE_SHAPES = [(n, layout) for n in (1, 7, 97) for layout in LAYOUTS] + [(1025, LAYOUTS[-1])]


@pytest.mark.parametrize("n,layout", BYTE_SHAPES, ids=lambda v: f"n{v}" if isinstance(v, int) else _layout_id(v))
@pytest.mark.parametrize("kind", list(BYTE_KINDS))
def test_decode_bytes(device, kind, n, layout):
    _check_decode(BYTE_KINDS[kind](n), layout, device)


def test_decode_bytes_wide_blocks(device):
    x = packed_codes(2049)
    assert _encode(x, WIDE_BLOCK)[0][3].numel() >= 3, "expected two blocks or more"
    _check_decode(x, WIDE_BLOCK, device)


@pytest.mark.parametrize("layout", [(32, 2), (256, 128)], ids=_layout_id)
def test_decode_every_byte(device, layout):
    _check_decode(every_byte().repeat(2), layout, device)


@pytest.mark.parametrize("n", [1, 97], ids=lambda n: f"n{n}")
def test_decode_one_repeated_byte(device, n):
    _check_decode(torch.full((n,), 0x3C, dtype=torch.uint8), (32, 2), device)


def test_decode_bytes_empty(device):
    stream, total_bits = _encode(torch.empty(0, dtype=torch.uint8), (32, 2))
    out = _kernels().decode(*(t.to(device) for t in stream), 0, torch.uint8, total_bits, 32, 2)
    assert out.shape == (0,) and out.dtype == torch.uint8


def test_decode_12_bit_byte_codes(device):
    # Bytes 0..12 with code lengths 1..12: the longest codes, peeks straddling three bytes.
    g = torch.Generator().manual_seed(12)
    _check_decode(torch.randint(0, 13, (150,), generator=g).to(torch.uint8), (32, 2), device,
                  lengths=_skewed_lengths())


def _corrupt(stream, what):
    codes, raw, gaps, block_starts, table = (t.clone() for t in stream)
    if what == "no_code":  # the first code's peek starts no code
        table[table == table[(int(codes[0]) | (int(codes[1]) << 8)) & 0xFFF]] = 0
    elif what == "block_starts":
        block_starts[1] += 1
    elif what == "gap":
        gaps[0] ^= 0x10  # window 1 starts a bit later
    elif what == "codes":  # caught by the window-end checks (not every flipped byte can be)
        codes[3] ^= 0xFF
    return codes, raw, gaps, block_starts, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=_dtype_id)
@pytest.mark.parametrize("what", ["no_code", "block_starts", "gap", "codes"])
def test_decode_rejects_corrupt_stream(device, what, dtype):
    x = packed_codes(97, seed=6) if dtype == torch.uint8 else _weights((97,), dtype, seed=6)
    stream, total_bits = _encode(x, (32, 2))
    bad = [t.to(device) for t in _corrupt(stream, what)]
    with pytest.raises(FormatError, match="corrupted dfloat stream"):
        _kernels().decode(*bad, 97, dtype, total_bits, 32, 2)
    with pytest.raises(ValueError):  # FormatError is a ValueError, as the reference raises
        lowbit.ops.dfloat_decode(*bad, 97, dtype, total_bits, 32, 2, backend="triton")


# ---- gemv ------------------------------------------------------------------------------------


def _assert_within(got, want, tol, what):
    err = (got.cpu().double() - want.double()).abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (f"{what}: error {err.flatten()[worst].item():.3g} over its bound "
                                      f"{tol.flatten()[worst].item():.3g}")


def _check_gemv(x, weight, bias, layout, device):
    stream, total_bits = _encode(weight, layout)
    out_features = weight.shape[0]
    args = (out_features, total_bits, *layout)
    got = _kernels().gemv(x.to(device), *(t.to(device) for t in stream), *args,
                          None if bias is None else bias.to(device))
    assert got.dtype == x.dtype and got.shape == (x.shape[0], out_features) and got.device.type == device
    expected = ref.gemv(x, *stream, *args, bias)
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    tol = fp32_linear_bound(x, weight, bias)
    _assert_within(expected, exact, tol, "reference vs fp64")  # the bound is sound
    _assert_within(got, exact, tol, "triton vs fp64")
    _assert_within(got, expected, 2 * tol, "triton vs reference")


# (out_features, in_features), (window_bits, windows_per_block), batch, bias
GEMV_CASES = [
    pytest.param((7, 33), (32, 16), 1, False, id="7x33-w32x16-b1"),
    pytest.param((7, 33), (32, 16), 3, True, id="7x33-w32x16-b3-bias"),
    pytest.param((7, 33), (32, 16), 8, False, id="7x33-w32x16-b8"),
    pytest.param((97, 64), (256, 128), 1, True, id="97x64-w256x128-b1-bias"),
    pytest.param((97, 64), (256, 128), 8, False, id="97x64-w256x128-b8"),
    pytest.param((5, 1), (32, 2), 3, True, id="5x1-w32x2-b3-bias"),
    pytest.param((1, 97), (32, 2), 8, True, id="1x97-w32x2-b8-bias"),
]


@pytest.mark.parametrize("shape,layout,batch,with_bias", GEMV_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gemv_matches_reference(device, dtype, shape, layout, batch, with_bias):
    weight = _weights(shape, dtype, seed=shape[0])
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype) if with_bias else None
    _check_gemv(x, weight, bias, layout, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gemv_rows_across_blocks(device, dtype):
    # Rows of 513 weights span many windows, both chunks of block 0's lanes, and blocks; 11 batch
    # rows take two programs per block.
    weight = _weights((4, 513), dtype, seed=7)
    x = torch.randn(11, 513, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(4, generator=torch.Generator().manual_seed(8)).to(dtype)
    assert _encode(weight, WIDE_BLOCK)[0][3].numel() >= 3, "expected two blocks or more"
    _check_gemv(x, weight, bias, WIDE_BLOCK, device)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (4, 3)], ids=lambda s: "x".join(map(str, s)))
def test_gemv_empty(device, shape):
    batch = 0 if shape == (4, 3) else 2
    weight = _weights(shape, torch.float16, seed=8)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch, shape[1], generator=g).to(torch.float16)
    bias = torch.randn(shape[0], generator=g).to(torch.float16)
    stream, total_bits = _encode(weight, (32, 2))
    got = _kernels().gemv(x.to(device), *(t.to(device) for t in stream), shape[0], total_bits, 32, 2, bias.to(device))
    assert torch.equal(got.cpu(), ref.gemv(x, *stream, shape[0], total_bits, 32, 2, bias))


@pytest.mark.parametrize("what", ["no_code", "block_starts", "gap", "codes"])
def test_gemv_corrupt_stream_gives_nan(device, what):
    weight = _weights((3, 33), torch.bfloat16, seed=6)
    stream, total_bits = _encode(weight, (32, 2))
    x = torch.randn(2, 33, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    got = _kernels().gemv(x.to(device), *(t.to(device) for t in _corrupt(stream, what)), 3, total_bits, 32, 2, None)
    assert bool(got.isnan().all())


# ---- through the op --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_ops_route_to_triton(device, dtype):
    weight = _weights((7, 33), dtype, seed=9)
    stream, total_bits = _encode(weight, (64, 4))
    stream = [t.to(device) for t in stream]
    flat = lowbit.ops.dfloat_decode(*stream, weight.numel(), dtype, total_bits, 64, 4, backend="triton")
    assert torch.equal(flat.cpu().view(INT_VIEW[dtype]), weight.reshape(-1).view(INT_VIEW[dtype]))

    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 66, generator=g).to(dtype).to(device)[:, ::2]  # not contiguous: the op makes it so
    bias = torch.randn(7, generator=g).to(dtype).to(device)
    got = lowbit.ops.dfloat_gemv(x, *stream, 7, total_bits, 64, 4, bias, backend="triton")
    expected = ref.gemv(x.cpu().contiguous(), *(t.cpu() for t in stream), 7, total_bits, 64, 4, bias.cpu())
    _assert_within(got, expected, 2 * fp32_linear_bound(x.cpu(), weight, bias.cpu()), "triton vs reference")


def test_ops_route_bytes_to_triton_and_gemv_refuses_them(device):
    x = packed_codes(7 * 33, seed=9)
    stream, total_bits = _encode(x, (64, 4))
    stream = [t.to(device) for t in stream]
    flat = lowbit.ops.dfloat_decode(*stream, x.numel(), torch.uint8, total_bits, 64, 4, backend="triton")
    assert flat.dtype == torch.uint8 and torch.equal(flat.cpu(), x)
    opcheck(lowbit.ops.op("dfloat_decode", "triton", device), (*stream, x.numel(), torch.uint8, total_bits, 64, 4),
            test_utils=_opcheck_utils("triton", device))
    with pytest.raises(TypeError, match="x must be one of bfloat16, float16, float32 .*got torch.uint8"):
        lowbit.ops.dfloat_gemv(torch.ones(3, 33, dtype=torch.uint8, device=device), *stream, 7, total_bits, 64, 4,
                               backend="triton")


def test_opcheck(device):
    weight = _weights((3, 5), torch.bfloat16, seed=10)
    stream, total_bits = _encode(weight, (32, 2))
    stream = tuple(t.to(device) for t in stream)
    opcheck(lowbit.ops.op("dfloat_decode", "triton", device), (*stream, 15, torch.bfloat16, total_bits, 32, 2),
            test_utils=_opcheck_utils("triton", device))
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16).to(device)
    opcheck(lowbit.ops.op("dfloat_gemv", "triton", device), (x, *stream, 3, total_bits, 32, 2, None),
            test_utils=_opcheck_utils("triton", device))
