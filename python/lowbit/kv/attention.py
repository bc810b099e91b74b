"""Attention that reads ``QuantizedKVCache``'s packed layers: transformers' attention function
``"lowbit"``::

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="lowbit")  # or
    model.set_attn_implementation("lowbit")

Decode steps (up to ``DECODE_MAX_QUERIES`` new tokens) whose keys and values come from a quantized
layer run ``decode_attention`` on the packed blocks and the residual window; everything else (the
prefill, other caches) runs transformers' SDPA attention. Masks are SDPA's (boolean, or None when
the queries simply see every earlier token).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lowbit.kv.cache import PackedKV, QuantizedKVLayer
from lowbit.reference import kv as _ref

NAME = "lowbit"
DECODE_MAX_QUERIES = 16


def decode_attention(query: torch.Tensor, layer: QuantizedKVLayer, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """softmax(query K^T * scaling + mask) V over the layer's kept tokens, read packed
    (``lowbit::kv_decode_attention`` of the backend the layer resolved): query [B, Hq, L, D] (Hq a
    multiple of the layer's KV heads), mask bool [1 or B, 1 or Hq, L, kept] or None (the queries
    are the last L positions). An additive float mask takes the reference on the dequantized
    cache. Returns [B, Hq, L, D] in query's dtype."""
    if mask is not None and mask.dtype != torch.bool:
        return _ref.attention(query, layer.dense("keys"), layer.dense("values"), mask, scaling)
    p = layer.packed()
    return layer.attention_op(query, p["k_codes"], p["k_scale"], p["k_zero"], p["v_codes"], p["v_scale"],
                              p["v_zero"], layer.keys, layer.values, mask, layer.bits, layer.group_size,
                              float(scaling))


def lowbit_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs):
    """transformers' attention-function signature; returns ([B, L, Hq, D], None)."""
    if isinstance(key, PackedKV) and isinstance(value, PackedKV) and key.layer is value.layer \
            and query.shape[2] <= DECODE_MAX_QUERIES and dropout == 0.0 and kwargs.get("softcap") is None \
            and query.dtype == key.dtype:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = decode_attention(query, key.layer, attention_mask, scale)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Registers ``"lowbit"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, lowbit_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
