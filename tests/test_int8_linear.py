"""Int8Linear in place of nn.Linear: accuracy against bitsandbytes' algorithm, state dicts
(its own and bitsandbytes'), compile, devices and bad input."""

import io

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear
from lowbit.int8.linear import GEMV_MAX_ROWS
from lowbit.reference import int8 as ref

from dfloat_data import minilm_state_dict
from int8_data import bnb_int8_linear, outlier_activations, per_token_int8_linear, relative_error

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]


def _minilm_linear(dtype, name="encoder.layer.0.intermediate.dense"):
    sd = minilm_state_dict()
    w = sd[name + ".weight"]
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(sd[name + ".bias"])
    return linear.to(dtype).requires_grad_(False)


def _exact(linear, x):
    return x.float() @ linear.weight.float().T + linear.bias.float()


@pytest.mark.parametrize("steady", [True, False], ids=["steady", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference_and_is_as_accurate_as_bitsandbytes(dtype, steady):
    """Without calibration: as accurate as bitsandbytes' algorithm when the outlier features are
    large in every row; within a few percent of it when some of their elements are small (the
    row scales then cover those elements: docs/formats.md, "int8")."""
    linear = _minilm_linear(dtype)
    x = outlier_activations(64, linear.in_features, dtype=dtype, steady=steady)
    module = Int8Linear.from_linear(linear)
    y = module(x)
    w = module
    want = ref.linear(x, w.weight, w.weight_scale, w.static_mask, w.static_idx, w.static_weight, w.bias, 6.0)
    torch.testing.assert_close(y.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=1e-4)
    exact = _exact(linear, x)
    ours = relative_error(y, exact)
    bnb = relative_error(bnb_int8_linear(x, linear.weight, linear.bias), exact)
    plain = relative_error(per_token_int8_linear(x, linear.weight, linear.bias), exact)
    assert ours <= bnb * (1.005 if steady else 1.05), (ours, bnb)
    assert ours < plain / 2, (ours, plain)  # the decomposition is what keeps the accuracy


def test_calibrated_static_columns_beat_bitsandbytes():
    linear = _minilm_linear(torch.bfloat16)
    calibration = outlier_activations(128, linear.in_features, seed=1)
    x = outlier_activations(64, linear.in_features, seed=2)
    module = Int8Linear.from_linear(linear, calibration=calibration)
    assert module.static_idx.numel() == 6
    exact = _exact(linear, x)
    ours = relative_error(module(x), exact)
    bnb = relative_error(bnb_int8_linear(x, linear.weight, linear.bias), exact)
    assert ours < bnb, (ours, bnb)


@pytest.mark.parametrize("rows", [0, 1, 7, 4096])
def test_shapes(rows):
    linear = _minilm_linear(torch.bfloat16, "encoder.layer.0.attention.self.query")
    module = Int8Linear.from_linear(linear)
    x = outlier_activations(rows, 384) if rows else torch.zeros(0, 384, dtype=torch.bfloat16)
    y = module(x.reshape(rows, 1, 384) if rows else x)
    assert y.shape == ((rows, 1, 384) if rows else (0, 384)) and y.dtype == torch.bfloat16
    if rows:
        assert relative_error(y.reshape(rows, 384), _exact(linear, x)) < 0.02


def test_cpu_small_batches_take_the_weight_only_product():
    """On the CPU, inputs of at most GEMV_MAX_ROWS["cpu"] rows take int8_gemv (bench/test_bench_int8.py
    says why) and larger ones the decomposed product; gemv_max_rows overrides the rule and is checked."""
    linear = _minilm_linear(torch.bfloat16)
    x = outlier_activations(5, linear.in_features)
    module = Int8Linear.from_linear(linear)
    w = module
    gemv = ref.gemv(x, w.weight, w.weight_scale, w.static_idx, w.static_weight, w.bias).float()
    decomposed = ref.linear(x, w.weight, w.weight_scale, w.static_mask, w.static_idx, w.static_weight, w.bias, 6.0)
    assert (gemv - decomposed.float()).abs().max() > 1e-2  # the two products differ: the test can fail
    tol = dict(rtol=2**-7, atol=1e-3)
    rows = GEMV_MAX_ROWS["cpu"]
    assert 1 <= rows < 5
    torch.testing.assert_close(module(x[:rows]).float(), gemv[:rows], **tol)
    torch.testing.assert_close(module(x[: rows + 1]).float(), decomposed[: rows + 1].float(), **tol)
    torch.testing.assert_close(module(x).float(), decomposed.float(), **tol)
    four = Int8Linear.from_linear(linear, gemv_max_rows=4)
    torch.testing.assert_close(four(x[:4]).float(), gemv[:4], **tol)
    always = Int8Linear.from_linear(linear, gemv_max_rows=0)
    torch.testing.assert_close(always(x[:1]).float(), decomposed[:1].float(), **tol)
    assert always.config()["gemv_max_rows"] == 0 and module.config()["gemv_max_rows"] is None
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="gemv_max_rows must be an int >= 0 or None"):
            Int8Linear.from_linear(linear, gemv_max_rows=bad)


def test_state_dict_round_trip_into_an_empty_module():
    linear = _minilm_linear(torch.float16)
    module = Int8Linear.from_linear(linear, calibration=outlier_activations(32, 384, dtype=torch.float16))
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    loaded = Int8Linear(384, 1536, dtype=torch.float16)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    x = outlier_activations(5, 384, seed=3, dtype=torch.float16)
    assert torch.equal(loaded(x), module(x))
    assert torch.equal(loaded.static_idx, module.static_idx) and loaded.static_idx.numel() > 0


def test_threshold_is_saved():
    linear = _minilm_linear(torch.bfloat16)
    module = Int8Linear.from_linear(linear, threshold=4.0)
    loaded = Int8Linear(384, 1536)
    loaded.load_state_dict(module.state_dict())
    x = outlier_activations(5, 384, seed=4)
    assert loaded._threshold == 4.0 and torch.equal(loaded(x), module(x))


def test_loads_a_bitsandbytes_state_dict():
    linear = _minilm_linear(torch.float16)
    w = linear.weight.float()
    scb = w.abs().amax(dim=1)  # bitsandbytes' row absmax
    cb = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)
    state = {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8), "bias": linear.bias}
    module = Int8Linear(384, 1536, dtype=torch.float16)
    module.load_state_dict(state)
    assert torch.equal(module.weight, cb) and torch.equal(module.weight_scale, scb / 127)
    x = outlier_activations(16, 384, dtype=torch.float16)
    exact = _exact(linear, x)
    assert relative_error(module(x), exact) <= 1.05 * relative_error(bnb_int8_linear(x, linear.weight, linear.bias),
                                                                     exact)
    with pytest.raises(RuntimeError, match="weight_format"):
        Int8Linear(384, 1536).load_state_dict({**state, "weight_format": torch.tensor(2, dtype=torch.uint8)})


