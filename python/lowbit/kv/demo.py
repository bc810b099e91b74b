"""The kv sections of ``lowbit demo``: decode attention straight from a packed 2/4/8-bit cache,
every backend against the reference and timed against SDPA on the dense cache; and, in the model
part, SmolLM2 decoding token by token through the quantized cache against the dense one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowbit
from lowbit.demo import median_seconds
from lowbit.reference import kv as ref

GROUP, RESIDUAL = 64, 32
MAX_PERPLEXITY_CHANGE = 0.01  # 4-bit keys and values, as decoding uses them


def demo(device: torch.device) -> bool:
    """One decode step's attention (SmolLM2's 9 query / 3 KV heads of 64, 8192 cached tokens, bf16)
    from the packed cache at 2, 4 and 8 bits: every backend against the reference, and its time
    against SDPA on the dense bf16 cache."""
    hq, hkv, d, t = 9, 3, 64, 8192
    print(f"\nkv cache: decode attention on a packed cache (KIVI layout, groups of {GROUP}, newest {RESIDUAL} "
          f"tokens in bf16); {hq}/{hkv} heads of {d}, {t} tokens")
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, t, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, hkv, t, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(1, hq, 1, d, generator=gen).to(torch.bfloat16)
    n = (t - RESIDUAL) // GROUP * GROUP
    dense_time = median_seconds(lambda: F.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device),
                                                                       enable_gqa=True), device)
    ok = True
    for bits in (2, 4, 8):
        packed = (*ref.quantize_keys(k[:, :, :n], bits, GROUP), *ref.quantize_values(v[:, :, :n], bits, GROUP),
                  k[:, :, n:], v[:, :, n:])
        args = [x.to(device) for x in (q, *packed)]
        want = lowbit.ops.kv_decode_attention(*args, None, bits, GROUP, d ** -0.5, backend="reference").float()
        dense_bytes = 2 * k.numel() * 2
        size = sum(x.numel() * x.element_size() for x in packed)
        for backend in lowbit.ops.implementations("kv_decode_attention"):
            if backend == "reference" or lowbit.ops.why_unavailable(backend, device) is not None:
                continue
            cache_note = f"cache {size / 2**20:.2f} MB ({dense_bytes / size:.2f}x smaller than bf16)"
            if backend == "triton" and device.type == "cpu":
                # Triton's interpreter: the first blocks only, untimed.
                small = [x[:, :, :2] if i in (1, 2, 3) else x[:, :, :2 * GROUP] if i in (4, 5, 6) else x
                         for i, x in enumerate(args)]
                got = lowbit.ops.kv_decode_attention(*small, None, bits, GROUP, d ** -0.5, backend=backend).float()
                expected = lowbit.ops.kv_decode_attention(*small, None, bits, GROUP, d ** -0.5,
                                                          backend="reference").float()
                note = "(interpreted, 2 blocks)"
            else:
                got = lowbit.ops.kv_decode_attention(*args, None, bits, GROUP, d ** -0.5, backend=backend).float()
                expected = want
                seconds = median_seconds(lambda: lowbit.ops.kv_decode_attention(
                    *args, None, bits, GROUP, d ** -0.5, backend=backend), device)
                note = f"{cache_note}  {seconds * 1e3:.3f} ms, {dense_time / seconds:.2f}x SDPA on the dense cache"
            same = torch.allclose(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
            ok &= same
            print(f"  {bits}-bit  {backend:<6} matches the reference: {'yes' if same else 'NO'}  {note}")
    return ok


def model_part(*, quick: bool, progress: bool) -> bool:
    """SmolLM2 (fp32) decoding 512 tokens one by one through a 4-bit cache against the dense one
    (``quick`` changes nothing here); the promise: perplexity within MAX_PERPLEXITY_CHANGE of the
    dense cache's."""
    from lowbit import evaluation
    from lowbit.kv import evaluation as kv_evaluation

    # 512 decoded tokens even when quick: the perplexity of fewer moves by more than the promise.
    prompt, decoded = 512, 512
    model, tokenizer = evaluation.load_dense(evaluation.MODEL)
    print(f"\nkv cache on SmolLM2: {prompt} tokens prefilled, then {decoded} fed one at a time through the cache")
    result = kv_evaluation.evaluate(model, tokenizer, 4, group_size=GROUP, residual_length=RESIDUAL,
                                    prompt_tokens=prompt, decode_tokens=decoded, progress=progress)
    print(kv_evaluation.table(result))
    change = result["quantized"]["perplexity_change"]
    kept = abs(change) <= MAX_PERPLEXITY_CHANGE
    print(f"  kv: {'kept' if kept else 'BROKE'} its promise (4-bit perplexity within "
          f"{MAX_PERPLEXITY_CHANGE:.0%} of the dense cache's: {100 * change:+.2f}%)")
    return kept
