"""``lowbit.quantize(model, method)``: swap a model's ``nn.Linear`` modules for lowbit's."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.dfloat.linear import DFloatLinear
from lowbit.int8.linear import Int8Linear

METHODS: dict[str, Callable[..., nn.Module]] = {
    "dfloat": DFloatLinear.from_linear,
    "int8": Int8Linear.from_linear,
}
CALIBRATED = ("int8",)


def quantize(model: nn.Module, method: str, *, skip: tuple[str, ...] = (), progress: bool = True,
             calibration: Iterable | None = None, **options) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (except those whose qualified name starts
    with a prefix in ``skip``) by ``method``'s module built with ``from_linear(linear, **options)``.
    Shows a progress bar over the layers unless ``progress=False``. Returns ``model``.

    calibration (method "int8"): sample inputs to the model, an iterable of batches, each a tensor
    (``model(batch)``), a tuple (``model(*batch)``) or a dict (``model(**batch)``). They are run
    through the model first and each layer gets, as its calibration, the largest |input| per
    feature it saw, so its outlier features become static columns.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if calibration is not None and method not in CALIBRATED:
        raise ValueError(f"calibration applies to the methods {', '.join(CALIBRATED)}, not {method!r}")
    build = METHODS[method]
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name.startswith(prefix) for prefix in skip)
    ]
    peaks = input_peaks(model, dict(targets), calibration, progress) if calibration is not None else {}
    for name, linear in tqdm(targets, desc=f"lowbit {method}", unit="layer", disable=not progress):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer_options = {**options, "calibration": peaks[name][None, :]} if name in peaks else options
        setattr(parent, attr, build(linear, **layer_options))
    return model


@torch.no_grad()
def input_peaks(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and return, for each named layer, max |input| per input
    feature (fp32 [in_features]) over everything it saw."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().abs().nan_to_num(0.0)
            peak = x.amax(0) if x.shape[0] else x.new_zeros(x.shape[1])
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        for batch in tqdm(batches, desc="lowbit calibration", unit="batch", disable=not progress):
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return peaks
