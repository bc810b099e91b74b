"""Drop-in replacements for ``torch.nn.Linear`` that run from compressed weights."""

from lowbit.dfloat.linear import DFloatLinear
from lowbit.int8.linear import Int8Linear

__all__ = ["DFloatLinear", "Int8Linear"]
