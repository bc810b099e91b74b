"""lowbit: run neural networks from compressed weights and a compressed KV cache.

Kernels are ``torch.library`` custom ops in the ``lowbit`` namespace (``lowbit.ops``); the backend
that runs them is chosen by one rule (``lowbit.backend``).
"""

from lowbit import backend, ops, registry
from lowbit import dfloat, files, int8, nn
from lowbit import codebook
from lowbit import quantization
from lowbit.quantization import quantize
from lowbit import checkpoint
from lowbit.checkpoint import load, save
from lowbit.errors import BackendUnavailableError, FormatError, LowbitError
from lowbit import integrations

integrations.install()

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "FormatError", "LowbitError", "backend", "checkpoint", "codebook", "dfloat", "files", "int8", "load",
    "nn", "ops", "quantization",
    "quantize", "registry", "save", "__version__",
]
