"""The kv family: the reference quantization (bounds, layout), QuantizedKVCache's layers (flushing,
cropping, beam reordering, sliding windows, bad input) and generation through transformers with
the "lowbit" attention against SDPA over the same cache."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit import kv  # noqa: E402
from lowbit.reference import kv as ref  # noqa: E402
from lowbit.reference.bitpack import unpack_bits  # noqa: E402

from conftest import param_id  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [2, 4, 8]


def _states(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.linspace(0.5, 4.0, shape[-1])  # channels of different ranges
    return x.to(dtype)


# -- reference quantization ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("shape,group", [((1, 1, 8, 8), 8), ((2, 3, 24, 16), 8), ((1, 2, 64, 64), 32)], ids=str)
def test_quantization_error_within_half_a_step(bits, dtype, shape, group):
    """Every element is within half its group's step (plus fp32 rounding and the final rounding to
    the dtype) of its value, the top of each range included: the scale is rounded up and the zero
    down, so no code is clamped."""
    x = _states(shape, dtype)
    kc, ks, kz = ref.quantize_keys(x, bits, group)
    vc, vs, vz = ref.quantize_values(x, bits, group)
    assert kc.dtype == torch.uint8 and ks.dtype == dtype and vs.dtype == dtype
    b, h, t, d = shape
    assert kc.shape == (b, h, t // group, d, group * bits // 8) and ks.shape == (b, h, t // group, d)
    assert vc.shape == (b, h, t, d * bits // 8) and vs.shape == (b, h, t, d // group)
    eps = torch.finfo(dtype).eps / 2  # the final rounding, relative
    for got, step in ((ref.dequantize_keys(kc, ks, kz, bits, group, dtype),
                       ks.float().repeat_interleave(group, dim=2)),
                      (ref.dequantize_values(vc, vs, vz, bits, group, dtype),
                       vs.float().repeat_interleave(group, dim=3))):
        err = (got.double() - x.double()).abs()
        bound = step.double() * 0.5 * (1 + 2.0 ** -20) + x.double().abs() * (2 * eps) + 1e-30
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    # The bound is tight enough to see a lost zero point.
    wrong = ref.dequantize_values(vc, vs, torch.zeros_like(vz), bits, group, dtype)
    assert bool(((wrong.double() - x.double()).abs() > vs.float().repeat_interleave(group, dim=3) * 0.5).any())


def test_key_codes_pack_the_tokens_of_one_channel():
    """Keys: byte k of channel d's codes in block j holds tokens j * group + (8 / bits) k ...; values:
    the channels of one token."""
    bits, group = 4, 8
    x = _states((1, 1, 16, 4), torch.float32)
    kc, ks, kz = ref.quantize_keys(x, bits, group)
    channel = x[0, 0, 8:16, 2]  # block 1, channel 2
    zero, scale = kz[0, 0, 1, 2], ks[0, 0, 1, 2]
    want = torch.round((channel - zero) / scale).to(torch.uint8)
    assert torch.equal(unpack_bits(kc[0, 0, 1, 2], bits, group), want)
    assert kc[0, 0, 1, 2, 0].item() == (int(want[0]) | int(want[1]) << 4)


def test_constant_groups_are_exact_and_codes_stay_in_range():
    x = torch.full((1, 1, 8, 8), 0.375)
    for bits in BITS:
        kc, ks, kz = ref.quantize_keys(x, bits, 8)
        assert torch.equal(ref.dequantize_keys(kc, ks, kz, bits, 8, torch.float32), x)
        assert int(unpack_bits(kc, bits, 8).max()) == 0


# -- the cache layer --------------------------------------------------------------------------------
def _layer_expected(tokens_k, tokens_v, bits, group, residual):
    """What a layer fed these tokens (in any chunks) holds: its oldest whole blocks beyond the residual
    window quantized, the rest as given."""
    t = tokens_k.shape[2]
    packed = max(0, (t - residual) // group * group)
    k = torch.cat([ref.dequantize_keys(*ref.quantize_keys(tokens_k[:, :, :packed], bits, group), bits, group,
                                       tokens_k.dtype), tokens_k[:, :, packed:]], dim=2)
    v = torch.cat([ref.dequantize_values(*ref.quantize_values(tokens_v[:, :, :packed], bits, group), bits, group,
                                         tokens_v.dtype), tokens_v[:, :, packed:]], dim=2)
    return k, v, packed


@pytest.mark.parametrize("chunks", [[37], [5, 1, 1, 30], [1] * 37, [20, 17]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_layer_holds_the_same_whatever_the_chunks(chunks, dtype):
    bits, group, residual = 4, 8, 16
    k, v = _states((2, 3, 37, 16), dtype, 1), _states((2, 3, 37, 16), dtype, 2)
    layer = kv.QuantizedKVLayer(bits, group, residual)
    at = 0
    for i, n in enumerate(chunks):
        rk, rv = layer.update(k[:, :, at:at + n], v[:, :, at:at + n])
        at += n
        if i == 0:  # the prefill gets its own states back
            assert rk is not None and torch.equal(rk, k[:, :, :n])
        else:
            assert isinstance(rk, kv.PackedKV) and rk.shape == (2, 3, at, 16)
        r = layer.keys.shape[2]
        assert (at < residual and r == at) or residual <= r < residual + group
    want_k, want_v, packed = _layer_expected(k, v, bits, group, residual)
    assert layer.packed_tokens() == packed and layer.get_seq_length() == 37
    assert torch.equal(layer.dense("keys"), want_k) and torch.equal(layer.dense("values"), want_v)
    # Any torch operation on the returned tensors sees the dequantized cache.
    keys = kv.PackedKV(layer, "keys")
    assert torch.equal(keys * 1, want_k) and torch.equal(keys[:, 1], want_k[:, 1])


def test_layer_crop_reorder_and_batch_select():
    bits, group, residual = 8, 4, 8
    k, v = _states((3, 2, 30, 8), torch.float32, 3), _states((3, 2, 30, 8), torch.float32, 4)
    layer = kv.QuantizedKVLayer(bits, group, residual)
    layer.update(k, v)
    full_k = layer.dense("keys").clone()
    layer.crop(-3)  # inside the residual window
    assert layer.get_seq_length() == 27 and torch.equal(layer.dense("keys"), full_k[:, :, :27])
    layer.crop(-10)  # into the packed part, mid-block: the block's older tokens come back dequantized
    assert layer.get_seq_length() == 17 and torch.equal(layer.dense("keys"), full_k[:, :, :17])
    assert layer.packed_tokens() == 16
    with pytest.raises(ValueError, match="negative"):
        layer.crop(5)
    before = layer.dense("values").clone()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.dense("values"), before[[2, 0, 1]])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.dense("values"), before[[0]]) and layer.batch == 1


def test_sliding_layer_drops_whole_blocks_and_reports_its_mask():
    bits, group, residual, window = 4, 8, 8, 20
    layer = kv.QuantizedKVLayer(bits, group, residual, sliding_window=window)
    x = _states((1, 1, 100, 8), torch.float32, 5)
    layer.update(x[:, :, :30], x[:, :, :30])
    for t in range(30, 100):
        kv_length, kv_offset = layer.get_mask_sizes(1)
        keys, _ = layer.update(x[:, :, t:t + 1], x[:, :, t:t + 1])
        assert keys.shape[2] == kv_length and kv_offset == layer.dropped
        assert kv_offset <= t - (window - 1)  # every token the query sees is kept
        assert layer.kept_tokens() < window + residual + 2 * group  # bounded, not growing


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits"), (dict(group_size=0), "group_size"), (dict(residual_length=-1), "residual_length"),
    (dict(bits=2, group_size=6), "multiple of 4"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kv.QuantizedKVCache(**kwargs)


def test_bad_states_are_refused():
    layer = kv.QuantizedKVLayer(4, 16, 16)
    with pytest.raises(ValueError, match="head_dim"):
        layer.update(torch.randn(1, 2, 4, 24), torch.randn(1, 2, 4, 24))
    layer = kv.QuantizedKVLayer(4, 8, 16)
    layer.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="do not continue"):
        layer.update(torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16))


# -- through transformers ----------------------------------------------------------------------------
def _cache_kwarg():
    """transformers 5.24 renamed generate's past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
        else "past_key_values"


