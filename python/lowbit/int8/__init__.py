"""int8: LLM.int8() weights (int8 with per-row scales) and the decomposed product.

``Int8Linear`` is the drop-in module; ``quantize_linear`` and ``static_columns`` build its stored
form (docs/formats.md, "int8"). The exact definition of the product is in
``lowbit.reference.int8``.
"""

from lowbit import _native
from lowbit.int8 import demo
from lowbit.int8.format import Int8Weight, quantize_linear, static_columns
from lowbit.int8.linear import Int8Linear
from lowbit.registry import Family, register

__all__ = ["Int8Linear", "Int8Weight", "quantize_linear", "static_columns"]



def _info(device) -> list[str]:
    """The CPU int8 GEMM's path on this host (csrc/bindings/int8.cpp auto_path)."""
    if device.type != "cpu" or not _native.status().loaded:
        return []
    from lowbit import _C

    return [f"CPU int8 GEMM: {_C.cpu_int8_gemm_path()} (amx, onednn, avx2 or int_mm; LOWBIT_CPU_INT8_GEMM forces one)"]


register(Family("int8", Int8Linear, calibration="absmax", demo=demo.demo, info=_info,
                description="LLM.int8(): int8 weights, outlier activations in 16 bit"))
