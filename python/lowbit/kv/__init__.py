"""The kv family: a KIVI-style 2/4/8-bit KV cache for transformers (``QuantizedKVCache``) and the
``"lowbit"`` attention that reads it packed (docs/formats.md, "kv")."""

from lowbit.kv.attention import decode_attention, lowbit_attention, register
from lowbit.kv.cache import PackedKV, QuantizedKVCache, QuantizedKVLayer

register()

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "PackedKV", "decode_attention", "lowbit_attention", "register"]
