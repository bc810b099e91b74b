"""dfloat: lossless round trips on every CPU backend, the stored form, and bad or corrupted input."""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.dfloat import DFloatTensor, compress
from lowbit.errors import FormatError
from lowbit.reference import dfloat as ref

from conftest import skip_unless_available
from dfloat_data import (all_16bit_patterns, bits_view, every_byte, minilm_weight, packed_codes, random_fp32_patterns,
                         uniform_bytes)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
DECODE_BACKENDS = ["reference", "cpu", "triton"]


def _cases():
    """(id, tensor factory) pairs: real weights, every bit pattern, specials, odd shapes."""
    yield "minilm", lambda dt: minilm_weight()[:96].to(dt)
    yield "all-patterns", lambda dt: (all_16bit_patterns(dt) if dt != torch.float32 else random_fp32_patterns(70000))
    yield "specials", lambda dt: torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45,
                                               65504.0, 3.0e38], dtype=torch.float32).to(dt)
    yield "one", lambda dt: torch.tensor([1.5], dtype=dt)
    yield "constant-97", lambda dt: torch.full((97,), 0.25, dtype=dt)
    yield "empty", lambda dt: torch.zeros(0, 5, dtype=dt)
    yield "3d-odd", lambda dt: (torch.randn(3, 7, 1025, generator=torch.Generator().manual_seed(0)) * 0.02).to(dt)


