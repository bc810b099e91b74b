"""kv (KIVI-layout quantized KV cache): decode attention straight from the packed cache against
scaled_dot_product_attention on the dense cache (bf16 and fp32, the faster one the baseline),
measured side by side in this process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness
from harness import Case, measure_interleaved
from lowbit import ops
from lowbit.reference import kv as ref

# (query heads, kv heads, head_dim): SmolLM2-135M's attention, and a Llama-3-8B-like one.
SHAPES = [(9, 3, 64), (32, 8, 128)]
CONTEXTS = [4096, 16384, 65536]
GROUP, RESIDUAL = 64, 128


def _packed(k, v, bits):
    """The cache of k, v [1, Hkv, T, D] as QuantizedKVCache keeps it: whole blocks beyond the
    newest RESIDUAL tokens packed, the rest as given."""
    t = k.shape[2]
    n = (t - RESIDUAL) // GROUP * GROUP
    kc, ks, kz = ref.quantize_keys(k[:, :, :n], bits, GROUP)
    vc, vs, vz = ref.quantize_values(v[:, :, :n], bits, GROUP)
    return (kc, ks, kz, vc, vs, vz, k[:, :, n:].contiguous(), v[:, :, n:].contiguous())


def _cases(quick, device):
    if quick:
        return [(shape, 2048, 4) for shape in SHAPES]
    if device.type == "cuda":  # 32k tokens, fp16 (the GPU targets' setting)
        return [(shape, 32768, b) for shape in SHAPES for b in (4, 2)]
    return [(shape, t, 4) for shape in SHAPES for t in CONTEXTS] + [(SHAPES[0], 16384, b) for b in (2, 8)]


@pytest.mark.parametrize("index", range(len(CONTEXTS) * len(SHAPES) + 2))
def test_decode_attention_vs_sdpa(benchmark, device, quick, index):
    cases = _cases(quick, device)
    if index >= len(cases):
        pytest.skip("not in this device's or the quick set")
    (hq, hkv, d), t, bits = cases[index]
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, t, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, t, d, generator=gen).to(dtype)
    q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
    packed = _packed(k, v, bits)
    if device.type == "cuda":
        _measure_gpu(benchmark, device, q, k, v, packed, bits, f"kv decode attention {hq}/{hkv} heads of {d}, "
                     f"{t} tokens, {bits}-bit")
        return
    k32, v32, q32 = k.float(), v.float(), q.float()
    name = f"kv decode attention {hq}/{hkv} heads of {d}, {t} tokens, {bits}-bit"
    shapes = {"query": [1, hq, 1, d], "cache": [1, hkv, t, d]}
    packed_bytes = sum(x.numel() * x.element_size() for x in packed)

    def case(backend, nbytes, label):
        return Case(op="kv_decode_attention", case=name, backend=backend, shapes=shapes, dtype="bf16",
                    bytes_moved=nbytes, flops=4 * hq * t * d, extra={"name": label, "bits": bits, "group": GROUP,
                                                                     "residual": RESIDUAL})

    scaling = d ** -0.5
    entries = [
        (case("baseline", 2 * k.numel() * 2, "SDPA bf16 (dense cache)"),
         lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        (case("dense_fp32", 2 * k.numel() * 4, "SDPA fp32 (dense cache)"),
         lambda: F.scaled_dot_product_attention(q32, k32, v32, enable_gqa=True)),
        (case("cpu", packed_bytes, f"lowbit {bits}-bit packed"),
         lambda: ops.kv_decode_attention(q, *packed, None, bits, GROUP, scaling, backend="cpu")),
    ]
    with torch.inference_mode():
        records = measure_interleaved(benchmark, entries, device, rounds=5 if quick else 15)
    harness.pair_fastest_dense(records)


def _measure_gpu(benchmark, device, q, k, v, packed, bits, name):
    """On a GPU: SDPA (flash / efficient kernels) on the dense fp16 cache against lowbit's Triton
    kernel on the packed one, CUDA-graph timed over copies larger than L2 (harness.measure)."""
    from harness import measure

    q, k, v = q.to(device), k.to(device), v.to(device)
    packed = tuple(x.to(device) for x in packed)
    d = q.shape[-1]
    shapes = {"query": list(q.shape), "cache": list(k.shape)}
    packed_bytes = sum(x.numel() * x.element_size() for x in packed)

    def case(backend, nbytes, label):
        return Case(op="kv_decode_attention", case=name, backend=backend, shapes=shapes, dtype="fp16",
                    bytes_moved=nbytes, flops=4 * q.shape[1] * k.shape[2] * d,
                    extra={"name": label, "bits": bits, "group": GROUP, "residual": RESIDUAL})

    measure(benchmark, case("baseline", 2 * k.numel() * 2, "SDPA fp16 (dense cache)"),
            lambda kk, vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True), device, weights=(k, v))
    measure(benchmark, case("triton", packed_bytes, f"lowbit {bits}-bit packed (Triton)"),
            lambda *p: ops.kv_decode_attention(q, *p, None, bits, GROUP, d ** -0.5, backend="triton"), device,
            weights=packed)


def _transformers_cache(backend, model, bits):
    """transformers' QuantizedCache at lowbit's group and residual, or None where the backend (or
    the bit width) is not available."""
    from transformers import QuantizedCache

    try:
        return QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=GROUP,
                              residual_length=RESIDUAL)
    except (ImportError, ValueError):
        return None


def test_smollm2_decode_accuracy(quick):
    """SmolLM2-135M-Instruct (fp32), a prompt prefilled, then the following tokens fed one at a time
    through each cache: perplexity change against the dense cache and greedy next-token agreement,
    for lowbit's cache at 8/4/2 bits and transformers' QuantizedCache (quanto, HQQ) at the same
    bits, group and residual; and KV bytes per token at 4096 tokens against the dense cache."""
    import lowbit
    import lowbit.kv
    from lowbit import evaluation
    from lowbit.kv import evaluation as kv_eval

    try:
        evaluation.smollm2_folder()
    except lowbit.LowbitError as exc:
        pytest.skip(str(exc))
    from transformers import DynamicCache

    prompt, decoded = (128, 64) if quick else (512, 512)
    model, tokenizer = evaluation.load_dense(evaluation.MODEL)
    ids = evaluation.text_ids(tokenizer, prompt + decoded)
    model.set_attn_implementation("sdpa")
    dense = kv_eval.teacher_forced(model, ids, prompt, DynamicCache())
    results = {"dense_perplexity": dense.perplexity()}
    for bits in (8, 4, 2):
        for residual in ((RESIDUAL,) if bits != 4 else (RESIDUAL, 32)):
            model.set_attn_implementation("lowbit")
            trace = kv_eval.teacher_forced(model, ids, prompt, lowbit.kv.QuantizedKVCache(bits, GROUP, residual))
            results[f"lowbit_{bits}bit_r{residual}"] = kv_eval.compare(dense, trace)
        model.set_attn_implementation("sdpa")
        for backend in ("quanto", "hqq"):
            cache = _transformers_cache(backend, model, bits)
            if cache is not None:
                trace = kv_eval.teacher_forced(model, ids, prompt, cache)
                results[f"transformers_{backend}_{bits}bit"] = kv_eval.compare(dense, trace)
    # Bytes per token at 4096 tokens (SmolLM2's 30 layers of 3 KV heads of 64), counting scales,
    # zeros and the residual window, against the dense cache in fp16 / bf16.
    cfg = model.config
    tokens, dtype = 4096, torch.bfloat16
    memory = {}
    for bits in (8, 4, 2):
        for residual in (RESIDUAL, 32):
            cache = lowbit.kv.QuantizedKVCache(bits, GROUP, residual)
            gen = torch.Generator().manual_seed(0)
            for layer in range(cfg.num_hidden_layers):
                states = torch.randn(1, cfg.num_key_value_heads, tokens, cfg.head_dim, generator=gen).to(dtype)
                cache.update(states, states, layer)
            dense_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * cfg.head_dim * 2
            memory[f"{bits}bit_r{residual}"] = {"bytes_per_token": cache.nbytes() / tokens,
                                                "dense_bytes_per_token": dense_bytes / tokens,
                                                "smaller": dense_bytes / cache.nbytes()}
    harness.FACTS.append({"fact": "kv_decode_accuracy", "model": "SmolLM2-135M-Instruct (fp32)",
                          "prompt_tokens": prompt, "decoded_tokens": decoded, "text": "pydoc_data.topics",
                          "group": GROUP, "residual": RESIDUAL, **results, "memory_4096_tokens_bf16": memory})
    assert results["lowbit_8bit_r128"]["agreement"] > 0.9


def test_smollm2_stored_prompt_cache(tmp_path, quick):
    """A 4096-token prompt's 4-bit cache (SmolLM2, bf16): the file's size against the packed bytes
    in memory, and loading it against recomputing the prefill; continuing from it gives the same
    tokens as continuing from the in-memory cache."""
    import time

    import lowbit
    import lowbit.kv
    from lowbit import evaluation
    from lowbit.kv import evaluation as kv_eval

    try:
        evaluation.smollm2_folder()
    except lowbit.LowbitError as exc:
        pytest.skip(str(exc))
    tokens = 1024 if quick else 4096
    model, tokenizer = evaluation.load_dense(evaluation.MODEL, dtype=torch.bfloat16)
    model.set_attn_implementation("lowbit")
    ids = evaluation.text_ids(tokenizer, tokens + 1)[None]
    key = kv_eval.cache_kwarg(model)
    results = {}
    for bits in (4, 2):
        prefill_s, load_s = [], []
        for _ in range(3):
            cache = lowbit.kv.QuantizedKVCache(bits, config=model.config)
            start = time.perf_counter()
            with torch.no_grad():
                model(ids[:, :tokens], **{key: cache}, use_cache=True)
            prefill_s.append(time.perf_counter() - start)
            path = cache.save(tmp_path / f"prompt{bits}.safetensors")
            start = time.perf_counter()
            loaded = lowbit.kv.QuantizedKVCache.load(path)
            load_s.append(time.perf_counter() - start)
        with torch.no_grad():
            out = [model.generate(ids, max_new_tokens=16, do_sample=False, **{key: c}) for c in (cache, loaded)]
        results[f"{bits}bit"] = {"file_bytes": path.stat().st_size, "packed_bytes": cache.nbytes(),
                                 "file_vs_packed": path.stat().st_size / cache.nbytes(),
                                 "prefill_s": sorted(prefill_s)[1], "load_s": sorted(load_s)[1],
                                 "same_tokens": bool(torch.equal(out[0], out[1]))}
    harness.FACTS.append({"fact": "kv_stored_prompt_cache", "model": "SmolLM2-135M-Instruct (bf16)",
                          "prompt_tokens": tokens, "threads": torch.get_num_threads(), **results})
    assert all(r["same_tokens"] for r in results.values())


def test_smollm2_decode_at_8k(quick):
    """End-to-end decode of SmolLM2 (bf16) after an 8192-token prompt: steps per second, the cache's
    bytes and the peak memory the decode steps add above it, with the dense cache (SDPA), lowbit's
    4-bit cache (its attention on the packed cache) and transformers' QuantizedCache (quanto,
    4-bit, SDPA; its quantized tensors are not counted)."""
    import time

    import lowbit
    import lowbit.kv
    from lowbit import evaluation
    from lowbit.kv import evaluation as kv_eval
    from transformers import DynamicCache

    try:
        evaluation.smollm2_folder()
    except lowbit.LowbitError as exc:
        pytest.skip(str(exc))
    tokens, steps = (1024, 4) if quick else (8192, 16)
    model, tokenizer = evaluation.load_dense(evaluation.MODEL, dtype=torch.bfloat16)
    ids = evaluation.text_ids(tokenizer, tokens + steps)[None]
    key = kv_eval.cache_kwarg(model)
    caches = {"dense": ("sdpa", lambda: DynamicCache()),
              "lowbit_4bit": ("lowbit", lambda: lowbit.kv.QuantizedKVCache(4, config=model.config)),
              "transformers_quanto_4bit": ("sdpa", lambda: _transformers_cache("quanto", model, 4))}
    results = {}
    for name, (impl, make) in caches.items():
        cache = make()
        if cache is None:
            continue
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model(ids[:, :tokens], **{key: cache}, use_cache=True, logits_to_keep=1)
        evaluation.release_memory()
        # What a decode step allocates beyond the cache it keeps: a step that dequantizes the whole
        # cache shows it here.
        with evaluation.PeakMemory() as peak, torch.no_grad():
            start = time.perf_counter()
            for t in range(tokens, tokens + steps):
                model(ids[:, t:t + 1], **{key: cache}, use_cache=True)
            seconds = time.perf_counter() - start
        held = kv_eval.cache_bytes(cache) if name != "transformers_quanto_4bit" else None  # quanto's own tensors
        results[name] = {"decode_steps_per_s": steps / seconds, "decode_peak_added_mb": peak.added / 2**20,
                         "cache_mb": None if held is None else held / 2**20}
        del cache
    harness.FACTS.append({"fact": "kv_decode_8k", "model": "SmolLM2-135M-Instruct (bf16)", "prompt_tokens": tokens,
                          "decode_steps": steps, "threads": torch.get_num_threads(), **results})
    assert results["lowbit_4bit"]["cache_mb"] < 0.35 * results["dense"]["cache_mb"]
