"""``QuantizedKVCache``: a transformers ``Cache`` whose layers keep keys and values packed in 2, 4 or 8
bits (KIVI's layout, docs/formats.md "kv"), the newest tokens in full precision.

Each layer holds, per batch row and KV head:
  - packed blocks: keys quantized per channel over ``group_size`` tokens, values per token over
    ``group_size`` channels (``lowbit.reference.kv``), in buffers that grow by doubling;
  - a residual window of the newest tokens in the model's dtype: at least ``residual_length`` once
    that many have been seen, fewer than ``residual_length + group_size``. When it reaches that, its
    oldest whole blocks of ``group_size`` tokens are quantized and appended to the packed part.

What ``update`` hands the attention: for the first forward of an empty layer (the prefill), the
states as given, so that the prompt's attention runs on full precision; afterwards ``PackedKV``
tensors, which lowbit's attention (``lowbit.kv.attention``) reads in packed form and any other
attention sees as the dequantized tensor [B, H, T, D].
"""

from __future__ import annotations

import os

import torch
from torch.utils._pytree import tree_map
from transformers.cache_utils import Cache, CacheLayerMixin

from lowbit.ops import op
from lowbit.reference import kv as _ref
from lowbit.reference.bitpack import packed_length

SUPPORTED_BITS = _ref.SUPPORTED_BITS