def _llama(dtype=torch.float32, **extra):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _generate(model, ids, cache, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **{_cache_kwarg(): cache}, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("bits", BITS)
def test_lowbit_attention_reads_the_packed_cache_as_sdpa_reads_it_dequantized(bits, monkeypatch):
    """Same cache contents, two attentions: lowbit's (packed) and SDPA's (on the dequantized
    tensors) give the same tokens and logits within fp32 summation order; lowbit's runs on every
    decode step."""
    model = _llama()
    ids = torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(1))
    calls = []
    original = kv.attention.decode_attention
    monkeypatch.setattr(kv.attention, "decode_attention", lambda *a: calls.append(1) or original(*a))
    seq_l, scores_l = _generate(model, ids, kv.QuantizedKVCache(bits, 8, 8), "lowbit")
    assert len(calls) == 23 * 2  # every decode step of both layers
    seq_s, scores_s = _generate(model, ids, kv.QuantizedKVCache(bits, 8, 8), "sdpa")
    assert torch.equal(seq_l, seq_s)
    torch.testing.assert_close(scores_l, scores_s, rtol=1e-4, atol=1e-4)


def test_eight_bits_stay_close_to_the_dense_cache():
    model = _llama()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    seq_d, scores_d = _generate(model, ids, transformers.DynamicCache(), "sdpa")
    seq_q, scores_q = _generate(model, ids, kv.QuantizedKVCache(8, 8, 8), "lowbit")
    assert torch.equal(seq_d, seq_q)
    rel = ((scores_q - scores_d).norm() / scores_d.norm()).item()
    assert rel < 1e-2, rel


