"""lowbit.save / lowbit.load: whole models as checkpoint folders, round trips and refusals."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import checkpoint

from conftest import skip_unless_available

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["int8", "dfloat", "codebook"])
def saved(request, tmp_path):
    skip_unless_available("cpu", "cpu")
    model = _tiny_llama()
    lowbit.quantize(model, request.param, progress=False)
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
    lowbit.save(model, tmp_path / "ckpt", progress=False)
    return request.param, tmp_path / "ckpt", logits


def test_a_transformers_model_round_trips_with_identical_logits(saved):
    method, folder, logits = saved
    model = lowbit.load(folder)
    layers = [m for m in model.modules() if isinstance(m, lowbit.nn.LowbitLinear)]
    assert len(layers) == 14 and all(m.family == method for m in layers)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, logits)
    config = json.loads((folder / "lowbit.json").read_text())
    assert config["methods"] == [method] and config["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"


def test_load_never_allocates_the_dense_linear_weights(saved, monkeypatch):
    """Linear layers are built with parameters on meta; a real allocation of a [160, 64] dense
    weight would show as a CPU parameter of that shape before the swap."""
    _, folder, _ = saved
    created = []
    real = checkpoint.swap_layers

    def spy(model, layers, **kw):
        created.extend(p.device.type for p in model.parameters())
        return real(model, layers, **kw)

    monkeypatch.setattr(checkpoint, "swap_layers", spy)
    lowbit.load(folder)
    assert created and set(created) == {"meta"}


def test_a_plain_module_loads_into_the_architecture_given(tmp_path):
    skip_unless_available("cpu", "cpu")
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40), nn.LayerNorm(40)).to(torch.bfloat16)

    model = build()
    lowbit.quantize(model, "int8", filter_fn=lambda m, fqn: fqn == "0", progress=False)
    lowbit.quantize(model, "dfloat", filter_fn=lambda m, fqn: fqn == "2", progress=False)
    x = torch.randn(5, 48).to(torch.bfloat16)
    lowbit.save(model, tmp_path / "m", progress=False)
    config = json.loads((tmp_path / "m" / "lowbit.json").read_text())
    assert config["methods"] == ["dfloat", "int8"] and not (tmp_path / "m" / "config.json").exists()
    with pytest.raises(lowbit.LowbitError, match="pass model="):
        lowbit.load(tmp_path / "m")
    with checkpoint.parameters_on_meta():
        skeleton = build()
    loaded = lowbit.load(tmp_path / "m", skeleton)
    assert isinstance(loaded[0], lowbit.nn.Int8Linear) and isinstance(loaded[2], lowbit.nn.DFloatLinear)
    assert torch.equal(loaded(x), model(x))


def test_shards_and_their_index(tmp_path):
    skip_unless_available("cpu", "cpu")
    model = _tiny_llama(tie=False)
    lowbit.quantize(model, "int8", progress=False)
    lowbit.save(model, tmp_path / "s", max_shard_bytes=40_000, progress=False)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "s" / checkpoint.INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "s")(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


def _data_offset(path, key):
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return 8 + size + header[key]["data_offsets"][0], raw


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                                 "model.embed_tokens.weight"])
def test_a_flipped_byte_in_a_shard_is_refused_naming_file_and_tensor(saved, key):
    method, folder, _ = saved
    shard = folder / "model.safetensors"
    if method != "int8" and key.endswith("up_proj.weight"):
        key = {"dfloat": "model.layers.0.mlp.up_proj.weight_codes", "codebook": "model.layers.0.mlp.up_proj.codes"}[method]
    offset, raw = _data_offset(shard, key)
    shard.write_bytes(raw[:offset] + bytes([raw[offset] ^ 0x10]) + raw[offset + 1:])
    with pytest.raises(lowbit.FormatError) as caught:
        lowbit.load(folder)
    assert str(shard) in str(caught.value) and key in str(caught.value)


def test_a_truncated_or_foreign_shard_is_refused_naming_the_file(saved):
    _, folder, _ = saved
    shard = folder / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(lowbit.FormatError, match="not a readable safetensors file") as caught:
        lowbit.load(folder)
    assert str(shard) in str(caught.value)
    shard.write_text("hello")
    with pytest.raises(lowbit.FormatError, match=str(shard)):
        lowbit.load(folder)


@pytest.mark.parametrize("change, message", [
    ({"format_version": 99}, "format version 99.*upgrade lowbit"),
    ({"format": "other"}, "not a lowbit checkpoint"),
    ("unknown-method", "uses method 'codebook9', which this lowbit does not know"),
])
def test_a_config_this_lowbit_cannot_read_is_refused_saying_why(saved, change, message):
    _, folder, _ = saved
    path = folder / "lowbit.json"
    config = json.loads(path.read_text())
    if change == "unknown-method":
        first = next(iter(config["layers"]))
        config["layers"][first]["family"] = "codebook9"
    else:
        config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(lowbit.FormatError, match=message):
        lowbit.load(folder)


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(lowbit.FormatError, match="has no lowbit.json"):
        lowbit.load(tmp_path)
    with pytest.raises(lowbit.LowbitError, match="not a folder"):
        lowbit.load(tmp_path / "missing")


def test_save_refuses_a_model_still_on_meta(tmp_path):
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(lowbit.LowbitError, match="meta device"):
        lowbit.save(model, tmp_path / "x")
