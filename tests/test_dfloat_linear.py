"""DFloatLinear in place of nn.Linear: identical outputs, state dicts, compile, devices."""

import copy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import DFloatLinear
from lowbit.reference import dfloat as ref

from conftest import skip_unless_available
from dfloat_data import bits_view, minilm_state_dict

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _minilm_linear(dtype, bias=True, name="encoder.layer.0.intermediate.dense", rows=None):
    sd = minilm_state_dict()
    w = sd[name + ".weight"][:rows]
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(w)
        if bias:
            linear.bias.copy_(sd[name + ".bias"][:rows])
    return linear.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 7, 4096])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_exact_mode_is_bit_identical_to_linear(dtype, rows, bias):
    linear = _minilm_linear(dtype, bias)
    module = DFloatLinear.from_linear(linear)
    x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    assert torch.equal(bits_view(module(x)), bits_view(linear(x)))
    x3 = x[: min(rows, 6)].reshape(-1, 1, linear.in_features)
    assert torch.equal(bits_view(module(x3)), bits_view(linear(x3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_mode_matches_reference_gemv(dtype, rows, backend):
    skip_unless_available(backend, "cpu")
    # 48 output rows keep Triton's interpreter quick; rows still span windows and blocks.
    linear = _minilm_linear(dtype, name="encoder.layer.0.attention.self.query", rows=48)
    module = DFloatLinear.from_linear(linear, mode="fused", backend=backend)
    x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = module(x).double()
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    # fp32 accumulation plus one rounding to the output dtype.
    scale = (x.double().abs() @ linear.weight.double().abs().T) + linear.bias.double().abs()
    tol = torch.finfo(dtype).eps * exact.abs() + 4 * torch.finfo(torch.float32).eps * scale + 1e-30
    assert bool(((got - exact).abs() <= tol).all()), float(((got - exact).abs() - tol).max())


def test_fused_mode_falls_back_to_exact_for_large_batches():
    linear = _minilm_linear(torch.bfloat16)
    module = DFloatLinear.from_linear(linear, mode="fused")
    x = torch.randn(9, linear.in_features).to(torch.bfloat16)
    assert torch.equal(bits_view(module(x)), bits_view(linear(x)))


def test_state_dict_round_trip_with_weights_only(tmp_path):
    linear = _minilm_linear(torch.bfloat16)
    module = DFloatLinear.from_linear(linear)
    torch.save(module.state_dict(), tmp_path / "m.pt")
    empty = DFloatLinear(linear.in_features, linear.out_features, bias=True, dtype=torch.bfloat16)
    result = empty.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(5, linear.in_features).to(torch.bfloat16)
    assert torch.equal(bits_view(empty(x)), bits_view(linear(x)))
    assert "weight_table" not in module.state_dict(), "the decode table is derived, not stored"


def test_loading_a_corrupted_or_mismatched_state_dict_fails_clearly():
    module = DFloatLinear.from_linear(_minilm_linear(torch.bfloat16))
    sd = module.state_dict()
    sd["weight_codes"] = sd["weight_codes"].clone()
    sd["weight_codes"][10] ^= 1
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        DFloatLinear(384, 1536, dtype=torch.bfloat16).load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"stored shape \[1536, 384\], module is \[384, 384\]"):
        DFloatLinear(384, 384, dtype=torch.bfloat16).load_state_dict(module.state_dict())


def test_loading_a_bytes_stream_as_the_weight_fails_clearly():
    """A uint8 dfloat stream (packed codes) has the stored form of a weight, but it is none."""
    sd = DFloatLinear(8, 4, dtype=torch.bfloat16).state_dict()
    codes = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sd.update({f"weight_{k}": v for k, v in lowbit.dfloat.compress(codes).to_dict().items()})
    with pytest.raises(RuntimeError, match=r"weight: stored dtype torch.uint8, a DFloatLinear's weight is one of "
                                           r"torch.bfloat16, torch.float16, torch.float32"):
        DFloatLinear(8, 4, dtype=torch.bfloat16).load_state_dict(sd)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    linear = _minilm_linear(torch.bfloat16)
    module = DFloatLinear.from_linear(linear)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(4, linear.in_features).to(torch.bfloat16)
    assert torch.equal(bits_view(compiled(x)), bits_view(linear(x)))


def test_moving_between_devices_and_dtypes_never_recompresses(monkeypatch):
    module = DFloatLinear.from_linear(_minilm_linear(torch.float16))
    codes = module.weight_codes
    x = torch.randn(3, 384)

    def fail(*args, **kwargs):
        raise AssertionError("the weight was compressed again")

    # Both names: the module's own import and the format's.
    monkeypatch.setattr(lowbit.dfloat.linear, "compress", fail)
    monkeypatch.setattr(lowbit.dfloat.format, "compress", fail)
    module.to(torch.bfloat16)
    assert module.dtype == torch.bfloat16 and module.weight_codes is codes
    module.float()
    assert module.dtype == torch.float32 and module.weight_codes is codes
    assert torch.equal(module(x), F.linear(x, module.compressed_weight.decompress().float(), module.bias))
    meta = copy.deepcopy(module).to("meta")
    assert meta.weight_codes.device.type == "meta" and meta.weight_codes.shape == codes.shape
    if torch.cuda.is_available():
        moved = copy.deepcopy(module).to("cuda")
        assert torch.equal(moved.weight_codes.cpu(), codes)
        assert torch.equal(moved(x.cuda()).cpu(), F.linear(x.cuda(), moved.dequantize(), moved.bias).cpu())


def test_bad_input_names_the_argument():
    module = DFloatLinear.from_linear(_minilm_linear(torch.bfloat16))
    with pytest.raises(ValueError, match="input's last dimension must be in_features = 384, got 100"):
        module(torch.randn(2, 100).to(torch.bfloat16))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        DFloatLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        DFloatLinear.from_linear(_minilm_linear(torch.bfloat16), mode="fast")


def test_repr_and_size():
    module = DFloatLinear.from_linear(_minilm_linear(torch.bfloat16))
    assert "bits_per_weight=" in repr(module)
    w = module.compressed_weight
    assert w.bits_per_weight < 11.0
    assert w.shape == (1536, 384) and w.dtype == torch.bfloat16 and ref.MAX_CODE_LEN == 12
