"""CodebookLinear (python/lowbit/codebook/linear.py) and its encoder: the module protocol (meta
construction, assign-loading, config and state-dict round trips, the dtype policy, refusals of
altered and foreign stored forms, compile), AQLM state dicts, and the encoder's determinism, quality
against scalar 2-bit rounding and use of calibration."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.codebook import encode
from lowbit.codebook.demo import sqnr_db
from lowbit.evaluation import rtn
from lowbit.errors import FormatError
from lowbit.nn import CodebookLinear
from lowbit.reference import codebook as ref

from conftest import param_id, skip_unless_available
from helpers import codebook_bound, seeded_linear

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CONFIGS = [(2, 8, 8), (1, 8, 4), (1, 16, 8)]


@pytest.fixture(autouse=True)
def _native():
    skip_unless_available("cpu", "cpu")


def _module(config=(2, 8, 8), dtype=torch.bfloat16, bias=True, size=(64, 7), seed=0, **options):
    count, bits, g = config
    linear = seeded_linear(*size, bias, dtype, seed=seed)
    return CodebookLinear.from_linear(linear, count, bits, g, kmeans_iterations=3, refinements=1, **options), linear


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _options(module):
    return {k: v for k, v in module.config().items() if k not in ("family", "in_features", "out_features", "bias",
                                                                  "dtype")}


def _x(rows, features, dtype, seed=1):
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "%dx%d-g%d" % c)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_forward_is_the_reference_product_of_its_stored_form(config, dtype):
    module, _ = _module(config, dtype)
    for x in (_x(1, 64, dtype), _x(40, 64, dtype)):
        want = ref.matmul(x, module.codes, module.codebooks, module.scales, module.bias)
        bound = codebook_bound(x, module.codes, module.codebooks, module.scales, module.bias, want)
        assert bool(((module(x).double() - want.double()).abs() <= bound).all())
    assert module(_x(6, 64, dtype).reshape(2, 3, 64)).shape == (2, 3, 7)


@pytest.mark.parametrize("build", ["device_arg", "from_config"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_empty_meta_module_loads_by_assign_to_identical_outputs(build, bias, monkeypatch):
    original, _ = _module(bias=bias)
    config = original.config()
    assert json.loads(json.dumps(config)) == config
    monkeypatch.setattr("lowbit.codebook.linear.encode", lambda *a, **k: pytest.fail("an encoder ran"))
    if build == "device_arg":
        empty = CodebookLinear(64, 7, bias, dtype=torch.bfloat16, device="meta")
    else:
        empty = CodebookLinear.from_config(json.loads(json.dumps(config)), device="meta")
    assert all(t.device.type == "meta" for t in [*empty.buffers(), *empty.state_dict().values()])
    assert set(empty.state_dict()) == set(original.state_dict())
    repr(empty)
    empty.load_state_dict(original.state_dict(), assign=True)
    assert empty.config() == config and repr(empty) == repr(original)
    x = _x(5, 64, torch.bfloat16)
    assert _same_bits(empty(x), original(x))
    assert _same_bits(empty.dequantize(), original.dequantize())


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_state_dict_round_trip_through_torch_save(dtype):
    original, _ = _module(dtype=dtype)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    into = CodebookLinear(64, 7, True, dtype=dtype, **_options(original))
    into.load_state_dict(state)
    x = _x(3, 64, dtype)
    assert _same_bits(into(x), original(x))


@pytest.mark.parametrize("conversion", [torch.float16, torch.float32, torch.bfloat16], ids=param_id)
def test_dtype_conversion_changes_compute_dtype_and_never_reencodes(conversion, monkeypatch):
    module, _ = _module(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in module.state_dict().items() if k != "bias"}
    monkeypatch.setattr("lowbit.codebook.linear.encode", lambda *a, **k: pytest.fail("an encoder ran"))
    module.to(conversion)
    assert module.dtype == conversion and module.bias.dtype == conversion
    for key, t in module.state_dict().items():  # codes, codebooks, scales keep their stored bits
        if key in before and not key.endswith("header"):
            assert t.dtype == before[key].dtype and torch.equal(t, before[key]), key
    x = _x(4, 64, conversion)
    assert module(x).dtype == conversion and module.dequantize().dtype == conversion
    with pytest.raises(TypeError, match="float64"):
        module.double()
    assert module.dtype == conversion


STORED = ["codes", "codebooks", "scales", "bias", "weight_header"]


def _flipped(state, key, position):
    state = {k: v.clone() for k, v in state.items()}
    raw = state[key].reshape(-1).view(torch.uint8)
    raw[position % raw.numel()] ^= 0x01
    return state


@pytest.mark.parametrize("key", STORED)
def test_every_stored_tensor_refuses_a_flipped_byte(key):
    original, _ = _module()
    target, _ = _module(seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = original.state_dict()
    nbytes = state[key].numel() * state[key].element_size()
    for position in sorted({0, nbytes // 2, nbytes - 1}):
        with pytest.raises(RuntimeError, match="checksum mismatch|magic number|format version|header"):
            target.load_state_dict(_flipped(state, key, position))
    for k, t in target.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_missing_truncated_and_foreign_state_dicts_are_refused():
    original, linear = _module()
    target, _ = _module(seed=5)
    state = original.state_dict()
    with pytest.raises(RuntimeError):
        target.load_state_dict({k: v for k, v in state.items() if k != "scales"})
    truncated = dict(state, codes=state["codes"][:-1])
    with pytest.raises(RuntimeError):
        target.load_state_dict(truncated)
    with pytest.raises(RuntimeError, match="codebook|Missing"):
        target.load_state_dict(linear.state_dict())
    int8 = lowbit.nn.Int8Linear.from_linear(linear).state_dict()
    with pytest.raises(RuntimeError, match="codebook|Missing"):
        target.load_state_dict(int8)
    other, _ = _module((1, 8, 4))
    with pytest.raises(RuntimeError, match="this layer is"):
        target.load_state_dict(other.state_dict())


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module, _ = _module()
    compiled = torch.compile(module, fullgraph=True)
    x = _x(3, 64, torch.bfloat16)
    assert _same_bits(compiled(x), module(x))


def test_construction_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="num_codebooks must be one of 1, 2"):
        CodebookLinear(64, 4, num_codebooks=3)
    with pytest.raises(ValueError, match="nbits must be one of 8, 16"):
        CodebookLinear(64, 4, nbits=4)
    with pytest.raises(ValueError, match="group_size must be one of 4, 8"):
        CodebookLinear(64, 4, group_size=16)
    with pytest.raises(ValueError, match=r"in_features \(66\) must be a multiple of group_size \(8\)"):
        CodebookLinear(66, 4)
    with pytest.raises(ValueError, match=r"in_features \(66\)"):
        CodebookLinear.from_linear(torch.nn.Linear(66, 4))
    with pytest.raises(TypeError, match="codebook_dtype"):
        CodebookLinear(64, 4, codebook_dtype=torch.int8)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        CodebookLinear.from_linear(torch.nn.Conv1d(4, 4, 1))


# -- AQLM state dicts ------------------------------------------------------------------------------
def _aqlm_state(out, in_features, count, bits, seed=0):
    """A QuantizedLinear state dict as AQLM writes it: codes int8 (8-bit) or int16 (16-bit) in two's
    complement, codebooks and scales in fp16."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, in_features // 8, count), generator=g)
    codes[codes >= 1 << (bits - 1)] -= 1 << bits  # AQLM's pack_int_data
    return {
        "codes": codes.to(torch.int8 if bits == 8 else torch.int16),
        "codebooks": (torch.randn(count, 1 << bits, 1, 8, generator=g) * 0.3).half(),
        "scales": (torch.rand(out, 1, 1, 1, generator=g) + 0.5).half(),
        "bias": torch.randn(out, generator=g).half(),
    }


