"""The op contract: how a lowbit op is defined, how each backend registers its implementation, and
the one rule that picks a backend.

Every op ``<name>`` exists as one registered ``torch.library`` op per backend, all with the same
schema and the same fake (meta) implementation:

=============================== ================================================================
``lowbit::<name>``              the native kernels: C++ for CPU tensors (backend ``cpu``), CUDA
                                for CUDA tensors (backend ``cuda``), attached per dispatch key by
                                ``lowbit._C`` (``csrc/bindings/<family>[_cuda].cpp``)
``lowbit::<name>_triton``       the Triton kernels (``torch.library.triton_op``, so inductor and
                                CUDA graphs see the kernels), defined when first asked for
``lowbit::<name>_reference``    the plain PyTorch reference, the spec; runs on any device
=============================== ================================================================

The backend is chosen once, never inside a call: ``op(name, backend, device)`` applies the rule
(the ``backend`` argument, else ``LOWBIT_BACKEND``, else ``auto``) and returns the registered op,
which callers (the public wrappers in ``lowbit.ops``, the modules) then call directly. Calling
``torch.ops.lowbit.<name>`` runs the native kernel of the input's device and nothing else.

=========== ==================================================================================
``auto``    the fastest implementation of the op that can run on the device: on CUDA tensors
            ``cuda``, else ``triton``, else ``reference``; on CPU tensors ``cpu``, else
            ``reference``. Triton on CPU (its interpreter) is never chosen by ``auto``.
``cuda``    lowbit's CUDA kernel (CUDA tensors only)
``triton``  lowbit's Triton kernel (CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1``)
``cpu``     lowbit's C++ CPU kernel (CPU tensors only)
``reference`` the plain PyTorch reference: the spec, runs on any device
=========== ==================================================================================

A name means the same for every op. An explicit choice that cannot run raises
``BackendUnavailableError`` saying what is missing; ``auto`` only picks one that runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable

import torch

from lowbit import _native
from lowbit.errors import BackendUnavailableError, FormatError

LIB = torch.library.Library("lowbit", "DEF")

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# The prefix of every error about corrupted data raised by a kernel (csrc/bindings/common.h, kCorrupted).
CORRUPTED = "corrupted "


@dataclasses.dataclass
class OpDef:
    name: str
    schema: str  # "(args) -> returns", without the name
    fake: Callable
    native: tuple[str, ...]  # devices with a native kernel: "cpu", "cuda"
    triton: str | None  # module that defines lowbit::<name>_triton when imported
    backward: tuple[Callable, Callable] | None  # (setup_context, backward) for torch.library.register_autograd


_OPS: dict[str, OpDef] = {}


def define(name: str, schema: str, *, fake: Callable, reference: Callable, native: tuple[str, ...] = ("cpu", "cuda"),
           triton: str | None = None, backward=None) -> None:
    """Define ``lowbit::<name>`` (native) and ``lowbit::<name>_reference`` with ``schema``.

    fake: the fake implementation, which also runs the argument checks that need no data.
    reference: the reference implementation (it should check its arguments like the fake).
    native: the devices whose kernels ``lowbit._C`` registers for ``lowbit::<name>``.
    triton: the module (e.g. ``"lowbit.triton_kernels.int8"``) whose import defines
        ``lowbit::<name>_triton`` with ``triton_op``.
    backward: ``(setup_context, backward)``, the autograd formula shared by every backend.
    """
    if name in _OPS:
        raise ValueError(f"lowbit::{name} is defined twice")
    _OPS[name] = OpDef(name, schema, fake, native, triton, backward)
    for op_name in (name, f"{name}_reference"):
        LIB.define(op_name + schema)
        torch.library.register_fake(f"lowbit::{op_name}", fake, lib=LIB)
    LIB.impl(f"{name}_reference", reference, "CompositeExplicitAutograd")
    status = _native.status()
    for device in native:
        if not status.loaded or (device == "cuda" and not status.cuda):
            LIB.impl(name, _missing_native(name, device), device.upper())
    if backward is not None:
        for op_name in (name, f"{name}_reference"):
            torch.library.register_autograd(f"lowbit::{op_name}", backward[1], setup_context=backward[0], lib=LIB)


def _missing_native(name: str, device: str) -> Callable:
    def missing(*args, **kwargs):
        raise BackendUnavailableError(f"lowbit::{name}: {why_unavailable(device, torch.device(device))}")
    return missing


def finish_triton(op) -> None:
    """Called by a Triton module on each ``triton_op`` it defines: shares the op's fake and backward."""
    name = op._name.removeprefix("lowbit::").removesuffix("_triton")
    spec = _OPS[name]
    op.register_fake(spec.fake)
    if spec.backward is not None:
        op.register_autograd(spec.backward[1], setup_context=spec.backward[0])