def test_compile_fullgraph():
    module = Int8Linear.from_linear(_minilm_linear(torch.bfloat16), calibration=outlier_activations(8, 384))
    compiled = torch.compile(module, fullgraph=True)
    x = outlier_activations(9, 384, seed=5)
    assert torch.equal(compiled(x), module(x))


def test_moving_never_requantizes(monkeypatch):
    module = Int8Linear.from_linear(_minilm_linear(torch.bfloat16))
    weight, scale = module.weight.clone(), module.weight_scale.clone()
    monkeypatch.setattr(ref, "quantize_weight", lambda *a: pytest.fail("re-quantized"))
    moved = module.to("cpu").half().to(torch.float32)
    assert torch.equal(moved.weight, weight) and torch.equal(moved.weight_scale, scale)
    assert moved.weight_scale.dtype == torch.float32 and moved.bias.dtype == torch.float32
    x = outlier_activations(3, 384, dtype=torch.float32)
    assert moved(x).dtype == torch.float32


def test_quantize_swaps_linears():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    want = model(x)
    lowbit.quantize(model, "int8", progress=False)
    assert all(isinstance(model[i], Int8Linear) for i in (0, 2))
    assert relative_error(model(x), want) < 0.03


def test_bad_input_names_the_argument():
    module = Int8Linear.from_linear(_minilm_linear(torch.bfloat16))
    with pytest.raises(ValueError, match="in_features = 384"):
        module(torch.zeros(2, 383, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="input is int32 but Int8Linear computes in bfloat16"):
        module(torch.zeros(2, 384, dtype=torch.int32))
    with pytest.raises(TypeError, match="input is float32 but Int8Linear computes in bfloat16"):
        module(torch.zeros(2, 384))
    with pytest.raises(TypeError, match="linear must be"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="static columns"):
        lowbit.int8.quantize_linear(torch.zeros(4, 8), torch.tensor([9]))


def test_nan_row_gives_nan_row_only():
    linear = _minilm_linear(torch.bfloat16)
    module = Int8Linear.from_linear(linear)
    x = outlier_activations(4, 384)
    bad = x.clone()
    bad[2, 100] = float("nan")
    y, y_bad = module(x), module(bad)
    assert y_bad[2].isnan().all() and linear(bad)[2].isnan().all()
    assert torch.equal(y_bad[[0, 1, 3]], y[[0, 1, 3]])


def test_quantize_with_calibration_finds_each_layers_outlier_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight[7] = 0.0
        model[0].weight[7, 5] = 20.0  # hidden feature 7 follows input feature 5, scaled up
    batches = [torch.randn(16, 32, dtype=torch.bfloat16) for _ in range(3)]
    for b in batches:
        b[:, 5] = 10.0  # input feature 5 is an outlier feature
    lowbit.quantize(model, "int8", calibration=batches, progress=False)
    assert model[0].static_idx.tolist() == [5]
    assert model[2].static_idx.tolist() == [7]
    with pytest.raises(ValueError, match="calibration must be None for method .dfloat."):
        lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), "dfloat", calibration=batches, progress=False)


