"""Accuracy of a KV cache measured as decoding uses it: prefill a prompt, then feed the following
tokens one at a time through the cache (teacher forcing), so that every step attends to the
quantized past and errors compound as in real decoding; a prefill-only perplexity would hide them
(the prompt attends to itself in full precision)."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import torch


def cache_kwarg(model) -> str:
    """The forward argument the model takes its cache by: ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class DecodeTrace:
    """Per decoded token: the negative log-likelihood of the true next token and the greedy choice."""

    nll: torch.Tensor     # float64 [N]
    argmax: torch.Tensor  # int64 [N]
    seconds: float = 0.0  # the one-token steps, wall clock

    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))


def teacher_forced(model, ids: torch.Tensor, prompt: int, cache, progress: bool = False) -> DecodeTrace:
    """Runs ``ids`` [T] through ``model`` with ``cache``: the first ``prompt`` tokens in one forward,
    then the rest one token per step. Returns, for each of the T - prompt following tokens, its
    negative log-likelihood under the logits of the step before and that step's argmax."""
    if ids.dim() != 1 or not 0 < prompt < ids.numel():
        raise ValueError(f"ids must be 1-D with more than prompt = {prompt} tokens, got shape {list(ids.shape)}")
    key = cache_kwarg(model)
    nll, greedy = [], []
    steps = range(prompt, ids.numel())
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="decode", leave=False)
    with torch.no_grad():
        logits = model(ids[None, :prompt], **{key: cache}, use_cache=True).logits[0, -1]
        start = time.perf_counter()
        for t in steps:
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll.append(-logp[ids[t]])
            greedy.append(int(logits.argmax()))
            if t + 1 < ids.numel():
                logits = model(ids[None, t:t + 1], **{key: cache}, use_cache=True).logits[0, -1]
        seconds = time.perf_counter() - start
    return DecodeTrace(torch.stack(nll), torch.tensor(greedy), seconds)


def compare(dense: DecodeTrace, other: DecodeTrace) -> dict:
    """Perplexity change against the dense cache and greedy next-token agreement."""
    ppl_dense, ppl = dense.perplexity(), other.perplexity()
    return {"perplexity": ppl, "perplexity_change": ppl / ppl_dense - 1.0,
            "agreement": float((dense.argmax == other.argmax).double().mean())}


def cache_bytes(cache) -> int:
    """Bytes a cache holds: ``nbytes()`` where it counts them (lowbit's), else its layers' key and
    value tensors (transformers' dynamic cache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def evaluate(model, tokenizer, bits: int, *, group_size: int = 64, residual_length: int = 32,
             prompt_tokens: int = 512, decode_tokens: int = 512, progress: bool = True) -> dict:
    """The dense cache against ``QuantizedKVCache(bits, group_size, residual_length)`` on the same
    text (``lowbit.evaluation.text_ids``), decoded token by token after a prefilled prompt: each
    cache's perplexity over the decoded tokens, the change and the greedy agreement, KV bytes per
    token at the end, and decode steps per second."""
    from transformers import DynamicCache

    from lowbit import evaluation
    from lowbit.kv import QuantizedKVCache

    ids = evaluation.text_ids(tokenizer, prompt_tokens + decode_tokens)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        dense_cache = DynamicCache()
        dense = teacher_forced(model, ids, prompt_tokens, dense_cache, progress)
        model.set_attn_implementation("lowbit")
        cache = QuantizedKVCache(bits, group_size, residual_length, config=model.config)
        quantized = teacher_forced(model, ids, prompt_tokens, cache, progress)
    finally:
        model.set_attn_implementation(previous)
    tokens = ids.numel() - 1  # the last token is scored, never fed
    return {"bits": bits, "group_size": group_size, "residual_length": residual_length,
            "prompt_tokens": prompt_tokens, "decoded_tokens": decode_tokens,
            "dense": {"perplexity": dense.perplexity(), "bytes_per_token": cache_bytes(dense_cache) / tokens,
                      "steps_per_s": decode_tokens / dense.seconds},
            "quantized": {**compare(dense, quantized), "bytes_per_token": cache_bytes(cache) / tokens,
                          "steps_per_s": decode_tokens / quantized.seconds}}


def table(result: dict) -> str:
    """The evaluation as a text table."""
    d, q = result["dense"], result["quantized"]
    rows = [("cache", "perplexity", "change", "greedy agreement", "KV bytes/token", "decode steps/s"),
            ("dense", f"{d['perplexity']:.3f}", "", "", f"{d['bytes_per_token']:.0f}", f"{d['steps_per_s']:.1f}"),
            (f"lowbit {result['bits']}-bit (group {result['group_size']}, residual {result['residual_length']})",
             f"{q['perplexity']:.3f}", f"{100 * q['perplexity_change']:+.2f}%", f"{100 * q['agreement']:.1f}%",
             f"{q['bytes_per_token']:.0f} ({d['bytes_per_token'] / q['bytes_per_token']:.2f}x smaller)",
             f"{q['steps_per_s']:.1f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
