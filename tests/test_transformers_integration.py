"""transformers' from_pretrained / save_pretrained with quant_method "lowbit" (lowbit.integrations)."""

import json
import subprocess
import sys

import pytest
import torch

import lowbit

from conftest import skip_unless_available

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _from_pretrained(folder, **kwargs):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("method", ["int8", "dfloat", "codebook"])
@pytest.mark.parametrize("writer", ["lowbit.save", "save_pretrained"])
def test_from_pretrained_and_lowbit_load_read_the_same_checkpoint(tmp_path, method, writer):
    skip_unless_available("cpu", "cpu")
    model = _tiny_llama()
    lowbit.quantize(model, method, progress=False)
    expected = _logits(model)
    if writer == "lowbit.save":
        lowbit.save(model, tmp_path, progress=False)
    else:
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"
    hf = _from_pretrained(tmp_path)
    ours = lowbit.load(tmp_path)
    for loaded in (hf, ours):
        kinds = {type(m).__name__ for m in loaded.modules() if isinstance(m, lowbit.nn.LowbitLinear)}
        assert kinds == {type(model.model.layers[0].mlp.up_proj).__name__}
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(_logits(loaded), expected)


def test_quantize_while_loading_then_save_pretrained_gives_a_lowbit_checkpoint(tmp_path):
    skip_unless_available("cpu", "cpu")
    from lowbit.integrations.transformers import LowbitConfig

    dense = _tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    model = _from_pretrained(tmp_path / "dense", quantization_config=LowbitConfig(method="int8"))
    assert isinstance(model.model.layers[1].self_attn.o_proj, lowbit.nn.Int8Linear)
    assert type(model.lm_head) is torch.nn.Linear  # tied to the embedding: left dense
    reference = _tiny_llama()
    lowbit.quantize(reference, "int8", progress=False)
    assert torch.equal(_logits(model), _logits(reference))
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(_from_pretrained(tmp_path / "q")), _logits(reference))
    assert torch.equal(_logits(lowbit.load(tmp_path / "q")), _logits(reference))


def test_a_flipped_byte_in_a_lowbit_layer_is_refused_by_from_pretrained(tmp_path):
    skip_unless_available("cpu", "cpu")
    model = _tiny_llama()
    lowbit.quantize(model, "int8", progress=False)
    lowbit.save(model, tmp_path, progress=False)
    shard = tmp_path / "model.safetensors"
    raw = shard.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    key = "model.layers.1.mlp.down_proj.weight"
    offset = 8 + size + json.loads(raw[8:8 + size])[key]["data_offsets"][0] + 5
    shard.write_bytes(raw[:offset] + bytes([raw[offset] ^ 1]) + raw[offset + 1:])
    with pytest.raises(lowbit.FormatError, match=r"model.layers.1.mlp.down_proj.*checksum mismatch") as caught:
        _from_pretrained(tmp_path)
    assert str(shard) in str(caught.value)


@pytest.mark.parametrize("change, message", [({"format_version": 7}, "format version 7"),
                                             ("method", "does not know")])
def test_from_pretrained_refuses_a_config_this_lowbit_cannot_read(tmp_path, change, message):
    skip_unless_available("cpu", "cpu")
    model = _tiny_llama()
    lowbit.quantize(model, "int8", progress=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    if change == "method":
        next(iter(config["quantization_config"]["layers"].values()))["family"] = "codebook9"
    else:
        config["quantization_config"].update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(lowbit.FormatError, match=message):
        _from_pretrained(tmp_path)
    with pytest.raises(lowbit.FormatError, match=message):
        lowbit.load(tmp_path)


def test_import_lowbit_registers_the_quantizer_without_importing_transformers():
    code = ("import sys, lowbit; assert 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING; "
            "assert AUTO_QUANTIZER_MAPPING['lowbit'].__name__ == 'LowbitHfQuantizer'; "
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['lowbit'].__name__ == 'LowbitConfig'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
