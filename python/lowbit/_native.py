"""Loading the compiled extension ``lowbit._C``.

The extension holds the C++ CPU kernels and, when built against a CUDA torch, the CUDA kernels.
Importing it registers those kernels with the dispatcher (TORCH_LIBRARY_IMPL in csrc/bindings*.cpp).
lowbit works without it: the reference and Triton backends are pure Python, and a request for a
native backend then raises an error built from ``status()``.

Set ``LOWBIT_DISABLE_NATIVE=1`` to run as if the extension were absent.
"""

from __future__ import annotations

import dataclasses
import os

BUILD_COMMAND = "pip install --no-build-isolation -e ."
BUILD_HINT = f"build it from the source tree with `{BUILD_COMMAND}` (needs a C++ compiler and ninja)"


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    loaded: bool
    cuda: bool  # the extension was compiled with its CUDA kernels
    error: str | None  # why it did not load, when it did not


def _load() -> NativeStatus:
    if os.environ.get("LOWBIT_DISABLE_NATIVE", "") not in ("", "0"):
        return NativeStatus(False, False, "disabled by LOWBIT_DISABLE_NATIVE")
    try:
        from lowbit import _C
    except Exception as exc:  # ImportError, or an OSError from a broken shared library
        return NativeStatus(False, False, f"lowbit._C failed to import ({type(exc).__name__}: {exc})")
    return NativeStatus(True, bool(_C.with_cuda()), None)


_STATUS: NativeStatus | None = None


def status() -> NativeStatus:
    """Load the extension once (after the op schemas exist) and report what it provides."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
    return _STATUS
