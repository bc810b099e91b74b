"""Accuracy of a KV cache measured as decoding uses it: prefill a prompt, then feed the following
tokens one at a time through the cache (teacher forcing), so that every step attends to the
quantized past and errors compound as in real decoding; a prefill-only perplexity would hide them
(the prompt attends to itself in full precision)."""

from __future__ import annotations

import inspect
import math
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
        for t in steps:
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll.append(-logp[ids[t]])
            greedy.append(int(logits.argmax()))
            if t + 1 < ids.numel():
                logits = model(ids[None, t:t + 1], **{key: cache}, use_cache=True).logits[0, -1]
    return DecodeTrace(torch.stack(nll), torch.tensor(greedy))


def compare(dense: DecodeTrace, other: DecodeTrace) -> dict:
    """Perplexity change against the dense cache and greedy next-token agreement."""
    ppl_dense, ppl = dense.perplexity(), other.perplexity()
    return {"perplexity": ppl, "perplexity_change": ppl / ppl_dense - 1.0,
            "agreement": float((dense.argmax == other.argmax).double().mean())}
