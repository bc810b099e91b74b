"""lowbit::dfloat_decode and lowbit::dfloat_gemv on the CUDA backend (csrc/cuda/dfloat.cu), against
the reference.

Streams are encoded on the CPU with the reference encoder and moved to the GPU. Decoding is lossless,
so it is compared bit for bit (integer views) with the reference decoder and with the original
tensor. The GEMV is compared with the reference GEMV (fp32 accumulation, one cast to x's dtype): the
two differ only in the order of the fp32 additions and, through that, in the final rounding, so the
tolerance per output is a small multiple of the output dtype's eps times sum |x| |w| (+ |bias|).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.errors import FormatError
from lowbit.reference import dfloat as ref

from conftest import param_id, run_in_cuda_graph, skip_unless_available
from dfloat_data import every_byte, packed_codes, uniform_bytes

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.uint8: torch.uint8}
# (window_bits, windows_per_block): tiny ones give many blocks and windows with few codes; 96 / 33
# gives groups that are not whole warps of windows; 256 / 128 is the default.
CONFIGS = [(32, 2), (64, 4), (96, 33), (256, 128)]
SIZES = [1, 7, 97, 1025, 4096 * 33 + 5]


@pytest.fixture(autouse=True)
def _cuda_backend():
    skip_unless_available("cuda", "cuda")


@dataclasses.dataclass
class Encoded:
    """A tensor and its dfloat stream (reference encoder), the stream on the GPU."""

    original: torch.Tensor  # CPU
    codes: torch.Tensor
    raw: torch.Tensor
    gaps: torch.Tensor
    block_starts: torch.Tensor
    table: torch.Tensor
    total_bits: int
    window_bits: int
    windows_per_block: int

    @property
    def stream(self) -> tuple:
        return (self.codes, self.raw, self.gaps, self.block_starts, self.table)

    @property
    def n(self) -> int:
        return self.original.numel()

    def decode(self, **overrides) -> torch.Tensor:
        stream = dict(zip(("codes", "raw", "gaps", "block_starts", "table"), self.stream)) | overrides
        return lowbit.ops.dfloat_decode(*stream.values(), self.n, self.original.dtype, self.total_bits,
                                        self.window_bits, self.windows_per_block, backend="cuda")

    def reference_decode(self) -> torch.Tensor:
        return ref.decode(*(t.cpu() for t in self.stream), self.n, self.original.dtype, self.total_bits,
                          self.window_bits, self.windows_per_block)

    def gemv(self, x, bias=None) -> torch.Tensor:
        return lowbit.ops.dfloat_gemv(x, *self.stream, self.original.shape[0], self.total_bits, self.window_bits,
                                      self.windows_per_block, bias, backend="cuda")


def encode(t: torch.Tensor, window_bits: int = 256, windows_per_block: int = 128) -> Encoded:
    symbols, raw = ref.split_fields(t)
    lengths = ref.code_lengths(ref.histogram(symbols))
    codes, gaps, block_starts, total_bits = ref.encode_stream(symbols, lengths, window_bits, windows_per_block)
    table = ref.decode_table(lengths)
    cuda = [x.cuda() for x in (codes, raw, gaps, block_starts, table)]
    return Encoded(t, *cuda, total_bits, window_bits, windows_per_block)


def _weights(shape, dtype, seed=0, scale=0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _skewed(shape, dtype, seed=0) -> torch.Tensor:
    """First half one value (1-bit codes), second half widely spread exponents (long codes): blocks
    of the first half hold several times the average symbol count, overflowing the kernels' staging."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) if isinstance(shape, tuple) else shape
    m = n - n // 2
    low, high = (-14, 6) if dtype == torch.float16 else (-60, 60)
    wide = torch.exp2(torch.randint(low, high, (m,), generator=g).float()) * (1 + torch.rand(m, generator=g))
    wide = wide * torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    return torch.cat([torch.full((n // 2,), 0.5), wide]).reshape(shape).to(dtype)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a = actual.cpu().view(INT_VIEW[actual.dtype]).reshape(-1)
    e = expected.cpu().view(INT_VIEW[expected.dtype]).reshape(-1)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        raise AssertionError(f"{bad.numel()} of {a.numel()} elements differ, first at {bad[:8].tolist()}: "
                             f"{a[bad[:8]].tolist()} != {e[bad[:8]].tolist()}")


# ---- decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=param_id)
@pytest.mark.parametrize("n", SIZES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_decode_matches_reference(dtype, n, config):
    enc = encode(_weights(n, dtype, seed=n), *config)
    out = enc.decode()
    assert out.device.type == "cuda"
    assert_bits_equal(out, enc.reference_decode())
    assert_bits_equal(out, enc.original)


@pytest.mark.parametrize("config", [(64, 4), (256, 128)], ids=param_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_decode_every_16bit_pattern(dtype, config):
    # NaN payloads, +-Inf, -0.0, subnormals: the bits pass through untouched.
    t = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    enc = encode(t, *config)
    assert_bits_equal(enc.decode(), t)


@pytest.mark.parametrize("config", [(32, 2), (256, 128)], ids=param_id)
def test_decode_random_fp32_bit_patterns(config):
    g = torch.Generator().manual_seed(5)
    t = torch.randint(-(1 << 31), (1 << 31) - 1, (50_000,), generator=g, dtype=torch.int64).to(torch.int32)
    t = t.view(torch.float32)
    enc = encode(t, *config)
    assert_bits_equal(enc.decode(), t)


@pytest.mark.parametrize("config", [(64, 4), (256, 128)], ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_decode_dense_blocks_overflow_staging(dtype, config):
    t = _skewed(200_000, dtype)
    enc = encode(t, *config)
    assert_bits_equal(enc.decode(), t)


# ---- decode to bytes (uint8: the symbol is the byte, no raw bits) ----------------------------------

BYTE_KINDS = {"packed4": lambda n: packed_codes(n, bits=4, seed=n), "uniform": lambda n: uniform_bytes(n, seed=n)}


@pytest.mark.parametrize("config", CONFIGS, ids=param_id)
@pytest.mark.parametrize("n", SIZES, ids=param_id)
@pytest.mark.parametrize("kind", list(BYTE_KINDS))
def test_decode_bytes_matches_reference(kind, n, config):
    enc = encode(BYTE_KINDS[kind](n), *config)
    assert enc.raw.numel() == 0
    out = enc.decode()
    assert out.device.type == "cuda" and out.dtype == torch.uint8
    assert_bits_equal(out, enc.reference_decode())
    assert_bits_equal(out, enc.original)


@pytest.mark.parametrize("config", [(64, 4), (256, 128)], ids=param_id)
def test_decode_bytes_dense_blocks_overflow_staging(config):
    # First half one byte (1-bit codes), second half every byte: the dense blocks overflow staging.
    t = torch.cat([torch.full((100_000,), 7, dtype=torch.uint8), uniform_bytes(100_000)])
    assert_bits_equal(encode(t, *config).decode(), t)


def test_decode_every_byte_and_one_repeated_byte():
    t = every_byte().repeat(5)
    assert_bits_equal(encode(t, 32, 2).decode(), t)
    t = torch.full((1000,), 0xFF, dtype=torch.uint8)
    assert_bits_equal(encode(t, 32, 2).decode(), t)


def test_gemv_refuses_a_bytes_stream():
    enc = encode(packed_codes(12 * 40), 64, 4)
    x = torch.ones(3, 40, dtype=torch.uint8, device="cuda")
    with pytest.raises(TypeError, match="x must be one of bfloat16, float16, float32 .*got torch.uint8"):
        lowbit.ops.dfloat_gemv(x, *enc.stream, 12, enc.total_bits, 64, 4, backend="cuda")


@pytest.mark.parametrize("config", [(256, 1024), (64, 1000), (32, 1)], ids=param_id)
def test_decode_windows_per_block_extremes(config):
    t = _weights(300_001, torch.bfloat16, seed=3)
    enc = encode(t, *config)
    assert_bits_equal(enc.decode(), t)


def test_decode_single_symbol_and_empty():
    t = torch.full((1000,), 3.0, dtype=torch.bfloat16)  # one symbol: 1-bit code, all zero bits
    assert_bits_equal(encode(t, 32, 2).decode(), t)
    empty = encode(torch.zeros(0, dtype=torch.float16))
    assert empty.decode().shape == (0,)


def test_decode_inputs_at_odd_offsets():
    # Views at odd storage offsets: the kernels read words and 16-byte vectors, the glue copies them.
    t = _weights(10_001, torch.float32, seed=4)
    enc = encode(t, 64, 4)

    def shifted(x):
        base = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        base[1:] = x
        return base[1:]

    out = enc.decode(codes=shifted(enc.codes), raw=shifted(enc.raw), table=shifted(enc.table))
    assert_bits_equal(out, t)


@pytest.mark.slow
def test_decode_large_weight(large_bf16):
    assert_bits_equal(large_bf16.decode().reshape(large_bf16.original.shape), large_bf16.original)


def test_decompress_on_cuda():
    t = _weights((333, 77), torch.float16, seed=6).cuda()
    d = lowbit.dfloat.compress(t)
    assert_bits_equal(d.decompress(backend="cuda"), t)


def test_decode_opcheck():
    enc = encode(_weights(777, torch.bfloat16, seed=7), 64, 4)
    args = (*enc.stream, enc.n, torch.bfloat16, enc.total_bits, 64, 4)
    opcheck(torch.ops.lowbit.dfloat_decode.default, args)


def test_decode_checks_its_arguments():
    enc = encode(_weights(100, torch.bfloat16), 64, 4)
    native = torch.ops.lowbit.dfloat_decode
    with pytest.raises(RuntimeError, match="windows_per_block must be <= 1024"):
        # A stream shaped for 2048 windows per block: one block.
        native(enc.codes, enc.raw, enc.gaps, enc.block_starts[[0, -1]], enc.table, enc.n, torch.bfloat16,
               enc.total_bits, 64, 2048)
    with pytest.raises(RuntimeError, match="table must have 4096 entries"):
        native(enc.codes, enc.raw, enc.gaps, enc.block_starts, enc.table[:100], enc.n, torch.bfloat16,
               enc.total_bits, 64, 4)


# ---- corrupted streams -----------------------------------------------------------------------------


def _corrupted(enc: Encoded, what: str) -> dict:
    """Stream tensors to replace, for one kind of damage."""
    g = torch.Generator().manual_seed(8)
    codes, gaps = enc.codes.cpu().clone(), enc.gaps.cpu().clone()
    starts, table = enc.block_starts.cpu().clone(), enc.table.cpu().clone()
    if what == "no_code":  # the first code's bits match no entry any more
        table[table == table[(int(codes[0]) | (int(codes[1]) << 8)) & 0xFFF]] = 0
    elif what == "long_codes":  # entries of length 127
        table[:] = 0x7F05
    elif what == "block_start":
        starts[1] += 1
    elif what == "block_starts":
        starts[:] = torch.randint(-(10 ** 12), 10 ** 12, (starts.numel(),), generator=g)
    elif what == "gap":  # window 1 starts a bit later: window 0's last code overruns it
        gaps[0] ^= 0x10
    elif what == "gaps":
        gaps[:] = 0xFF
    elif what == "code_byte":
        codes[3] ^= 0xFF
    elif what == "codes":
        used = (enc.total_bits + 7) // 8
        codes[:used] = torch.randint(0, 256, (used,), generator=g, dtype=torch.uint8)
    fields = {"codes": codes, "gaps": gaps, "block_starts": starts, "table": table}
    return {k: v.cuda() for k, v in fields.items()}


CORRUPTIONS = ["no_code", "long_codes", "block_start", "block_starts", "gap", "gaps", "code_byte", "codes"]


@pytest.mark.parametrize("config", [(32, 2), (256, 128)], ids=param_id)
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_decode_rejects_corrupted_stream(what, config):
    enc = encode(_weights((97, 33), torch.bfloat16, seed=6), *config)
    with pytest.raises(FormatError, match="corrupted dfloat stream"):
        enc.decode(**_corrupted(enc, what))
    torch.cuda.synchronize()  # nothing was read or written out of bounds
    assert_bits_equal(enc.decode().reshape(97, 33), enc.original)


@pytest.mark.parametrize("config", [(32, 2), (256, 128)], ids=param_id)
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_gemv_corrupted_stream_gives_nan(what, config):
    # A forward pass never waits for the host: the flag turns the whole output into NaN on the device.
    enc = encode(_weights((97, 33), torch.bfloat16, seed=6), *config)
    x = torch.randn(3, 33, device="cuda").to(torch.bfloat16)
    bias = torch.randn(97, device="cuda").to(torch.bfloat16)
    y = dataclasses.replace(enc, **_corrupted(enc, what)).gemv(x, bias)
    assert bool(y.isnan().all())
    assert not bool(enc.gemv(x, bias).isnan().any())


def test_decode_and_gemv_in_cuda_graph():
    # decode skips its flag check (a host read) while the stream is captured; gemv has none.
    w = _weights((64, 256), torch.bfloat16, seed=16)
    enc = encode(w, 64, 4)
    x = torch.randn(2, 256, device="cuda").to(torch.bfloat16)
    assert_bits_equal(run_in_cuda_graph(enc.decode).reshape(64, 256), w)
    want = (x.float().cpu() @ w.float().T).to(torch.bfloat16)
    assert_gemv_close(run_in_cuda_graph(lambda: enc.gemv(x)), x, w, None, want)


# ---- gemv ------------------------------------------------------------------------------------------


def assert_gemv_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, expected: torch.Tensor) -> None:
    """y and expected: [B, out] in x's dtype. Tolerance: 4 eps(dtype) (sum_k |x_k| |w_k| + |bias|)."""
    assert y.dtype == expected.dtype == x.dtype and y.shape == expected.shape
    scale = x.float().abs().cpu() @ w.float().abs().cpu().T
    if bias is not None:
        scale = scale + bias.float().abs().cpu()
    tol = 4 * torch.finfo(x.dtype).eps * scale
    err = (y.float().cpu() - expected.float().cpu()).abs()
    worst = int((err - tol).flatten().argmax())
    assert bool((err <= tol).all()), (f"|y - expected| = {err.flatten()[worst].item():.3g} > tol "
                                      f"{tol.flatten()[worst].item():.3g} at {divmod(worst, y.shape[1])}")


GEMV_SHAPES = [(1, 1), (7, 9), (33, 64), (97, 24), (5, 1000), (64, 4104), (300, 8)]


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("batch", [1, 3, 8], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_gemv_matches_reference(dtype, shape, batch, has_bias):
    out_features, in_features = shape
    config = CONFIGS[(out_features + batch) % len(CONFIGS)]
    w = _weights(shape, dtype, seed=out_features * 7 + in_features, scale=0.05)
    enc = encode(w, *config)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, in_features, generator=g).to(dtype).cuda()
    bias = torch.randn(out_features, generator=g).to(dtype).cuda() if has_bias else None
    y = enc.gemv(x, bias)
    assert y.device.type == "cuda"
    expected = ref.gemv(x.cpu(), *(t.cpu() for t in enc.stream), out_features, enc.total_bits, *config,
                        None if bias is None else bias.cpu())
    assert_gemv_close(y, x, w, bias, expected)


@pytest.mark.parametrize("batch", [9, 17], ids=lambda b: f"B{b}")
def test_gemv_batches_over_8(batch):
    w = _weights((40, 96), torch.bfloat16, seed=10)
    enc = encode(w, 64, 4)
    x = torch.randn(batch, 96, dtype=torch.bfloat16, device="cuda")
    expected = (x.float().cpu() @ w.float().T).to(torch.bfloat16)
    assert_gemv_close(enc.gemv(x), x, w, None, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_gemv_dense_blocks_overflow_staging(dtype):
    w = _skewed((256, 512), dtype, seed=11)
    enc = encode(w, 64, 4)
    x = torch.randn(3, 512, device="cuda").to(dtype)
    expected = (x.float().cpu() @ w.float().T).to(dtype)
    assert_gemv_close(enc.gemv(x), x, w, None, expected)


def test_gemv_empty_shapes():
    x = torch.randn(2, 0, dtype=torch.float16, device="cuda")
    bias = torch.randn(5, dtype=torch.float16, device="cuda")
    enc = encode(torch.zeros(5, 0, dtype=torch.float16))
    assert torch.equal(enc.gemv(x, bias).cpu(), bias.cpu().expand(2, 5))  # W @ x = 0: the bias alone
    enc = encode(torch.zeros(0, 8, dtype=torch.float16))
    assert enc.gemv(torch.randn(2, 8, dtype=torch.float16, device="cuda")).shape == (2, 0)


def test_gemv_x_at_odd_offset():
    w = _weights((16, 64), torch.bfloat16, seed=12)
    enc = encode(w, 64, 4)
    base = torch.randn(2 * 64 + 1, device="cuda").to(torch.bfloat16)
    x = base[1:].view(2, 64)
    assert x.data_ptr() % 16 != 0
    expected = (x.float().cpu() @ w.float().T).to(torch.bfloat16)
    assert_gemv_close(enc.gemv(x), x, w, None, expected)


@pytest.mark.slow
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("batch", [1, 3, 8], ids=lambda b: f"B{b}")
def test_gemv_large_weight(large_bf16, batch, has_bias):
    w = large_bf16.original
    g = torch.Generator().manual_seed(13)
    x = torch.randn(batch, w.shape[1], generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(w.shape[0], generator=g).to(torch.bfloat16).cuda() if has_bias else None
    expected = x.float() @ w.cuda().float().T  # the reference GEMV on the original weight
    if bias is not None:
        expected = expected + bias.float()
    assert_gemv_close(large_bf16.gemv(x, bias), x, w, bias, expected.to(torch.bfloat16))


def test_gemv_opcheck():
    w = _weights((12, 40), torch.float16, seed=14)
    enc = encode(w, 64, 4)
    x = torch.randn(3, 40, dtype=torch.float16, device="cuda")
    bias = torch.randn(12, dtype=torch.float16, device="cuda")
    args = (x, *enc.stream, 12, enc.total_bits, 64, 4, bias)
    opcheck(torch.ops.lowbit.dfloat_gemv.default, args)


@pytest.fixture(scope="module")
def large_bf16():
    """A 4096 x 4096 bf16 weight and its stream (default window layout). The reference decoder is a
    Python loop per symbol, too slow at this size, so tests compare with the original weight, which
    the reference decodes back bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is visible")
    skip_unless_available("cuda", "cuda")
    return encode(_weights((4096, 4096), torch.bfloat16, seed=15))