def test_padded_batches_and_beam_search():
    """Left padding (the mask reaches the packed attention) and beam search (reorder_cache on packed
    blocks): at 8 bits the same tokens as the dense cache, and at 4 what SDPA gives over the same
    cache."""
    model = _llama()
    ids = torch.randint(1, 96, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids[0, :6] = 0
    model.generation_config.pad_token_id = 0
    for kw in (dict(attention_mask=mask), dict(attention_mask=mask, num_beams=3)):
        seq_d, _ = _generate(model, ids, transformers.DynamicCache(), "sdpa", **kw)
        seq_8, _ = _generate(model, ids, kv.QuantizedKVCache(8, 8, 8), "lowbit", **kw)
        assert torch.equal(seq_8, seq_d), kw
        seq_l, _ = _generate(model, ids, kv.QuantizedKVCache(4, 8, 8), "lowbit", **kw)
        seq_s, _ = _generate(model, ids, kv.QuantizedKVCache(4, 8, 8), "sdpa", **kw)
        assert torch.equal(seq_l, seq_s), kw


def test_sliding_window_model_keeps_its_window_only():
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=256, sliding_window=24)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(4))
    cache_l = kv.QuantizedKVCache(4, 8, 8, config=model.config)
    assert all(layer.sliding_window == 24 for layer in cache_l.layers)
    seq_l, _ = _generate(model, ids, cache_l, "lowbit")
    seq_s, _ = _generate(model, ids, kv.QuantizedKVCache(4, 8, 8, config=model.config), "sdpa")
    assert torch.equal(seq_l, seq_s)
    assert all(layer.kept_tokens() < 24 + 8 + 2 * 8 for layer in cache_l.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_half_precision_models(dtype):
    model = _llama(dtype)
    ids = torch.randint(0, 96, (1, 33), generator=torch.Generator().manual_seed(5))
    cache = kv.QuantizedKVCache(4, 8, 16)
    seq, scores = _generate(model, ids, cache, "lowbit")
    assert seq.shape == (1, 57) and bool(torch.isfinite(scores).all())
    layer = cache.layers[0]
    assert layer.k_scale.dtype == dtype and layer.keys.dtype == dtype
    assert cache.nbytes() < 2 * 2 * 2 * 56 * 16 * 2  # below the dense cache's bytes
    assert math.isclose(layer.get_seq_length(), 56)


# -- stored prompt caches ------------------------------------------------------------------------------
def _prefilled(model, ids, cache):
    with torch.no_grad():
        model(ids, **{_cache_kwarg(): cache}, use_cache=True)
    return cache


@pytest.mark.parametrize("bits", BITS)
def test_saved_cache_continues_as_the_in_memory_one(bits, tmp_path):
    """A prompt's cache saved and loaded (another object, tensors decoded from the file) continues the
    generation with exactly the tokens and logits of the in-memory cache; the file is smaller than
    the cache's packed bytes."""
    model = _llama()
    ids = torch.randint(0, 96, (2, 61), generator=torch.Generator().manual_seed(6))
    cache = _prefilled(model, ids[:, :-1], kv.QuantizedKVCache(bits, 8, 8))
    path = cache.save(tmp_path / "prompt.safetensors")
    loaded = kv.QuantizedKVCache.load(path)
    for a, b in zip(cache.layers, loaded.layers):
        assert a.blocks == b.blocks and a.seen == b.seen and a.get_seq_length() == 60
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            assert torch.equal(a.packed()[name], b.packed()[name]), name
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    seq_a, scores_a = _generate(model, ids, cache, "lowbit")
    seq_b, scores_b = _generate(model, ids, loaded, "lowbit")
    assert torch.equal(seq_a, seq_b) and torch.equal(scores_a, scores_b)
    assert path.stat().st_size < loaded.nbytes() + 40_000  # the coded tensors plus their headers


def test_saved_sliding_window_cache_round_trips(tmp_path):
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=256, sliding_window=24)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 80), generator=torch.Generator().manual_seed(7))
    cache = kv.QuantizedKVCache(4, 8, 8, config=model.config)
    _generate(model, ids, cache, "lowbit")  # grows past its window, dropping blocks
    loaded = kv.QuantizedKVCache.load(cache.save(tmp_path / "c.safetensors"))
    for a, b in zip(cache.layers, loaded.layers):
        assert (a.sliding_window, a.dropped, a.seen) == (b.sliding_window, b.dropped, b.seen) and a.dropped > 0
        assert torch.equal(a.dense("keys"), b.dense("keys"))


