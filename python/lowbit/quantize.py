"""``lowbit.quantize(model, method)``: swap a model's ``nn.Linear`` modules for lowbit's."""

from __future__ import annotations

from typing import Callable

from torch import nn
from tqdm.auto import tqdm

from lowbit.dfloat.linear import DFloatLinear
from lowbit.int8.linear import Int8Linear

METHODS: dict[str, Callable[..., nn.Module]] = {
    "dfloat": DFloatLinear.from_linear,
    "int8": Int8Linear.from_linear,
}


def quantize(model: nn.Module, method: str, *, skip: tuple[str, ...] = (), progress: bool = True,
             **options) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (except those whose qualified name starts
    with a prefix in ``skip``) by ``method``'s module built with ``from_linear(linear, **options)``.
    Shows a progress bar over the layers unless ``progress=False``. Returns ``model``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    build = METHODS[method]
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name.startswith(prefix) for prefix in skip)
    ]
    for name, linear in tqdm(targets, desc=f"lowbit {method}", unit="layer", disable=not progress):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, build(linear, **options))
    return model
