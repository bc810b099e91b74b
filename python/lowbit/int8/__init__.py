"""int8: LLM.int8() weights (int8 with per-row scales) and the decomposed product.

``Int8Linear`` is the drop-in module; ``quantize_linear`` and ``static_columns`` build its stored
form (docs/formats.md, "int8"). The exact definition of the product is in
``lowbit.reference.int8``.
"""

from lowbit.int8 import demo
from lowbit.int8.format import Int8Weight, quantize_linear, static_columns
from lowbit.int8.linear import Int8Linear
from lowbit.registry import Family, register

__all__ = ["Int8Linear", "Int8Weight", "quantize_linear", "static_columns"]

register(Family("int8", Int8Linear, calibration="absmax", demo=demo.demo,
                description="LLM.int8(): int8 weights, outlier activations in 16 bit"))