def check_options(bits: int, group_size: int, residual_length: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or group_size % (8 // bits):
        raise ValueError(f"group_size must be a positive multiple of {8 // bits} (the codes a byte holds at {bits} "
                         f"bits), got {group_size!r}")
    if not isinstance(residual_length, int) or isinstance(residual_length, bool) or residual_length < 0:
        raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")


class PackedKV(torch.Tensor):
    """The keys (``part`` "keys") or values of a ``QuantizedKVLayer`` as a tensor [B, H, T, D] of the
    layer's dtype. lowbit's attention reads ``layer`` directly; every other torch operation gets the
    dequantized tensor, made once per step."""

    @staticmethod
    def __new__(cls, layer: "QuantizedKVLayer", part: str):
        return torch.Tensor._make_wrapper_subclass(cls, layer.shape(), dtype=layer.dtype, device=layer.device,
                                                   requires_grad=False)

    def __init__(self, layer: "QuantizedKVLayer", part: str):
        self.layer = layer
        self.part = part

    def __repr__(self):
        return f"PackedKV({self.part}, shape={tuple(self.shape)}, bits={self.layer.bits})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def dense(t):
            return t.layer.dense(t.part) if isinstance(t, PackedKV) else t
        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's quantized cache (see the module docstring). ``sliding_window``: the layer
    attends to that many newest tokens only, and drops packed blocks wholly older than its window."""

    is_compileable = False
    is_croppable = True

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 32,
                 sliding_window: int | None = None):
        super().__init__()
        check_options(bits, group_size, residual_length)
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None  # the residual window [B, H, r, D]
        self.is_initialized = False
        self.blocks = 0          # packed blocks in use
        self.dropped = 0         # tokens before the first kept one (sliding layers)
        self.seen = 0            # tokens ever appended and not cropped
        self.k_codes = self.k_scale = self.k_zero = None  # [B, H, capacity blocks, D, ...]
        self.v_codes = self.v_scale = self.v_zero = None  # [B, H, capacity tokens, ...]
        self._dense = {}

    # -- shape --------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(f"key_states and value_states must both be [batch, heads, tokens, head_dim], got "
                             f"{tuple(key_states.shape)} and {tuple(value_states.shape)}")
        if not key_states.is_floating_point():
            raise TypeError(f"key_states must be floating point, got {key_states.dtype}")
        head_dim = key_states.shape[-1]
        if head_dim % self.group_size:
            raise ValueError(f"head_dim ({head_dim}) must be a multiple of group_size ({self.group_size}): values "
                             f"are quantized over groups of group_size channels")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.head_dim = key_states.shape[0], key_states.shape[1], head_dim
        self.keys = key_states.new_empty((self.batch, self.heads, 0, head_dim))
        self.values = value_states.new_empty((self.batch, self.heads, 0, head_dim))
        self.resolve_ops()
        self.is_initialized = True

    def resolve_ops(self) -> None:
        """The kernels of the packed attention and of quantizing on flush, chosen once for the layer's
        device (lowbit.ops' rule)."""
        self.attention_op = op("kv_decode_attention", None, self.device)
        self.quantize_op = op("kv_quantize", None, self.device)

    def packed_tokens(self) -> int:
        return self.blocks * self.group_size

    def kept_tokens(self) -> int:
        """Tokens held (packed and residual)."""
        return self.packed_tokens() + (self.keys.shape[-2] if self.is_initialized else 0)

    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.kept_tokens(), self.head_dim)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the mask covers the tokens the next update keeps (the first at
        position kv_offset) and the query_length new ones."""
        stale = self._stale_blocks() * self.group_size
        return self.kept_tokens() - stale + query_length, self.dropped + stale

    # -- appending ----------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[:2] != (self.batch, self.heads) or key_states.shape[-1] != self.head_dim \
                or value_states.shape != key_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} do "
                             f"not continue this cache of [batch {self.batch}, heads {self.heads}, tokens, head_dim "
                             f"{self.head_dim}]")
        prefill = self.kept_tokens() == 0
        self._drop_blocks(self._stale_blocks())
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        self._flush()
        if prefill:
            # The prompt attends to itself in full precision; the cache has quantized it once.
            return key_states, value_states
        return PackedKV(self, "keys"), PackedKV(self, "values")

    def _flush(self) -> None:
        """Quantizes the residual window's oldest whole blocks beyond residual_length."""
        excess = self.keys.shape[-2] - self.residual_length
        n = excess // self.group_size * self.group_size if excess >= self.group_size else 0
        if n:
            k, v = self.keys[:, :, :n], self.values[:, :, :n]
            self._append_blocks(*self.quantize_op(k, v, self.bits, self.group_size))
            self.keys, self.values = self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous()
        self._dense = {}

    def _append_blocks(self, kc, ks, kz, vc, vs, vz) -> None:
        nb = kc.shape[2]
        need = self.blocks + nb
        capacity = 0 if self.k_codes is None else self.k_codes.shape[2]
        if need > capacity:
            new_cap = max(need, 2 * capacity, 4)

            def grow(old, like, dim_len):
                shape = list(like.shape)
                shape[2] = dim_len
                fresh = like.new_zeros(shape)
                if old is not None:
                    fresh[:, :, :old.shape[2]] = old
                return fresh
            g = self.group_size
            self.k_codes, self.k_scale, self.k_zero = (grow(self.k_codes, kc, new_cap), grow(self.k_scale, ks, new_cap),
                                                       grow(self.k_zero, kz, new_cap))
            self.v_codes, self.v_scale, self.v_zero = (grow(self.v_codes, vc, new_cap * g),
                                                       grow(self.v_scale, vs, new_cap * g),
                                                       grow(self.v_zero, vz, new_cap * g))
        b0, t0, g = self.blocks, self.blocks * self.group_size, self.group_size
        self.k_codes[:, :, b0:need] = kc
        self.k_scale[:, :, b0:need] = ks
        self.k_zero[:, :, b0:need] = kz
        self.v_codes[:, :, t0:need * g] = vc
        self.v_scale[:, :, t0:need * g] = vs
        self.v_zero[:, :, t0:need * g] = vz
        self.blocks = need

    def _stale_blocks(self) -> int:
        """Sliding layers: packed blocks whose every token is older than what the next tokens' queries
        see (their window reaches back sliding_window - 1 tokens from the first of them)."""
        if self.sliding_window is None or self.blocks == 0:
            return 0
        first_needed = self.seen - (self.sliding_window - 1)  # absolute position
        return min(self.blocks, max(0, (first_needed - self.dropped) // self.group_size))

    def _drop_blocks(self, count: int) -> None:
        if count == 0:
            return
        g = self.group_size
        blocks, tokens = slice(count, self.blocks), slice(count * g, self.blocks * g)
        self.k_codes, self.k_scale, self.k_zero = (t[:, :, blocks].contiguous()
                                                   for t in (self.k_codes, self.k_scale, self.k_zero))
        self.v_codes, self.v_scale, self.v_zero = (t[:, :, tokens].contiguous()
                                                   for t in (self.v_codes, self.v_scale, self.v_zero))
        self.blocks -= count
        self.dropped += count * g
        self._dense = {}

    # -- reading --------------------------------------------------------------------------------
    def packed(self) -> dict:
        """The packed part as views (blocks in use): k_codes [B, H, nb, D, packed_length(group, bits)],
        k_scale / k_zero [B, H, nb, D], v_codes [B, H, nb * group, packed_length(D, bits)],
        v_scale / v_zero [B, H, nb * group, D / group]."""
        nb, t = self.blocks, self.blocks * self.group_size
        if nb == 0:
            b, h, d, g = self.batch, self.heads, self.head_dim, self.group_size
            u8 = torch.uint8
            return dict(k_codes=torch.empty((b, h, 0, d, packed_length(g, self.bits)), dtype=u8, device=self.device),
                        k_scale=self.keys.new_empty((b, h, 0, d)), k_zero=self.keys.new_empty((b, h, 0, d)),
                        v_codes=torch.empty((b, h, 0, packed_length(d, self.bits)), dtype=u8, device=self.device),
                        v_scale=self.keys.new_empty((b, h, 0, d // g)), v_zero=self.keys.new_empty((b, h, 0, d // g)))
        return dict(k_codes=self.k_codes[:, :, :nb], k_scale=self.k_scale[:, :, :nb], k_zero=self.k_zero[:, :, :nb],
                    v_codes=self.v_codes[:, :, :t], v_scale=self.v_scale[:, :, :t], v_zero=self.v_zero[:, :, :t])

    def dense(self, part: str) -> torch.Tensor:
        """The kept keys or values [B, H, kept, D] in the layer's dtype: packed blocks dequantized, then
        the residual window."""
        if part not in self._dense:
            p = self.packed()
            if part == "keys":
                old = _ref.dequantize_keys(p["k_codes"], p["k_scale"], p["k_zero"], self.bits, self.group_size,
                                           self.dtype)
                self._dense[part] = torch.cat([old, self.keys], dim=-2)
            else:
                old = _ref.dequantize_values(p["v_codes"], p["v_scale"], p["v_zero"], self.bits, self.group_size,
                                             self.dtype)
                self._dense[part] = torch.cat([old, self.values], dim=-2)
        return self._dense[part]

    def nbytes(self) -> int:
        """Bytes the kept tokens take: packed codes, scales and zeros in use, and the residual."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self.packed().values()) + \
            2 * self.keys.numel() * self.keys.element_size()

    # -- editing ------------------------------------------------------------------------------
    def _batch_apply(self, fn) -> None:
        for name in ("keys", "values", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.keys is not None:
            self.batch = self.keys.shape[0]
        self._dense = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch rows reordered, packed data included, without requantizing."""
        if self.is_initialized:
            self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._batch_apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the newest -tokens_to_remove tokens (a negative int, as transformers' dynamic
        layers take it). Tokens cut out of a packed block's middle leave its older tokens, dequantized,
        in the residual window."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if remove > self.kept_tokens():
            raise ValueError(f"cannot crop {remove} tokens: this layer keeps {self.kept_tokens()}")
        r = self.keys.shape[-2]
        if remove <= r:
            self.keys, self.values = self.keys[:, :, :r - remove], self.values[:, :, :r - remove]
        else:
            keep = self.kept_tokens() - remove  # tokens kept, all in the packed part
            whole = keep // self.group_size
            dense_k, dense_v = self.dense("keys"), self.dense("values")
            self.keys = dense_k[:, :, whole * self.group_size:keep].contiguous()
            self.values = dense_v[:, :, whole * self.group_size:keep].contiguous()
            self.blocks = whole
        self.seen -= remove
        self._dense = {}

    def reset(self) -> None:
        bits, group, residual, window = self.bits, self.group_size, self.residual_length, self.sliding_window
        self.__init__(bits, group, residual, window)


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of ``QuantizedKVLayer``s::

        cache = QuantizedKVCache(bits=4, group_size=64, residual_length=32, config=model.config)
        model.generate(**inputs, past_key_values=cache)   # ``cache=`` from transformers 5.24

    bits: 2, 4 or 8. group_size: tokens per key group and channels per value group (head_dim must
    be a multiple). residual_length: newest tokens kept in full precision at least (up to
    residual_length + group_size - 1 of them). config: the model's config, for layers with a sliding window (each then keeps only
    its window); without one every layer is a full-attention layer. With
    ``attn_implementation="lowbit"`` (``lowbit.kv.attention``) decode attention reads the packed
    cache; with any other attention, every step dequantizes it."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 32, config=None):
        check_options(bits, group_size, residual_length)
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        windows = _sliding_windows(config)
        if windows is None:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(bits, group_size, residual_length))
        else:
            super().__init__(layers=[QuantizedKVLayer(bits, group_size, residual_length, w) for w in windows])

    def nbytes(self) -> int:
        """Bytes held by every layer (packed parts and residual windows)."""
        return sum(layer.nbytes() for layer in self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is None and not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx}: this cache holds {len(self.layers)} layers; it was made for "
                             f"another model")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def save(self, path) -> "os.PathLike":
        """Writes the cache (packed blocks and residual windows, entropy-coded losslessly) to ``path``,
        to continue from later with ``QuantizedKVCache.load`` instead of recomputing the prefill."""
        from lowbit.kv import storage

        return storage.save(self, path)

    @classmethod
    def load(cls, path, device="cpu") -> "QuantizedKVCache":
        """The cache ``save`` wrote, on ``device``; refuses altered, truncated or foreign files."""
        from lowbit.kv import storage

        return storage.load(path, device)


def _sliding_windows(config) -> list[int | None] | None:
    """Per decoder layer, its sliding window or None (full attention); None without a config."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    if count is None:
        return None
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        return [window] * count if window else [None] * count
    return [window if t == "sliding_attention" else None for t in types]
