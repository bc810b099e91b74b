"""Drop-in replacements for ``torch.nn.Linear`` that run from compressed weights."""

from lowbit.dfloat.linear import DFloatLinear

__all__ = ["DFloatLinear"]