def _aqlm_formula(state, x):
    """AQLM's reconstruction: embedding_bag of the codes (mod 2^bits) with per-codebook offsets,
    times the scales, then F.linear; here in fp32."""
    codes, books, scales = state["codes"], state["codebooks"], state["scales"]
    count, size = books.shape[:2]
    flat = codes.long() % size + torch.arange(0, count * size, size)
    w = F.embedding_bag(flat.flatten(0, -2), books.float().flatten(0, 1).flatten(-2, -1), mode="sum")
    w = (w.view(codes.shape[0], codes.shape[1], 1, 8) * scales.float()).swapaxes(-3, -2).reshape(codes.shape[0], -1)
    return F.linear(x.float(), w, state["bias"].float())


@pytest.mark.parametrize("count, bits", [(2, 8), (1, 8), (1, 16)])
def test_an_aqlm_state_dict_loads_and_computes_aqlms_formula(count, bits):
    state = _aqlm_state(24, 64, count, bits)
    module = CodebookLinear(64, 24, True, count, bits, 8, dtype=torch.float16)
    module.load_state_dict(state)
    x = _x(9, 64, torch.float16)
    want = _aqlm_formula(state, x)
    codes = state["codes"].view(torch.uint8) if bits == 8 else state["codes"]
    bound = codebook_bound(x, codes, state["codebooks"], state["scales"], state["bias"], want.half())
    assert bool(((module(x).double() - want.double()).abs() <= bound).all())
    assert "weight_header" in module.state_dict()  # saved again, it is a lowbit stored form
    meta = CodebookLinear(64, 24, True, count, bits, 8, dtype=torch.float16, device="meta")
    meta.load_state_dict(state, assign=True)
    assert torch.equal(meta(x), module(x))


