"""csrc/cuda/dfloat.cu and csrc/cuda/bitpack.cu run on the CPU through the CUDA emulation
(tests/cuda_emu.py): dfloat decode bit for bit against the reference (every 16-bit pattern, random
fp32 patterns, bytes, window configurations, blocks that overflow the kernels' staging), corrupted
streams flagged (decode) or turned to NaN (GEMV) without reading out of bounds, the fused GEMV
against the reference within the GPU tests' tolerance; pack_bits / unpack_bits bit for bit."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from lowbit.reference import bitpack as bitref
from lowbit.reference import dfloat as ref

from conftest import param_id
from dfloat_data import all_16bit_patterns, packed_codes, random_fp32_patterns

cuda_emu = pytest.importorskip("cuda_emu")
_p = cuda_emu.pointer

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.uint8: 3}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.uint8: torch.uint8}
CONFIGS = [(32, 2), (64, 4), (96, 33), (256, 128)]


@pytest.fixture(scope="module")
def lib():
    return cuda_emu.library("dfloat")




class Stream:
    def __init__(self, t, window_bits=256, windows_per_block=128):
        self.original = t
        symbols, self.raw = ref.split_fields(t)
        lengths = ref.code_lengths(ref.histogram(symbols))
        self.codes, self.gaps, self.block_starts, self.total_bits = ref.encode_stream(symbols, lengths, window_bits,
                                                                                       windows_per_block)
        self.table = ref.decode_table(lengths)
        self.window_bits, self.windows_per_block = window_bits, windows_per_block

    def fields(self, **over):
        f = dict(codes=self.codes, raw=self.raw, gaps=self.gaps, block_starts=self.block_starts, table=self.table)
        f.update(over)
        return f

    def _args(self, f):
        sizes = (ctypes.c_int64 * 4)(self.original.numel(), self.total_bits, self.window_bits, self.windows_per_block)
        return (_p(f["codes"]), ctypes.c_int64(f["codes"].numel()), _p(f["raw"]), _p(f["gaps"]),
                _p(f["block_starts"]), _p(f["table"]), sizes)

    def decode(self, lib, **over):
        """(output, error bits)."""
        f = self.fields(**over)
        out = torch.empty(self.original.numel(), dtype=self.original.dtype)
        error = ctypes.c_int(0)
        err = lib.emu_dfloat_decode(*self._args(f), CODES[out.dtype], _p(out), ctypes.byref(error))
        assert err == 0, f"cudaError {err}"
        return out, error.value

    def gemv(self, lib, x, bias=None, **over):
        f = self.fields(**over)
        out_features, in_features = self.original.shape
        y = torch.empty(x.shape[0], out_features, dtype=x.dtype)
        workspace = torch.empty(x.shape[0] * out_features)
        error = ctypes.c_int(0)
        err = lib.emu_dfloat_gemv(*self._args(f), CODES[x.dtype], _p(x), ctypes.c_int64(x.shape[0]),
                                  ctypes.c_int64(in_features), ctypes.c_int64(out_features), _p(bias), _p(workspace),
                                  ctypes.byref(error), _p(y))
        assert err == 0, f"cudaError {err}"
        return y


def assert_bits_equal(a, e):
    a, e = a.reshape(-1).view(INT_VIEW[a.dtype]), e.reshape(-1).view(INT_VIEW[e.dtype])
    assert torch.equal(a, e), f"{(a != e).sum().item()} of {a.numel()} elements differ"


def _weights(shape, dtype, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=param_id)
@pytest.mark.parametrize("n", [1, 7, 1025, 20011], ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_decode_matches_reference(lib, dtype, n, config):
    s = Stream(_weights(n, dtype, seed=n), *config)
    out, error = s.decode(lib)
    assert error == 0
    assert_bits_equal(out, s.original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_decode_every_16bit_pattern(lib, dtype):
    s = Stream(all_16bit_patterns(dtype), 96, 33)
    out, error = s.decode(lib)
    assert error == 0
    assert_bits_equal(out, s.original)


def test_decode_fp32_patterns_and_bytes(lib):
    for t, config in ((random_fp32_patterns(5000, seed=1), (64, 4)), (packed_codes(3000, 4), (32, 2)),
                      (torch.arange(256, dtype=torch.uint8).repeat(7), (256, 128))):
        s = Stream(t, *config)
        out, error = s.decode(lib)
        assert error == 0
        assert_bits_equal(out, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
def test_decode_dense_blocks_overflow_staging(lib, dtype):
    """First half one value (1-bit codes), then widely spread exponents: the first blocks hold many
    times the average symbol count."""
    g = torch.Generator().manual_seed(2)
    n = 30000
    m = n - n // 2
    wide = torch.exp2(torch.randint(-60, 60, (m,), generator=g).float()) * (1 + torch.rand(m, generator=g))
    t = torch.cat([torch.full((n // 2,), 0.5), wide]).to(dtype)
    s = Stream(t, 64, 4)
    out, error = s.decode(lib)
    assert error == 0
    assert_bits_equal(out, t)


def _corrupted(s, what):
    g = torch.Generator().manual_seed(8)
    codes, gaps, starts, table = s.codes.clone(), s.gaps.clone(), s.block_starts.clone(), s.table.clone()
    if what == "no_code":
        table[table == table[(int(codes[0]) | (int(codes[1]) << 8)) & 0xFFF]] = 0
    elif what == "long_codes":
        table[:] = 0x7F05
    elif what == "block_start":
        starts[1] += 1
    elif what == "block_starts":
        starts[:] = torch.randint(-(10 ** 12), 10 ** 12, (starts.numel(),), generator=g)
    elif what == "gap":
        gaps[0] ^= 0x10
    elif what == "gaps":
        gaps[:] = 0xFF
    elif what == "codes":
        used = (s.total_bits + 7) // 8
        codes[:used] = torch.randint(0, 256, (used,), generator=g, dtype=torch.uint8)
    return dict(codes=codes, gaps=gaps, block_starts=starts, table=table)


CORRUPTIONS = ["no_code", "long_codes", "block_start", "block_starts", "gap", "gaps", "codes"]


@pytest.mark.parametrize("config", [(32, 2), (256, 128)], ids=param_id)
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupted_streams_are_flagged(lib, what, config):
    s = Stream(_weights((97, 33), torch.bfloat16, seed=6), *config)
    _, error = s.decode(lib, **_corrupted(s, what))
    assert error != 0
    x = torch.randn(3, 33).to(torch.bfloat16)
    y = s.gemv(lib, x, torch.randn(97).to(torch.bfloat16), **_corrupted(s, what))
    assert bool(y.isnan().all())
    out, error = s.decode(lib)  # the intact stream still decodes
    assert error == 0
    assert_bits_equal(out, s.original.reshape(-1))


def assert_gemv_close(y, x, w, bias, expected):
    scale = x.float().abs() @ w.float().abs().T
    if bias is not None:
        scale = scale + bias.float().abs()
    tol = 4 * torch.finfo(x.dtype).eps * scale
    err = (y.float() - expected.float()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("batch", [1, 3, 8, 9], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (33, 64), (97, 24), (5, 1000), (40, 520)], ids=param_id)
def test_gemv_matches_reference(lib, shape, batch, has_bias):
    out_features, in_features = shape
    dtype = DTYPES[(out_features + batch) % 3]
    config = CONFIGS[(out_features + batch) % len(CONFIGS)]
    w = _weights(shape, dtype, seed=out_features * 7 + in_features, scale=0.05)
    s = Stream(w, *config)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if has_bias else None
    expected = ref.gemv(x, s.codes, s.raw, s.gaps, s.block_starts, s.table, out_features, s.total_bits, *config, bias)
    y = s.gemv(lib, x, bias)
    assert_gemv_close(y, x, w, bias, expected)
    # The comparison can fail: one output moved by twice its tolerance.
    scale = x[0].float().abs() @ w[0].float().abs() + (0 if bias is None else bias[0].float().abs())
    y[0, 0] = expected[0, 0].float() + 8 * torch.finfo(dtype).eps * scale + 1e-3
    with pytest.raises(AssertionError):
        assert_gemv_close(y, x, w, bias, expected)


# ---- bitpack ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 64), (2, 1001), (3, 4096)], ids=param_id)
def test_pack_unpack_bits(rows, n, bits):
    lib = cuda_emu.library("bitpack")
    g = torch.Generator().manual_seed(rows * n + bits)
    values = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    if bits not in bitref.SUPPORTED_BITS:  # refused, nothing written
        out = torch.full((rows, n), 0xA5, dtype=torch.uint8)
        assert lib.emu_pack_bits(_p(values), _p(out), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(bits)) == 1
        assert bool((out == 0xA5).all())
        return
    want = bitref.pack_bits(values, bits)
    packed = torch.full_like(want, 0xA5)
    assert lib.emu_pack_bits(_p(values), _p(packed), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(bits)) == 0
    assert torch.equal(packed, want)
    back = torch.full_like(values, 0xA5)
    assert lib.emu_unpack_bits(_p(packed), _p(back), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(bits)) == 0
    assert torch.equal(back, values)
    assert math.prod(want.shape) == rows * bitref.packed_length(n, bits)
    # Values at an odd address: the value-by-value path of the same kernels.
    buf = torch.zeros(rows * n + 1, dtype=torch.uint8)
    odd = buf[1:].view(rows, n)
    odd.copy_(values)
    packed.fill_(0xA5)
    assert lib.emu_pack_bits(_p(odd), _p(packed), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(bits)) == 0
    assert torch.equal(packed, want)
    odd.fill_(0xA5)
    assert lib.emu_unpack_bits(_p(packed), _p(odd), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(bits)) == 0
    assert torch.equal(odd, values)
