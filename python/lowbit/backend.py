"""One backend-selection rule for every lowbit op.

A call names a backend with its ``backend=`` argument, or else through the environment variable
``LOWBIT_BACKEND``; the default is ``auto``.

=========== ==================================================================================
``auto``    the fastest implementation that can run on the input's device: on CUDA tensors the
            CUDA kernel, else the Triton kernel, else the reference; on CPU tensors the C++ kernel,
            else the reference. Triton on CPU (its interpreter) is never chosen by ``auto``.
``cuda``    the CUDA kernel from ``lowbit._C`` (CUDA tensors only)
``triton``  the Triton kernel (CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1``)
``cpu``     the C++ kernel from ``lowbit._C`` (CPU tensors only)
``reference`` the plain PyTorch reference: the spec, runs on any device
=========== ==================================================================================

An explicit choice that cannot run raises ``BackendUnavailableError`` saying what is missing;
``auto`` only ever picks an implementation that runs, so it never returns a wrong result quietly.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from lowbit import _native
from lowbit.errors import BackendUnavailableError

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

# Preference of ``auto`` per device type; an op may leave some of these unimplemented.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# op name -> backend name -> implementation (a callable taking the op's tensor/int arguments)
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn


def implementations(op: str) -> tuple[str, ...]:
    """The backends that implement ``op`` (whether or not they can run here)."""
    return tuple(_IMPLS[op])


def requested(backend: str | None = None) -> str:
    """The backend a call asks for: its argument, else ``LOWBIT_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("LOWBIT_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else "LOWBIT_BACKEND"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"Triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on tensors on ``device``, else the reason it cannot."""
    kind = device.type
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if kind != backend:
            return f"backend {backend!r} runs on {backend.upper()} tensors, but the input is on {device}"
        native = _native.status()
        if not native.loaded:
            return f"backend {backend!r} needs the compiled extension: {native.error}; {_native.BUILD_HINT}"
        if backend == "cuda" and not native.cuda:
            return (
                "backend 'cuda' needs lowbit._C built with its CUDA kernels, but it was built without "
                "them (torch without CUDA, or nvcc not found at build time); rebuild with a CUDA build "
                f"of torch and nvcc present: `{_native.BUILD_COMMAND}`"
            )
        return None
    if backend == "triton":
        err = _triton_error()
        if err:
            return f"backend 'triton' is unavailable: {err}"
        if kind == "cpu" and not _interpreting():
            return (
                "backend 'triton' runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before starting Python"
            )
        if kind not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {kind} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``device`` under the selection rule."""
    name = requested(backend)
    impls = _IMPLS[op]
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if candidate in impls and why_unavailable(candidate, device) is None:
                return candidate
        return "reference"
    if name not in impls:
        raise BackendUnavailableError(
            f"lowbit::{op} has no {name!r} implementation; it has {', '.join(impls)}"
        )
    why = why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailableError(f"lowbit::{op}: {why}")
    return name


def implementation(op: str, backend: str | None, device: torch.device) -> Callable:
    return _IMPLS[op][resolve(op, backend, device)]


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend, None if it can run on ``device`` here, else the reason it cannot."""
    device = torch.device(device)
    return {b: why_unavailable(b, device) for b in BACKENDS[1:]}
