"""codebook: additive vector quantization in AQLM's layout (2 bits per weight in 2x8 and 1x16).

``CodebookLinear`` is the drop-in module; ``encode`` makes its stored form (docs/formats.md,
"codebook"). The exact definition of the product is in ``lowbit.reference.codebook``.
"""

from lowbit.codebook import demo
from lowbit.codebook.encoder import CodebookWeight, bits_per_weight, encode
from lowbit.codebook.linear import CodebookLinear
from lowbit.registry import Family, register

__all__ = ["CodebookLinear", "CodebookWeight", "bits_per_weight", "encode"]

# In the model demo, 2-bit codebooks are calibrated (on text disjoint from the evaluated span) and
# held against scalar 3-bit rounding, as AQLM's 2-bit results are held against 3-bit ones.
register(Family("codebook", CodebookLinear, calibration="xtx", demo=demo.demo,
                description="2-bit additive vector quantization (AQLM's layout): codes into learned codebooks",
                model_demo={"calibration_tokens": 2048}, demo_baseline=(3, 128)))
