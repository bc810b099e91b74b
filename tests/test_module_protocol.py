"""The LowbitLinear protocol (python/lowbit/nn/base.py), held by every family's drop-in module:
construction on meta without encoding, assign-loading, config round trips, the dtype policy,
dequantize(), state dicts that refuse every altered byte and foreign data, compile, and the
validation of construction arguments."""

import io
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import FormatError
from lowbit.nn import DFloatLinear, Int8Linear
from lowbit.reference import int8 as int8_ref

from conftest import param_id
from helpers import seeded_linear

MODULES = {"dfloat": DFloatLinear, "int8": Int8Linear}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [(97, 7), (1, 1)]  # (in_features, out_features)
# Input columns the int8 layers keep in 16 bit (so static_idx and static_weight are not empty).
STATIC = (3, 40)

family_param = pytest.mark.parametrize("family", list(MODULES))
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
bias_param = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
size_param = pytest.mark.parametrize("size", SIZES, ids=param_id)


def _linear(in_features, out_features, bias, dtype, seed=0):
    return seeded_linear(in_features, out_features, bias, dtype, seed=seed)


def _module(family, linear, **options):
    if family == "int8":
        static = [c for c in STATIC if c < linear.in_features]
        return Int8Linear.from_linear(linear, static_idx=torch.tensor(static, dtype=torch.int32), **options)
    return DFloatLinear.from_linear(linear, **options)


def _inputs(in_features, dtype, seed=1):
    """[1, in], [3, 5, in] and [0, in], with outliers (above int8's threshold 6) in the first."""
    g = torch.Generator().manual_seed(seed)
    one = torch.randn(1, in_features, generator=g)
    one[0, -1] = 9.0
    return [one.to(dtype), torch.randn(3, 5, in_features, generator=g).to(dtype),
            torch.empty(0, in_features, dtype=dtype)]


