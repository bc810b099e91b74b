"""The families lowbit knows: each registers itself here, and ``quantize``, save/load, the CLI and
the demo iterate over this registry instead of naming families.

A family's package ends with one line, e.g.::

    register(Family("int8", Int8Linear, calibration="absmax", description="..."))
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

CALIBRATION_STATISTICS = ("absmax", "xtx")


@dataclass(frozen=True)
class Family:
    """What the shared code needs to know about one family of formats.

    name: what users pass as ``method`` ("int8").
    module: its drop-in module class, built by ``module.from_linear(linear, **options)``.
    calibration: the statistic ``quantize(..., calibration=batches)`` collects for each layer
        (see ``lowbit.quantization.COLLECTORS``): "absmax", "xtx", or None when it takes none.
    demo: a ``lowbit demo`` section run on a device; returns whether it passed.
    add_cli: adds the family's subcommands to the ``lowbit`` parser.
    info: lines ``lowbit info`` prints for a device (which kernel path this host takes, ...).
    model_demo: keyword arguments of ``lowbit.evaluation.run_method`` for this family in the model
        part of ``lowbit demo`` (e.g. ``{"calibration_tokens": 2048}``).
    demo_baseline: (bits, group) of the round-to-nearest baseline a lossy family must beat in that
        part (its perplexity at most the baseline's), instead of staying within 5% of dense.
    """

    name: str
    module: type
    calibration: str | None = None
    demo: Callable[[torch.device], bool] | None = None
    add_cli: Callable[[argparse._SubParsersAction], None] | None = None
    description: str = ""
    info: Callable[[torch.device], list[str]] | None = None
    model_demo: dict = field(default_factory=dict)
    demo_baseline: tuple[int, int] | None = None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family``; a second family of the same name is refused, since ``get`` could not tell
    them apart."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be a lowbit.registry.Family, got {type(family).__name__}")
    if family.calibration not in (None, *CALIBRATION_STATISTICS):
        raise ValueError(f"calibration of family {family.name!r} must be None or one of "
                         f"{', '.join(CALIBRATION_STATISTICS)}, got {family.calibration!r}")
    if family.name in _FAMILIES:
        raise ValueError(f"a family named {family.name!r} is already registered "
                         f"({_FAMILIES[family.name].module.__qualname__})")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> Family:
    """Remove the family registered as ``name`` and return it (for tests that register their own)."""
    family = get(name)
    del _FAMILIES[name]
    return family


def get(name: str) -> Family:
    """The family registered as ``name``."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"name must be a registered family ({', '.join(_FAMILIES) or 'none registered'}), "
                         f"got {name!r}") from None


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())
