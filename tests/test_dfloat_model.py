"""Whole models: lowbit.quantize(model, "dfloat") and state-dict compression."""

import torch
from torch import nn

import lowbit
from lowbit.nn import DFloatLinear

from dfloat_data import bits_view, minilm_state_dict


def test_quantize_swaps_every_linear_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))
    model = model.to(torch.bfloat16)
    x = torch.randn(3, 32).to(torch.bfloat16)
    expected = model(x)
    lowbit.quantize(model, "dfloat", filter_fn=lambda module, fqn: fqn != "2.1", progress=False)
    assert isinstance(model[0], DFloatLinear) and isinstance(model[2][0], DFloatLinear)
    assert type(model[2][1]) is nn.Linear, "left out by filter_fn"
    assert torch.equal(bits_view(model(x)), bits_view(expected))


def test_compress_state_dict_round_trips_a_real_model():
    sd = {k: v.to(torch.bfloat16) for k, v in list(minilm_state_dict().items())[:12]}
    sd["step"] = torch.tensor(3)  # not a float: kept as it is
    stored = lowbit.dfloat.compress_state_dict(sd, progress=False)
    assert "tensor:step" in stored and any(k.startswith("dfloat:codes:") for k in stored)
    back = lowbit.dfloat.decompress_state_dict(stored)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k].view(torch.uint8) if v.is_floating_point() else back[k],
                           v.view(torch.uint8) if v.is_floating_point() else v), k