def test_load_refuses_what_is_not_an_int8_layer():
    linear = _minilm_linear(torch.bfloat16)
    module = Int8Linear.from_linear(linear, calibration=outlier_activations(16, 384))
    good = module.state_dict()
    with pytest.raises(RuntimeError, match="not int8"):
        Int8Linear(384, 1536).load_state_dict(linear.state_dict(), strict=False)
    for key, value, message in (
        ("static_idx", torch.tensor([400] * good["static_idx"].numel(), dtype=torch.int32), "static_idx must be"),
        ("static_idx", good["static_idx"].flip(0), "static_idx must be"),
        ("static_weight", good["static_weight"][:, :1], "static_weight must be"),
    ):
        with pytest.raises(RuntimeError, match=message):
            Int8Linear(384, 1536).load_state_dict({**good, key: value})


def test_load_with_assign_into_a_meta_module():
    module = Int8Linear.from_linear(_minilm_linear(torch.bfloat16), calibration=outlier_activations(16, 384))
    with torch.device("meta"):
        empty = Int8Linear(384, 1536)
    empty.load_state_dict(module.state_dict(), assign=True)
    x = outlier_activations(4, 384, seed=6)
    assert empty.static_mask.device.type == "cpu" and torch.equal(empty(x), module(x))


def test_cpu_path_under_inference_mode():
    with torch.inference_mode():
        module = Int8Linear.from_linear(_minilm_linear(torch.bfloat16))
        x = outlier_activations(5, 384, seed=7)
        y = module(x)
    want = ref.linear(x, module.weight, module.weight_scale, module.static_mask, module.static_idx,
                      module.static_weight, module.bias, 6.0)
    torch.testing.assert_close(y.float(), want.float(), rtol=torch.finfo(torch.bfloat16).eps, atol=1e-4)