def definitions() -> dict[str, OpDef]:
    return dict(_OPS)


def implementations(name: str) -> tuple[str, ...]:
    """The backends that implement ``name`` (whether or not they can run here)."""
    spec = _OPS[name]
    return tuple(b for b in BACKENDS[1:] if b == "reference" or b in spec.native or (b == "triton" and spec.triton))


# os.environ's own mapping (bytes on POSIX): the variable is read at every call, and through
# os.environ that costs about as much as the rest of a call's dispatch.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("LOWBIT_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str:
    if _ENVIRON is not None and _ENV_KEY is not None:
        value = _ENVIRON.get(_ENV_KEY)
        return "auto" if value is None else os.environ.decodevalue(value)
    return os.environ.get("LOWBIT_BACKEND", "auto")


def requested(backend: str | None = None) -> str:
    """The backend a call asks for: its argument, else ``LOWBIT_BACKEND``, else ``auto``."""
    name = backend if backend is not None else _env_backend()
    if name not in BACKENDS:
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


def _resolve(name: str, backend: str, device_type: str) -> str:
    impls = implementations(name)
    device = torch.device(device_type)
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device_type, ()):
            if candidate in impls and why_unavailable(candidate, device) is None:
                return candidate
        return "reference"
    if backend not in impls:
        raise BackendUnavailableError(f"lowbit::{name} has no {backend!r} implementation; it has {', '.join(impls)}")
    why = why_unavailable(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"lowbit::{name}: {why}")
    return backend


def resolve(name: str, backend: str | None, device: torch.device | str) -> str:
    """The concrete backend that runs ``name`` on ``device`` under the selection rule."""
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; lowbit defines {', '.join(_OPS)}")
    return _resolve(name, requested(backend), torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _op_for(name: str, backend: str, device_type: str) -> torch._ops.OpOverload:
    chosen = _resolve(name, backend, device_type)
    if chosen == "triton":
        importlib.import_module(_OPS[name].triton)
        return getattr(torch.ops.lowbit, f"{name}_triton").default
    if chosen == "reference":
        return getattr(torch.ops.lowbit, f"{name}_reference").default
    return getattr(torch.ops.lowbit, name).default


def op(name: str, backend: str | None, device: torch.device | str) -> torch._ops.OpOverload:
    """The registered op that runs ``name`` on ``device`` for ``backend`` (None: the rule).

    Resolution is cached per (op, backend, device type); call it once and keep the result (as the
    modules do), or per call from a wrapper (a dict lookup)."""
    return _op_for(name, requested(backend), device.type if isinstance(device, torch.device) else device)


def clear_cache() -> None:
    """Forget resolved backends (after the environment changed, in tests)."""
    _op_for.cache_clear()
    _triton_error.cache_clear()


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend, None if it can run on ``device`` here, else the reason it cannot."""
    device = torch.device(device)
    return {b: why_unavailable(b, device) for b in BACKENDS[1:]}


def raising_format_errors(fn: Callable) -> Callable:
    """Wrap a call of a kernel that reports corrupted data as ``ValueError("corrupted ...")`` so that
    it raises ``FormatError``, the one exception type for corrupted data."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            if str(exc).startswith(CORRUPTED) and not isinstance(exc, FormatError):
                raise FormatError(str(exc)) from None
            raise
    return call