CASES = list(_cases())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_round_trip_is_bit_exact(backend, make, dtype):
    skip_unless_available(backend, "cpu")
    x = make(dtype)
    if backend == "triton" and x.numel() > 600:
        x = x.reshape(-1)[:600]  # the interpreter is slow; test_dfloat_triton.py has the full sets
    d = compress(x, window_bits=64, windows_per_block=4)  # many windows and blocks
    y = d.decompress(backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(bits_view(y), bits_view(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("layout", [(256, 128), (32, 1), (512, 3)], ids=["w256g128", "w32g1", "w512g3"])
def test_cpu_encoder_matches_reference_encoder(make, dtype, layout):
    skip_unless_available("cpu", "cpu")
    x = make(dtype)
    ours = compress(x, window_bits=layout[0], windows_per_block=layout[1], backend="cpu").to_dict()
    spec = compress(x, window_bits=layout[0], windows_per_block=layout[1], backend="reference").to_dict()
    assert ours.keys() == spec.keys()
    for key in ours:
        assert torch.equal(ours[key], spec[key]), key


# -- uint8 ("bytes"): the symbol is the whole byte, there are no raw bits ----------------------------

BYTE_SIZES = [0, 1, 7, 97, 1025, 65537]
BYTE_KINDS = {
    "packed4": lambda n: packed_codes(n, bits=4, seed=n),  # 4-bit codes two to a byte: skewed bytes
    "packed2": lambda n: packed_codes(n, bits=2, seed=n),
    "uniform": lambda n: uniform_bytes(n, seed=n),
}
# Triton's interpreter runs a program per block: at 65537 bytes it takes the default layout (9
# blocks, seconds) rather than blocks of four 64-bit windows (over a thousand, minutes).
TRITON_MAX_BYTES = 1025


def _byte_params():
    for backend in DECODE_BACKENDS:
        for n in BYTE_SIZES:
            layout = (256, 128) if backend == "triton" and n > TRITON_MAX_BYTES else (64, 4)
            for kind in BYTE_KINDS:
                yield pytest.param(backend, n, kind, layout, id=f"{backend}-n{n}-{kind}-w{layout[0]}x{layout[1]}")


@pytest.mark.parametrize("backend,n,kind,layout", list(_byte_params()))
def test_bytes_round_trip_is_bit_exact(backend, n, kind, layout):
    skip_unless_available(backend, "cpu")
    x = BYTE_KINDS[kind](n)
    d = compress(x, window_bits=layout[0], windows_per_block=layout[1])
    assert d.dtype == torch.uint8 and d.raw.numel() == 0
    y = d.decompress(backend=backend)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("case", ["every-byte", "every-byte-repeated", "one-value-97", "one-value-65537", "2d"])
def test_bytes_special_cases_round_trip(backend, case):
    skip_unless_available(backend, "cpu")
    x = {
        "every-byte": every_byte,
        "every-byte-repeated": lambda: every_byte().repeat(3),
        "one-value-97": lambda: torch.full((97,), 0xA5, dtype=torch.uint8),  # one symbol: 1-bit codes
        "one-value-65537": lambda: torch.full((65537,), 0, dtype=torch.uint8),
        "2d": lambda: packed_codes(7 * 97).reshape(7, 97),
    }[case]()
    layout = (256, 128) if backend == "triton" and x.numel() > TRITON_MAX_BYTES else (64, 4)
    d = compress(x, window_bits=layout[0], windows_per_block=layout[1])
    y = d.decompress(backend=backend)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("kind", list(BYTE_KINDS))
@pytest.mark.parametrize("n", BYTE_SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("layout", [(256, 128), (32, 1), (512, 3)], ids=["w256g128", "w32g1", "w512g3"])
def test_cpu_encoder_matches_reference_encoder_on_bytes(layout, n, kind):
    skip_unless_available("cpu", "cpu")
    x = BYTE_KINDS[kind](n)
    ours = compress(x, window_bits=layout[0], windows_per_block=layout[1], backend="cpu").to_dict()
    spec = compress(x, window_bits=layout[0], windows_per_block=layout[1], backend="reference").to_dict()
    assert ours.keys() == spec.keys()
    for key in ours:
        assert torch.equal(ours[key], spec[key]), key


def test_skewed_bytes_compress_to_near_their_entropy():
    x = packed_codes(65537, bits=4)
    d = compress(x)
    bound = lowbit.dfloat.entropy_bound(x)
    assert bound["symbol"] == bound["exponent"]  # the byte is the symbol: nothing is stored raw
    assert bound["symbol"] < 5  # skewed data: two peaked 4-bit codes of ~2.1 bits of entropy each
    p_max = float(torch.bincount(x.long()).max()) / x.numel()
    # A Huffman code is within p_max + 0.086 bits of the entropy (Gallager, 1978); the 12-bit limit
    # only lengthens codes of bytes rarer than 2^-12, a negligible share of these data.
    assert bound["symbol"] <= d.total_bits / x.numel() < bound["symbol"] + p_max + 0.086
    assert d.nbytes < 0.6 * x.numel()  # everything stored counted: well under a byte per byte


def test_uniform_bytes_cost_about_a_byte_each():
    x = uniform_bytes(65537)
    d = compress(x)
    assert torch.equal(d.decompress(), x)
    # Eight-bit codes, a 4-bit gap per 256-bit window (1/8 bit a byte), lengths, header, block starts.
    assert 8.125 < d.bits_per_weight < 8.2


def test_large_tensor_uses_many_threads_and_round_trips():
    skip_unless_available("cpu", "cpu")
    x = (torch.randn(2048, 1536, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    d = compress(x)
    assert torch.equal(bits_view(d.decompress(backend="cpu")), bits_view(x))
    spec = compress(x[:4], backend="reference")
    assert torch.equal(bits_view(spec.decompress(backend="cpu")), bits_view(x[:4]))


def test_non_contiguous_input_is_not_modified():
    base = (torch.randn(64, 48) * 0.02).to(torch.bfloat16)
    before = base.clone()
    view = base.t()[::2]
    d = compress(view)
    assert torch.equal(bits_view(d.decompress()), bits_view(view.contiguous()))
    assert torch.equal(bits_view(base), bits_view(before))


def test_bits_per_weight_counts_everything_stored():
    x = minilm_weight().to(torch.bfloat16)
    d = compress(x)
    stored = d.to_dict()
    assert d.nbytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert d.bits_per_weight == pytest.approx(8 * d.nbytes / x.numel())
    bound = lowbit.dfloat.entropy_bound(x)["exponent"]
    assert bound < d.bits_per_weight < bound + 0.15  # the benchmark reports the exact margin


def test_stored_form_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    x = minilm_weight()[:50].to(torch.float16)
    d = compress(x)
    save_file(d.to_dict(prefix="w."), str(tmp_path / "w.safetensors"))
    back = DFloatTensor.from_dict(load_file(str(tmp_path / "w.safetensors")), prefix="w.")
    assert back.shape == x.shape and back.dtype == x.dtype
    assert torch.equal(bits_view(back.decompress()), bits_view(x))


def test_stored_bytes_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    x = packed_codes(97 * 5).reshape(5, 97)
    d = compress(x)
    stored = d.to_dict(prefix="kv.")
    assert stored["kv.header"][2] == 4  # the dtype code of uint8
    assert stored["kv.raw"].shape == (0,)
    save_file(stored, str(tmp_path / "kv.safetensors"))
    back = DFloatTensor.from_dict(load_file(str(tmp_path / "kv.safetensors")), prefix="kv.")
    assert back.shape == x.shape and back.dtype == torch.uint8
    assert torch.equal(back.decompress(), x)


def test_compress_state_dict_keeps_integer_tensors_as_they_are():
    """uint8 tensors of a checkpoint (quantized codes, masks) are not weights to compress."""
    sd = {"w": minilm_weight()[:8].to(torch.bfloat16), "codes": packed_codes(4096)}
    stored = lowbit.dfloat.compress_state_dict(sd, progress=False)
    assert torch.equal(stored["tensor:codes"], sd["codes"])
    assert "dfloat:header:w" in stored
    back = lowbit.dfloat.decompress_state_dict(stored)
    assert torch.equal(back["codes"], sd["codes"]) and torch.equal(bits_view(back["w"]), bits_view(sd["w"]))


def test_non_float_and_unsupported_input_is_refused():
    with pytest.raises(TypeError, match="t must be a bfloat16, float16, float32 or uint8 tensor, got torch.int32"):
        compress(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="got torch.int8"):
        compress(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(TypeError, match="got torch.float64"):
        compress(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        compress([1.0, 2.0])
    with pytest.raises(ValueError, match="window_bits must be a multiple of 32"):
        compress(torch.zeros(3), window_bits=48)


# -- corrupted stored forms ----------------------------------------------------------------------


def _stored(dtype=torch.bfloat16):
    x = packed_codes(40 * 384) if dtype == torch.uint8 else minilm_weight()[:40].to(dtype)
    return compress(x, window_bits=64, windows_per_block=4).to_dict()


STORED_PARAMS = [pytest.param(key, dtype, id=f"{key}-{str(dtype).removeprefix('torch.')}")
                 for dtype in (torch.bfloat16, torch.uint8)
                 for key in ("codes", "raw", "gaps", "block_starts", "code_lengths")
                 if not (dtype == torch.uint8 and key == "raw")]  # a uint8 stream has no raw bytes


@pytest.mark.parametrize("key,dtype", STORED_PARAMS)
def test_altered_byte_is_refused(key, dtype):
    d = _stored(dtype)
    t = d[key].clone()
    flat = t.view(torch.uint8)
    flat[len(flat) // 2] ^= 0x10
    d[key] = t
    with pytest.raises(FormatError):
        DFloatTensor.from_dict(d)


@pytest.mark.parametrize("key,dtype", [p for p in STORED_PARAMS if p.values[0] != "code_lengths"])
def test_truncated_tensor_is_refused(key, dtype):
    d = _stored(dtype)
    d[key] = d[key][:-1]
    with pytest.raises(FormatError):
        DFloatTensor.from_dict(d)


def test_raw_bytes_in_a_uint8_stream_are_refused():
    d = _stored(torch.uint8)
    with pytest.raises(FormatError, match="raw has 1 elements, expected 0"):
        DFloatTensor.from_dict({**d, "raw": torch.zeros(1, dtype=torch.uint8)})


def test_unknown_dtype_code_is_refused():
    for dtype in (torch.bfloat16, torch.uint8):
        d = _stored(dtype)
        for code in (0, 5):
            header = d["header"].clone()
            header[2] = code
            with pytest.raises(FormatError, match=f"unknown dtype code {code} in header"):
                DFloatTensor.from_dict({**d, "header": header})


def test_other_version_missing_key_and_foreign_data_are_refused():
    d = _stored()
    header = d["header"].clone()
    header[1] = 2
    with pytest.raises(FormatError, match="format version 2; this lowbit reads version 1"):
        DFloatTensor.from_dict({**d, "header": header})
    with pytest.raises(FormatError, match="missing gaps"):
        DFloatTensor.from_dict({k: v for k, v in d.items() if k != "gaps"})
    with pytest.raises(FormatError, match="magic"):
        DFloatTensor.from_dict({**d, "header": torch.zeros_like(d["header"])})
    header = d["header"].clone()
    header[-1] += 1  # shape disagrees with n
    with pytest.raises(FormatError, match="shape"):
        DFloatTensor.from_dict({**d, "header": header})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "uint8"])
def test_fuzzed_streams_never_crash_the_cpu_decoder(dtype):
    """Random corruptions fed straight to the C++ decoder (past the checksum): each must decode
    to something or raise a clean error; out-of-bounds reads would crash or trip the sanitizer."""
    skip_unless_available("cpu", "cpu")
    g = torch.Generator().manual_seed(123)
    x = packed_codes(64 * 384) if dtype == torch.uint8 else minilm_weight()[:64].to(torch.bfloat16)
    d = compress(x, window_bits=64, windows_per_block=4)
    n = x.numel()
    errors = 0
    for trial in range(400):
        codes, raw, gaps, starts = d.codes.clone(), d.raw.clone(), d.gaps.clone(), d.block_starts.clone()
        target = [codes, gaps, starts, "table"][trial % 4]
        table = d.table.clone()
        if target == "table":
            idx = torch.randint(0, table.numel(), (8,), generator=g)
            table[idx] = torch.randint(-(1 << 15), 1 << 15, (8,), generator=g, dtype=torch.int32).to(torch.int16)
        elif target is starts:
            i = int(torch.randint(0, starts.numel(), (1,), generator=g))
            starts[i] = int(torch.randint(-5, n + 5, (1,), generator=g))
        else:
            flat = target.view(torch.uint8)
            for _ in range(3):
                i = int(torch.randint(0, flat.numel(), (1,), generator=g))
                flat[i] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            out = torch.ops.lowbit.dfloat_decode(codes, raw, gaps, starts, table, n, dtype,
                                                         d.total_bits, d.window_bits, d.windows_per_block)
            assert out.shape == (n,)
        except (ValueError, RuntimeError) as exc:
            assert "dfloat" in str(exc) or "block_starts" in str(exc) or "corrupt" in str(exc), exc
            errors += 1
    assert errors > 100  # most corruptions are detected by the decoder itself


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_errors_name_the_problem(backend):
    skip_unless_available(backend, "cpu")
    d = compress(minilm_weight()[:8].to(torch.bfloat16))
    with pytest.raises(FormatError, match="raw has"):
        lowbit.ops.dfloat_decode(d.codes, d.raw[:-1], d.gaps, d.block_starts, d.table, d.numel(), d.dtype,
                                 d.total_bits, d.window_bits, d.windows_per_block, backend=backend)
    with pytest.raises(TypeError, match="dtype must be one of bfloat16, float16, float32, uint8, got torch.int8"):
        lowbit.ops.dfloat_decode(d.codes, d.raw, d.gaps, d.block_starts, d.table, d.numel(), torch.int8,
                                 d.total_bits, d.window_bits, d.windows_per_block, backend=backend)
    b = compress(packed_codes(97))
    with pytest.raises(FormatError, match="raw has 97 elements, expected 0"):  # a bf16 stream's raw bytes
        lowbit.ops.dfloat_decode(b.codes, torch.zeros(97, dtype=torch.uint8), b.gaps, b.block_starts, b.table, 97,
                                 torch.uint8, b.total_bits, b.window_bits, b.windows_per_block, backend=backend)


def _corrupt_bytes_stream(d, what):
    codes, gaps, starts, table = d.codes.clone(), d.gaps.clone(), d.block_starts.clone(), d.table.clone()
    if what == "no_code":  # the first code's peek starts no code
        table[table == table[(int(codes[0]) | (int(codes[1]) << 8)) & 0xFFF]] = 0
    elif what == "block_starts":
        starts[1] += 1
    elif what == "gap":
        # Window 2, the first of block 1 (the CPU decoder checks the chain at block boundaries),
        # starts a bit off: window 1's last code does not end there.
        gaps[1] ^= 0x01
    return codes, d.raw, gaps, starts, table


@pytest.mark.parametrize("what", ["no_code", "block_starts", "gap"])
@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_corrupted_bytes_streams_are_refused(backend, what):
    skip_unless_available(backend, "cpu")
    d = compress(packed_codes(97), window_bits=32, windows_per_block=2)
    bad = _corrupt_bytes_stream(d, what)
    with pytest.raises(FormatError, match="corrupted dfloat stream"):
        lowbit.ops.dfloat_decode(*bad, 97, torch.uint8, d.total_bits, 32, 2, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "uint8"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_decode(backend, dtype):
    skip_unless_available(backend, "cpu")
    x = packed_codes(4 * 384) if dtype == torch.uint8 else minilm_weight()[:4].to(dtype)
    d = compress(x, window_bits=64, windows_per_block=2)
    opcheck(lowbit.ops.op("dfloat_decode", backend, "cpu"),
            (*d.stream_args(), d.numel(), d.dtype, d.total_bits, d.window_bits, d.windows_per_block))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_encoder_steps_on_bytes(backend):
    skip_unless_available(backend, "cpu")
    from lowbit.dfloat.format import codewords

    x = packed_codes(1025)
    counts = lowbit.ops.op("dfloat_histogram", backend, "cpu")(x)
    lengths = ref.code_lengths(counts)
    total = int((counts * lengths.long()).sum())
    opcheck(lowbit.ops.op("dfloat_histogram", backend, "cpu"), (x,))
    opcheck(lowbit.ops.op("dfloat_encode", backend, "cpu"), (x, lengths, codewords(lengths), total, 64, 4))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_encoder_steps_refuse_other_dtypes(backend):
    skip_unless_available(backend, "cpu")
    x = torch.zeros(5, dtype=torch.int32)
    lengths = torch.zeros(256, dtype=torch.uint8)
    lengths[0] = 1
    want = "x must be one of bfloat16, float16, float32, uint8, got torch.int32"
    with pytest.raises(TypeError, match=want):
        lowbit.ops.op("dfloat_histogram", backend, "cpu")(x)
    with pytest.raises(TypeError, match=want):
        lowbit.ops.op("dfloat_encode", backend, "cpu")(x, lengths, torch.zeros(256, dtype=torch.int32), 5, 64, 4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gemv_refuses_a_bytes_stream(backend):
    """A uint8 stream decodes, but it is no weight: dfloat_gemv names x and the float dtypes."""
    skip_unless_available(backend, "cpu")
    d = compress(packed_codes(3 * 8), window_bits=64, windows_per_block=2)
    x = torch.ones(2, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="x must be one of bfloat16, float16, float32 .*got torch.uint8"):
        lowbit.ops.dfloat_gemv(x, *d.stream_args(), 3, d.total_bits, d.window_bits, d.windows_per_block,
                               backend=backend)


def test_opcheck_gemv_reference():
    d = compress(minilm_weight()[:24].to(torch.float32), window_bits=64, windows_per_block=2)
    x = torch.randn(3, 384)
    opcheck(lowbit.ops.op("dfloat_gemv", "reference", "cpu"),
            (x, *d.stream_args(), 24, d.total_bits, d.window_bits, d.windows_per_block, None))


def test_native_encoder_refuses_inconsistent_code_tables():
    skip_unless_available("cpu", "cpu")
    from lowbit.dfloat.format import codewords

    x = minilm_weight()[:4].to(torch.bfloat16)
    counts = ref.histogram(ref.split_fields(x)[0])
    lengths = ref.code_lengths(counts)
    total = int((counts * lengths.long()).sum())
    with pytest.raises(ValueError, match="total_bits disagrees"):
        torch.ops.lowbit.dfloat_encode(x, lengths, codewords(lengths), total - 1, 256, 128)
    missing = lengths.clone()
    missing[int(counts.argmax())] = 0
    with pytest.raises(ValueError, match="has no code"):
        torch.ops.lowbit.dfloat_encode(x, missing, codewords(lengths), total, 256, 128)


def test_native_encoder_refuses_codes_and_windows_beyond_the_format():
    """The decoders peek 12 bits and the gaps hold 4: the C++ encoder refuses a longer code (which
    it would write but no decoder could read) and window shapes beyond the format's limits."""
    skip_unless_available("cpu", "cpu")
    from lowbit.dfloat.format import codewords

    x = minilm_weight()[:4].to(torch.bfloat16)
    counts = ref.histogram(ref.split_fields(x)[0])
    lengths = ref.code_lengths(counts)
    total = int((counts * lengths.long()).sum())
    words = codewords(lengths)
    long = lengths.clone()
    s = int(counts.argmax())
    long[s] = 40
    with pytest.raises(ValueError, match=f"lengths\\[{s}\\] = 40: codes are at most 12 bits long"):
        torch.ops.lowbit.dfloat_encode(x, long, words, total, 256, 128)
    for window_bits, windows_per_block in ((1 << 21, 128), (48, 128), (256, 1025), (256, 0)):
        with pytest.raises(ValueError, match="window_bits must be a multiple of 32"):
            torch.ops.lowbit.dfloat_encode(x, lengths, words, total, window_bits, windows_per_block)
        with pytest.raises(ValueError, match="window_bits must be a multiple of 32"):
            compress(x, window_bits=window_bits, windows_per_block=windows_per_block)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_decoders_refuse_window_shapes_beyond_the_format(backend):
    skip_unless_available(backend, "cpu")
    d = compress(minilm_weight()[:2].to(torch.bfloat16))
    with pytest.raises(FormatError, match="window_bits must be a multiple of 32"):
        lowbit.ops.dfloat_decode(*d.stream_args(), d.numel(), d.dtype, d.total_bits, 1 << 21, d.windows_per_block,
                                 backend=backend)
    if backend == "cpu":  # the native op alone: the same words, as a ValueError starting "corrupted"
        with pytest.raises(ValueError, match="^corrupted dfloat stream: window_bits must be"):
            torch.ops.lowbit.dfloat_decode(*d.stream_args(), d.numel(), d.dtype, d.total_bits, 1 << 21,
                                           d.windows_per_block)
