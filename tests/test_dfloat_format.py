"""dfloat: lossless round trips on every CPU backend, the stored form, and bad or corrupted input."""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.dfloat import DFloatTensor, compress
from lowbit.errors import FormatError
from lowbit.reference import dfloat as ref

from conftest import skip_unless_available
from dfloat_data import all_16bit_patterns, bits_view, minilm_weight, random_fp32_patterns

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


def test_non_float_and_unsupported_input_is_refused():
    with pytest.raises(TypeError, match="t must be a bfloat16, float16 or float32 tensor, got torch.int32"):
        compress(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="got torch.float64"):
        compress(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        compress([1.0, 2.0])
    with pytest.raises(ValueError, match="window_bits must be a multiple of 32"):
        compress(torch.zeros(3), window_bits=48)


# -- corrupted stored forms ----------------------------------------------------------------------


def _stored(dtype=torch.bfloat16):
    return compress(minilm_weight()[:40].to(dtype), window_bits=64, windows_per_block=4).to_dict()


@pytest.mark.parametrize("key", ["codes", "raw", "gaps", "block_starts", "code_lengths"])
def test_altered_byte_is_refused(key):
    d = _stored()
    t = d[key].clone()
    flat = t.view(torch.uint8)
    flat[len(flat) // 2] ^= 0x10
    d[key] = t
    with pytest.raises(FormatError):
        DFloatTensor.from_dict(d)


@pytest.mark.parametrize("key", ["codes", "raw", "gaps", "block_starts"])
def test_truncated_tensor_is_refused(key):
    d = _stored()
    d[key] = d[key][:-1]
    with pytest.raises(FormatError):
        DFloatTensor.from_dict(d)


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


def test_fuzzed_streams_never_crash_the_cpu_decoder():
    """Random corruptions fed straight to the C++ decoder (past the checksum): each must decode
    to something or raise a clean error; out-of-bounds reads would crash or trip the sanitizer."""
    skip_unless_available("cpu", "cpu")
    g = torch.Generator().manual_seed(123)
    x = minilm_weight()[:64].to(torch.bfloat16)
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
            out = torch.ops.lowbit.dfloat_decode(codes, raw, gaps, starts, table, n, torch.bfloat16,
                                                         d.total_bits, d.window_bits, d.windows_per_block)
            assert out.shape == (n,)
        except (ValueError, RuntimeError) as exc:
            assert "dfloat" in str(exc) or "block_starts" in str(exc) or "corrupt" in str(exc), exc
            errors += 1
    assert errors > 100  # most corruptions are detected by the decoder itself


def test_decode_errors_name_the_problem():
    d = compress(minilm_weight()[:8].to(torch.bfloat16))
    with pytest.raises(FormatError, match="raw has"):
        lowbit.ops.dfloat_decode(d.codes, d.raw[:-1], d.gaps, d.block_starts, d.table, d.numel(), d.dtype,
                                 d.total_bits, d.window_bits, d.windows_per_block)
    with pytest.raises(TypeError, match="dtype must be one of"):
        lowbit.ops.dfloat_decode(d.codes, d.raw, d.gaps, d.block_starts, d.table, d.numel(), torch.int8,
                                 d.total_bits, d.window_bits, d.windows_per_block)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_decode(backend):
    skip_unless_available(backend, "cpu")
    d = compress(minilm_weight()[:4].to(torch.bfloat16), window_bits=64, windows_per_block=2)
    opcheck(lowbit.ops.op("dfloat_decode", backend, "cpu"),
            (*d.stream_args(), d.numel(), d.dtype, d.total_bits, d.window_bits, d.windows_per_block))


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