def test_corrupted_truncated_and_foreign_files_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.errors import FormatError

    model = _llama()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(8))
    path = _prefilled(model, ids, kv.QuantizedKVCache(4, 8, 8)).save(tmp_path / "c.safetensors")
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("k_codes.codes"))
    flipped = dict(tensors)
    flipped[name] = tensors[name].clone()
    flipped[name][0] ^= 1
    save_file(flipped, str(tmp_path / "flipped.safetensors"))
    missing = {k: v for k, v in tensors.items() if not k.startswith("layers.1.")}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:-100])
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    for bad in ("flipped", "missing", "truncated", "foreign"):
        with pytest.raises(FormatError):
            kv.QuantizedKVCache.load(tmp_path / f"{bad}.safetensors")
    with pytest.raises(FileNotFoundError, match="path"):
        kv.QuantizedKVCache.load(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="every layer must hold tokens"):
        kv.QuantizedKVCache(4, 8, 8).save(tmp_path / "empty.safetensors")


def test_a_cache_used_with_another_model_is_refused(tmp_path):
    small = _llama()
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(9))
    loaded = kv.QuantizedKVCache.load(_prefilled(small, ids, kv.QuantizedKVCache(4, 8, 8)).save(tmp_path / "c.st"))
    bigger = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256)).eval()
    with pytest.raises(ValueError, match="layer_idx 2: this cache holds 2 layers"):
        _prefilled(bigger, ids[:, -1:], loaded)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=256)).eval()
    with pytest.raises(ValueError, match="do not continue"):
        _prefilled(wider, ids[:, -1:], kv.QuantizedKVCache.load(tmp_path / "c.st"))


def test_gemma3_style_mixed_layers():
    """A config whose layer_types mix sliding and full attention (Gemma 3): sliding layers keep only
    their window, full layers keep everything, and generation matches SDPA over the same cache."""
    cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(10))
    cache = kv.QuantizedKVCache(4, 8, 8, config=model.config)
    assert [layer.sliding_window for layer in cache.layers] == [16, None, 16, None]
    seq_l, _ = _generate(model, ids, cache, "lowbit")
    seq_s, _ = _generate(model, ids, kv.QuantizedKVCache(4, 8, 8, config=model.config), "sdpa")
    assert torch.equal(seq_l, seq_s)
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.dropped > 0 and sliding.kept_tokens() < 16 + 8 + 2 * 8
    assert full.dropped == 0 and full.kept_tokens() == full.get_seq_length() == 83
