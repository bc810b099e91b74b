"""The op contract: the schema and fake (meta) implementation of every lowbit kernel.

Each public op ``lowbit::<name>`` takes a trailing ``str backend`` argument and is registered for
the CPU and CUDA dispatch keys with one router, which picks the implementation under the rule in
``lowbit.backend`` and runs it. Implementations per backend:

- ``reference``: ``lowbit.reference.<family>`` (plain PyTorch, the spec);
- ``triton``: ``lowbit.triton_kernels.<family>``, imported on first use;
- ``cpu`` / ``cuda``: the private op ``lowbit::_<name>_native``, whose schema is defined here and
  whose kernels ``lowbit._C`` registers per device (csrc/bindings.cpp, csrc/bindings_cuda.cpp).

Argument checks run in the router and in the fake, so every backend, eager or traced by
``torch.compile``, refuses bad input with the same message. The module-level functions are the
Python API: ``lowbit.ops.pack_bits(values, bits, backend=None)``.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from lowbit import _native, backend as _backend
from lowbit.reference import bitpack as _ref_bitpack

_lib = torch.library.Library("lowbit", "DEF")


def _triton(family: str):
    return importlib.import_module(f"lowbit.triton_kernels.{family}")


def _define(name: str, args: str, returns: str, fake, check, impls: dict) -> None:
    """Define ``lowbit::name`` (public, with backend) and ``lowbit::_name_native``.

    ``fake`` and ``check`` take the public op's arguments, ``backend`` last with a default, so
    they serve both ops.
    """
    _lib.define(f"{name}({args}, str backend=\"auto\") -> {returns}")
    _lib.define(f"_{name}_native({args}) -> {returns}")
    signature = inspect.signature(fake)

    def bind(args, kwargs) -> list:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def checked_fake(*args, **kwargs):
        check(*args, **kwargs)
        return fake(*args, **kwargs)

    torch.library.register_fake(f"lowbit::{name}", checked_fake, lib=_lib)
    torch.library.register_fake(f"lowbit::_{name}_native", checked_fake, lib=_lib)

    native = getattr(torch.ops.lowbit, f"_{name}_native")
    for backend_name, fn in impls.items():
        _backend.register(name, backend_name, fn)
    _backend.register(name, "cpu", native)
    _backend.register(name, "cuda", native)

    def route(*args, **kwargs):
        *args, backend = bind(args, kwargs)
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        check(*args)
        return _backend.implementation(name, backend, args[0].device)(*args)

    _lib.impl(name, route, "CPU")
    _lib.impl(name, route, "CUDA")


# ---------------------------------------------------------------------------------------------
# Bit packing: uint8 values of 1, 2, 4 or 8 bits, packed along the last dimension.


def _check_bits(bits: int) -> None:
    if bits not in _ref_bitpack.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_ref_bitpack.SUPPORTED_BITS}, got {bits}")


def _check_pack(values: torch.Tensor, bits: int, backend: str = "auto") -> None:
    _check_bits(bits)
    if values.dtype != torch.uint8:
        raise TypeError(f"values must be a uint8 tensor, got {values.dtype}")
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension, got a 0-dim tensor")


def _check_unpack(packed: torch.Tensor, bits: int, n: int, backend: str = "auto") -> None:
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension, got a 0-dim tensor")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    expected = _ref_bitpack.packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes in its last dimension; {n} values of {bits} bits "
            f"take {expected}"
        )


def _fake_pack(values: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    nbytes = _ref_bitpack.packed_length(values.shape[-1], bits)
    return values.new_empty((*values.shape[:-1], nbytes))


def _fake_unpack(packed: torch.Tensor, bits: int, n: int, backend: str = "auto") -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], n))


_define(
    "pack_bits",
    "Tensor values, int bits",
    "Tensor",
    _fake_pack,
    _check_pack,
    {
        "reference": _ref_bitpack.pack_bits,
        "triton": lambda values, bits: _triton("bitpack").pack_bits(values, bits),
    },
)
_define(
    "unpack_bits",
    "Tensor packed, int bits, int n",
    "Tensor",
    _fake_unpack,
    _check_unpack,
    {
        "reference": _ref_bitpack.unpack_bits,
        "triton": lambda packed, bits, n: _triton("bitpack").unpack_bits(packed, bits, n),
    },
)


def pack_bits(values: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack uint8 values of ``bits`` bits (1, 2, 4 or 8) along the last dimension.

    values: uint8 [..., n] -> uint8 [..., ceil(n * bits / 8)]. Only the low ``bits`` bits of each
    value are kept. The layout is in docs/formats.md ("Packed integers").
    """
    return torch.ops.lowbit.pack_bits(values, bits, _backend.requested(backend))


def unpack_bits(packed: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    return torch.ops.lowbit.unpack_bits(packed, bits, n, _backend.requested(backend))


# The schemas exist now, so the extension's kernels can attach to them.
_native.status()