def test_aqlm_layers_without_kernels_are_refused_saying_why():
    module = CodebookLinear(64, 24, True, 1, 16, 8, dtype=torch.float16)
    state = _aqlm_state(24, 64, 1, 16)
    state["codebooks"] = state["codebooks"][:, :32768]  # AQLM 1x15
    with pytest.raises(RuntimeError, match="32768 entries"):
        module.load_state_dict(state)
    state = _aqlm_state(24, 64, 1, 16)
    state["codebooks"] = state["codebooks"].reshape(1, 65536, 2, 4)
    with pytest.raises(RuntimeError, match="out_group_size 2"):
        module.load_state_dict(state)


# -- the encoder --------------------------------------------------------------------------------
def _structured_weight(out=96, features=128, seed=0):
    """Rows of different scales with correlated neighbouring inputs, as trained layers have."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, features, generator=g)
    smooth = base + 0.6 * torch.roll(base, 1, 1)
    return smooth * (torch.rand(out, 1, generator=g) + 0.2)


def test_encoding_is_deterministic_given_the_seed():
    w = _structured_weight()
    a, b, c = encode(w, seed=3), encode(w, seed=3), encode(w, seed=4)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.codes, c.codes)


def test_two_bit_codebooks_beat_scalar_two_bit_rounding():
    """At about 2 bits per weight (codes; codebooks amortize over real layers) 2x8 must beat 2-bit
    round-to-nearest with group 64 (2.5 bits per weight) by a clear margin."""
    w = _structured_weight(256, 256)
    e = encode(w, 2, 8, 8)
    ours = sqnr_db(w, ref.dequantize(e.codes, e.codebooks, e.scales))
    assert ours > sqnr_db(w, rtn(w, 2, 64)) + 2.0


def test_calibration_lowers_the_output_error_on_such_inputs():
    w = _structured_weight(64, 128, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 128, generator=g)
    x[:, :8] *= 20  # a few features carry most of the activation energy
    plain, calibrated = encode(w, seed=0), encode(w, calibration=x, seed=0)

    def output_error(e):
        what = ref.dequantize(e.codes, e.codebooks, e.scales)
        return ((x @ (w - what).T).norm() / (x @ w.T).norm()).item()

    assert output_error(calibrated) < 0.8 * output_error(plain)
    xtx = {"xtx": x.double().T @ x.double(), "rows": 512}
    assert torch.equal(encode(w, calibration=xtx, seed=0).codes, calibrated.codes)


def test_quantize_a_model_with_calibration_and_reload_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).to(torch.bfloat16)
    batches = [torch.randn(8, 32, dtype=torch.bfloat16) for _ in range(3)]
    dense = model(batches[0]).float()
    lowbit.quantize(model, "codebook", calibration=batches, progress=False, kmeans_iterations=3)
    assert all(isinstance(model[i], CodebookLinear) for i in (0, 2))
    y = model(batches[0])
    assert ((y.float() - dense).norm() / dense.norm()).item() < 0.5
    lowbit.save(model, tmp_path / "m", progress=False)
    again = lowbit.load(tmp_path / "m", model=torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                                                  torch.nn.Linear(64, 16)))
    assert torch.equal(again(batches[0]), y)