def _bits(t):
    """The bits of a float tensor, so that equality is bit equality (NaNs and signed zeros too)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _refuse_encoding(patched):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran")
    for target in ("lowbit.dfloat.format.compress", "lowbit.dfloat.linear.compress",
                   "lowbit.int8.format.quantize_linear", "lowbit.int8.linear.quantize_linear",
                   "lowbit.reference.int8.quantize_weight"):
        patched.setattr(target, refuse)


def _all_meta(module):
    tensors = [*module.parameters(), *module.buffers(), *module.state_dict().values()]
    return all(t.device.type == "meta" for t in tensors)


# -- construction on meta, assign-loading, config --------------------------------------------------
@family_param
@dtype_param
@bias_param
@size_param
@pytest.mark.parametrize("build", ["device_arg", "device_context", "from_config"])
def test_empty_meta_module_loads_by_assign_to_identical_outputs(family, dtype, bias, size, build):
    in_features, out_features = size
    original = _module(family, _linear(in_features, out_features, bias, dtype))
    state = original.state_dict()
    config = original.config()
    assert json.loads(json.dumps(config)) == config
    Cls = MODULES[family]
    with pytest.MonkeyPatch.context() as patched:
        _refuse_encoding(patched)
        if build == "device_arg":
            empty = Cls(in_features, out_features, bias, dtype=dtype, device="meta")
        elif build == "device_context":
            with torch.device("meta"):
                empty = Cls(in_features, out_features, bias, dtype=dtype)
        else:
            empty = Cls.from_config(json.loads(json.dumps(config)), device="meta")
        assert _all_meta(empty), "an empty layer on meta allocated real tensors"
        assert empty.dtype == dtype and (empty.bias is not None) == bias
        repr(empty)  # extra_repr works on meta
        empty.load_state_dict(state, assign=True)
    assert empty.config() == config
    assert not _all_meta(empty)
    for x in _inputs(in_features, dtype):
        assert _same_bits(empty(x), original(x))
    assert _same_bits(empty.dequantize(), original.dequantize())
    assert repr(empty) == repr(original)


@family_param
def test_state_dict_of_a_meta_module_has_the_stored_keys(family):
    """transformers and accelerate read the keys of a model built on meta."""
    original = _module(family, _linear(97, 7, True, torch.bfloat16))
    empty = MODULES[family](97, 7, True, dtype=torch.bfloat16, device="meta")
    state = empty.state_dict()
    assert set(state) == set(original.state_dict())
    assert all(t.device.type == "meta" for t in state.values())


# -- dtype policy -------------------------------------------------------------------------------
CONVERSIONS = {"half": (lambda m: m.half(), torch.float16), "bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
               "float": (lambda m: m.float(), torch.float32)}


@family_param
@dtype_param
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_dtype_conversion_changes_compute_dtype_and_never_requantizes(family, dtype, conversion):
    linear = _linear(97, 7, True, dtype)
    module = _module(family, linear)
    stored_before = {k: v.clone() for k, v in module.state_dict().items() if not v.is_floating_point()}
    fixed_before = {name: getattr(module, name).clone() for name in type(module).fixed_dtype_buffers}
    convert, new_dtype = CONVERSIONS[conversion]
    with pytest.MonkeyPatch.context() as patched:
        _refuse_encoding(patched)
        assert convert(module) is module
    assert module.dtype == new_dtype
    x = _inputs(97, new_dtype)[1]
    y = module(x)
    assert y.dtype == new_dtype and y.shape == (3, 5, 7)
    assert module.bias.dtype == new_dtype
    assert module.dequantize().dtype == new_dtype and module.dequantize().shape == (7, 97)
    for name, before in fixed_before.items():  # int8: weight_scale and threshold stay fp32, unchanged
        after = getattr(module, name)
        assert after.dtype == torch.float32 and torch.equal(after, before), name
    state = module.state_dict()
    for key, before in stored_before.items():  # the encoded tensors are untouched
        if key.endswith("header"):
            continue  # int8's header names the dtype of static_weight and covers the cast bias
        assert torch.equal(state[key], before), key
    if family == "dfloat":
        # Lossless: the decoded weight cast once, then nn.Linear's own product.
        want = F.linear(x, linear.weight.to(new_dtype), linear.bias.to(new_dtype))
        assert _same_bits(module.dequantize(), linear.weight.to(new_dtype))
        assert _same_bits(y, want)
    else:
        m = module
        want = int8_ref.linear(x.reshape(-1, 97), m.weight, m.weight_scale, m.static_mask, m.static_idx,
                               m.static_weight, m.bias, m._threshold).reshape(3, 5, 7)
        assert m.static_weight.dtype == new_dtype
        torch.testing.assert_close(y, want, rtol=torch.finfo(new_dtype).eps, atol=1e-5)
        assert _same_bits(m.dequantize(), int8_ref.dequantize(m.weight, m.weight_scale, m.static_idx,
                                                                m.static_weight, new_dtype))
    # The converted layer's state dict is a valid stored form of its own.
    again = MODULES[family](97, 7, True, dtype=new_dtype, device="meta", **_same_options(module))
    again.load_state_dict(module.state_dict(), assign=True)
    assert _same_bits(again(x), y)


def _same_options(module):
    config = module.config()
    return {k: v for k, v in config.items() if k not in ("family", "in_features", "out_features", "bias", "dtype")}


@family_param
@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64),
                                     lambda m: m.to("cpu", torch.float64)], ids=["double", "to", "to_device"])
def test_float64_is_refused_and_changes_nothing(family, convert):
    module = _module(family, _linear(97, 7, True, torch.bfloat16))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = _inputs(97, torch.bfloat16)[1]
    y = module(x)
    with pytest.raises(TypeError, match="float64"):
        convert(module)
    assert module.dtype == torch.bfloat16
    after = module.state_dict()
    assert set(after) == set(before)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key
    assert _same_bits(module(x), y)


@family_param
@dtype_param
def test_input_of_another_dtype_or_width_is_refused(family, dtype):
    module = _module(family, _linear(97, 7, True, dtype))
    other = next(d for d in DTYPES if d != dtype)
    with pytest.raises(TypeError) as err:
        module(torch.zeros(2, 97, dtype=other))
    message = str(err.value)
    assert param_id(other) in message and param_id(dtype) in message
    with pytest.raises(ValueError, match="in_features = 97"):
        module(torch.zeros(2, 96, dtype=dtype))
    with pytest.raises(ValueError, match="in_features = 97"):
        module(torch.zeros(2, 3, 98, dtype=dtype))


# -- dequantize -----------------------------------------------------------------------------------
@dtype_param
@bias_param
@size_param
def test_dfloat_dequantize_is_the_original_weight(dtype, bias, size):
    linear = _linear(*size, bias, dtype)
    module = DFloatLinear.from_linear(linear)
    assert _same_bits(module.dequantize(), linear.weight)


@dtype_param
@bias_param
@size_param
def test_int8_dequantize_is_the_product_weight(dtype, bias, size):
    linear = _linear(*size, bias, dtype)
    module = _module("int8", linear)
    w = module.dequantize()
    want = module.weight.float() * module.weight_scale[:, None]
    idx = module.static_idx.long()
    want[:, idx] = linear.weight[:, idx].float()  # static columns come back exactly
    assert _same_bits(w, want.to(dtype))
    assert w.shape == (size[1], size[0])
    for x in _inputs(size[0], dtype):
        y = module(x).double()
        approx = F.linear(x, w, module.bias).double()
        # The module quantizes each input row to int8 (row_scale = absmax / 127 over the elements
        # that are neither outliers nor static, so each of those is off by at most row_scale / 2)
        # and accumulates in fp32; F.linear keeps x as it is. So per output element:
        #   |y - approx| <= row_scale / 2 * sum_k |W[n, k]|       (activation quantization)
        #                 + eps * sum_k |x_k| |W[n, k]|             (w rounded to dtype, fp32 sums)
        #                 + eps * (|y| + |approx|)                  (both outputs rounded to dtype)
        x2 = x.reshape(-1, size[0]).double()
        xi = x2.clone()
        xi[:, idx] = 0
        xi[xi.abs() >= module._threshold] = 0
        row_scale = xi.abs().amax(dim=1, keepdim=True) / 127 if size[0] else xi.new_zeros(xi.shape[0], 1)
        wa = w.double().abs()
        eps = torch.finfo(dtype).eps
        tol = (row_scale / 2 * wa.sum(1)[None, :] + eps * (x2.abs() @ wa.T)
               + eps * (y.abs() + approx.abs()).reshape(-1, size[1]) + 1e-30)
        diff = (y - approx).abs().reshape(-1, size[1])
        assert bool((diff <= tol).all()), float((diff - tol).max())


# -- stored forms -----------------------------------------------------------------------------------
@family_param
@dtype_param
@bias_param
def test_state_dict_round_trip_through_torch_save(family, dtype, bias):
    original = _module(family, _linear(97, 7, bias, dtype))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    into_real = MODULES[family](97, 7, bias, dtype=dtype, **_same_options(original))
    into_real.load_state_dict(state)
    into_meta = MODULES[family](97, 7, bias, dtype=dtype, device="meta", **_same_options(original))
    into_meta.load_state_dict(state, assign=True)
    for x in _inputs(97, dtype):
        assert _same_bits(into_real(x), original(x))
        assert _same_bits(into_meta(x), original(x))
    assert original.state_dict().keys() == into_real.state_dict().keys() == into_meta.state_dict().keys()
    for key, t in original.state_dict().items():
        assert torch.equal(into_real.state_dict()[key], t), key


# The messages of FormatError that an altered stored form gets (int8: lowbit.stored; dfloat:
# DFloatTensor.from_dict), one of which load_state_dict's RuntimeError must carry. Int8Linear
# checks the static columns before the checksum, so an altered static_idx that no longer names
# increasing columns is refused as such.
REFUSED = re.compile(r"checksum mismatch|magic number|format version|code lengths|header|static_idx must be")
STORED_KEYS = {
    "int8": ["weight", "weight_scale", "static_idx", "static_weight", "threshold", "bias", "weight_header"],
    "dfloat": ["weight_header", "weight_codes", "weight_raw", "weight_gaps", "weight_block_starts",
               "weight_code_lengths", "bias", "bias_header"],
}


def _flipped(state, key, position):
    state = {k: v.clone() for k, v in state.items()}
    raw = state[key].reshape(-1).view(torch.uint8)
    raw[position % raw.numel()] ^= 0x01
    return state


@pytest.mark.parametrize("family, key", [(f, k) for f, keys in STORED_KEYS.items() for k in keys])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
def test_every_stored_tensor_refuses_a_flipped_byte(family, key, dtype):
    original = _module(family, _linear(97, 7, True, dtype))
    state = original.state_dict()
    assert key in state and state[key].numel() > 0
    nbytes = state[key].numel() * state[key].element_size()
    target = _module(family, _linear(97, 7, True, dtype, seed=5))
    target_state = {k: v.clone() for k, v in target.state_dict().items()}
    x = _inputs(97, dtype)[1]
    y = target(x)
    for position in sorted({0, 1, nbytes // 2, nbytes - 1}):
        corrupted = _flipped(state, key, position)
        with pytest.raises((RuntimeError, FormatError)) as err:
            target.load_state_dict(corrupted)
        assert REFUSED.search(str(err.value)), (position, str(err.value))
        empty = MODULES[family](97, 7, True, dtype=dtype, device="meta", **_same_options(original))
        with pytest.raises((RuntimeError, FormatError)) as err:
            empty.load_state_dict(corrupted, assign=True)
        assert REFUSED.search(str(err.value)), (position, str(err.value))
    # A refused load changes nothing in the layer it was loaded into.
    for k, t in target.state_dict().items():
        assert torch.equal(t, target_state[k]), k
    assert _same_bits(target(x), y)


@family_param
@pytest.mark.parametrize("key", ["weight_header", "bias", "bias_header"])
def test_a_missing_or_truncated_stored_tensor_is_refused(family, key):
    if key == "bias_header" and family == "int8":
        pytest.skip("int8's weight_header covers its bias")
    original = _module(family, _linear(97, 7, True, torch.bfloat16))
    target = _module(family, _linear(97, 7, True, torch.bfloat16, seed=5))
    state = original.state_dict()
    truncated = dict(state)
    truncated[key] = state[key][:-1]
    with pytest.raises((RuntimeError, FormatError)):
        target.load_state_dict(truncated)
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError) as err:
        target.load_state_dict(missing)
    assert key in str(err.value) or REFUSED.search(str(err.value)), str(err.value)


@pytest.mark.parametrize("family, other", [("dfloat", "int8"), ("int8", "dfloat"), ("dfloat", "linear"),
                                           ("int8", "linear")])
@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_a_foreign_state_dict_is_refused_with_a_clear_message(family, other, assign):
    linear = _linear(97, 7, True, torch.bfloat16)
    state = linear.state_dict() if other == "linear" else _module(other, linear).state_dict()
    device = "meta" if assign else None
    target = MODULES[family](97, 7, True, dtype=torch.bfloat16, device=device)
    with pytest.raises((RuntimeError, FormatError)) as err:
        target.load_state_dict(state, assign=assign)
    # Past torch's first line (which names the class anyway), the reason names the family.
    reason = str(err.value).split("\n", 1)[-1]
    assert family in reason.lower() and ("not" in reason or "Missing" in reason), reason


# -- repr, compile --------------------------------------------------------------------------------
@family_param
def test_extra_repr_on_meta_and_real_modules(family):
    real = _module(family, _linear(97, 7, True, torch.bfloat16))
    meta = MODULES[family](97, 7, False, dtype=torch.float16, device="meta")
    for module, bias, dtype in ((real, True, "bfloat16"), (meta, False, "float16")):
        text = repr(module)
        assert "in_features=97" in text and "out_features=7" in text
        assert f"bias={bias}" in text and f"dtype={dtype}" in text


@family_param
def test_compile_fullgraph_matches_eager_also_after_half(family):
    torch._dynamo.reset()
    module = _module(family, _linear(33, 5, True, torch.bfloat16))
    compiled = torch.compile(module, fullgraph=True)
    x = _inputs(33, torch.bfloat16)[1]
    assert _same_bits(compiled(x), module(x))
    module.half()
    x = x.half()
    assert _same_bits(compiled(x), module(x))


# -- construction arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [math.nan, math.inf, -math.inf, -1.0, -1e-30], ids=str)
def test_int8_refuses_bad_thresholds(threshold):
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(8, 4, threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(8, 4, threshold=threshold, device="meta")
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear.from_linear(_linear(8, 4, True, torch.float32), threshold=threshold)


@pytest.mark.parametrize("calibration", [torch.randn(4, 9), [torch.randn(4, 8), torch.randn(2, 7)],
                                         torch.randn(8)[None, None, :-1]], ids=["wide", "list", "3d"])
def test_int8_refuses_calibration_of_the_wrong_width(calibration):
    with pytest.raises(ValueError, match="in_features = 8"):
        Int8Linear.from_linear(_linear(8, 4, True, torch.float32), calibration=calibration)


@pytest.mark.parametrize("size", [(-1, 4), (4, -1), (4.0, 4), (True, 4)], ids=str)
@family_param
def test_bad_sizes_are_refused(family, size):
    with pytest.raises(ValueError, match="in_features|out_features"):
        MODULES[family](*size, device="meta")


# -- dfloat fused mode on the CPU -------------------------------------------------------------------
@dtype_param
@pytest.mark.parametrize("backend", [None, "auto", "cpu"])
def test_dfloat_fused_mode_on_cpu_takes_the_exact_path(dtype, backend, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the slow reference GEMV ran")
    monkeypatch.setattr(lowbit.reference.dfloat, "gemv", refuse)
    monkeypatch.delenv("LOWBIT_BACKEND", raising=False)
    linear = _linear(97, 7, True, dtype)
    module = DFloatLinear.from_linear(linear, mode="fused", backend=backend)
    assert module._gemv is None
    for x in _inputs(97, dtype):
        assert _same_bits(module(x), linear(x))
