"""lowbit's ops: every kernel is a ``torch.library`` op in the ``lowbit`` namespace.

``lowbit.ops.<name>(..., backend=None)`` picks the backend by the rule in ``lowbit.ops._contract``
(the argument, else ``LOWBIT_BACKEND``, else ``auto``) and calls that backend's registered op:
``torch.ops.lowbit.<name>`` (native: C++ on CPU, CUDA on GPU), ``torch.ops.lowbit.<name>_triton``
or ``torch.ops.lowbit.<name>_reference``. Modules resolve their ops once and call them directly.

Each family's schemas, fakes, checks and wrappers live in ``lowbit/ops/<family>.py``; this package
imports them all, so ``lowbit.ops`` is the one place to read every op.
"""

from lowbit import _native
from lowbit.ops._contract import available, definitions, implementations, op, requested, resolve, why_unavailable
from lowbit.ops.bitpack import pack_bits, unpack_bits
from lowbit.ops.codebook import codebook_dequantize, codebook_matmul, codebook_nearest
from lowbit.ops.dfloat import MAX_WINDOW_BITS, MAX_WINDOWS_PER_BLOCK, dfloat_decode, dfloat_gemv
from lowbit.ops.int8 import int8_gemv, int8_linear, int8_matmul, int8_prepass
from lowbit.ops.kv import kv_decode_attention, kv_quantize

# The schemas exist now, so the extension's kernels can attach to them.
_native.status()

__all__ = [
    "MAX_WINDOWS_PER_BLOCK", "MAX_WINDOW_BITS", "available", "codebook_dequantize", "codebook_matmul",
    "codebook_nearest", "definitions", "dfloat_decode", "dfloat_gemv",
    "implementations", "int8_gemv", "int8_linear", "int8_matmul", "int8_prepass", "kv_decode_attention",
    "kv_quantize", "op", "pack_bits", "requested", "resolve", "unpack_bits", "why_unavailable",
]
