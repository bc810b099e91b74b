"""``LowbitLinear.narrow``: tensor-parallel shards of every family, in their stored form.

A row shard is the layer's rows; a column shard times its input columns, summed over the shards,
plus the bias, is the layer's product. Shards round-trip through their own state dicts (a header
of the shard's own) and refuse a cut inside a codebook group.
"""

import pytest
import torch

import lowbit
from helpers import seeded_linear
from lowbit.nn import CodebookLinear, DFloatLinear, Int8Linear


def _layers(dtype=torch.float32):
    linear = seeded_linear(64, 48, True, dtype, seed=3)
    calibration = torch.randn(32, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    calibration[:, [5, 40]] *= 20  # static columns on both sides of the cut at 32
    return {
        "int8": Int8Linear.from_linear(linear, calibration=calibration),
        "codebook": CodebookLinear.from_linear(linear, 2, 8, 8, kmeans_iterations=2, refinements=0),
        "dfloat": DFloatLinear.from_linear(linear),
    }


LAYERS = _layers()


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_row_shards_are_the_rows(family):
    layer = LAYERS[family]
    parts = [layer.narrow(0, 0, 16), layer.narrow(0, 16, 32)]
    assert [p.out_features for p in parts] == [16, 32] and all(p.in_features == 64 for p in parts)
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), layer.dequantize())
    assert torch.equal(torch.cat([p.bias for p in parts]), layer.bias)


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_column_shards_sum_to_the_layer(family):
    layer = LAYERS[family]
    parts = [layer.narrow(1, 0, 32), layer.narrow(1, 32, 32)]
    assert all(p.bias is None and p.in_features == 32 for p in parts)
    assert torch.equal(torch.cat([p.dequantize() for p in parts], dim=1), layer.dequantize())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y = parts[0](x[:, :32]) + parts[1](x[:, 32:]) + layer.bias
    w = layer.dequantize()
    want = x @ w.T + layer.bias
    # int8 quantizes each shard's activations on its own columns, so it is held to its own error.
    tolerance = 0.05 if family == "int8" else 1e-4
    assert (y - want).abs().max() <= tolerance * want.abs().max(), family


def test_int8_column_shards_keep_their_static_columns():
    layer = LAYERS["int8"]
    assert layer.static_idx.tolist() == [5, 40]
    left, right = layer.narrow(1, 0, 32), layer.narrow(1, 32, 32)
    assert left.static_idx.tolist() == [5] and right.static_idx.tolist() == [8]
    assert torch.equal(left.weight_scale, layer.weight_scale)


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_shards_round_trip_their_state_dict(family):
    shard = LAYERS[family].narrow(0, 8, 24)
    state = shard.state_dict()
    empty = type(shard).from_config(shard.config(), device="meta")
    empty.load_state_dict(state, assign=True)
    assert torch.equal(empty.dequantize(), shard.dequantize())


def test_dfloat_shard_is_lossless():
    layer = LAYERS["dfloat"]
    part = layer.narrow(1, 16, 40)
    assert torch.equal(part.dequantize().view(torch.int32), layer.dequantize()[:, 16:56].view(torch.int32))


def test_codebook_column_shard_must_hold_whole_groups():
    with pytest.raises(ValueError, match="whole input groups of group_size = 8"):
        LAYERS["codebook"].narrow(1, 4, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        LAYERS["codebook"].narrow(1, 0, 36)


@pytest.mark.parametrize("args, message", [((2, 0, 1), "dim must be 0"), ((0, -1, 1), "start must be"),
                                           ((0, 40, 9), "out_features = 48"), ((1, 0, 65), "in_features = 64")])
def test_narrow_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        LAYERS["int8"].narrow(*args)
