"""``lowbit.quantize(model, method)``: swap a model's ``nn.Linear`` modules for a family's drop-in
module, in place, one layer at a time; and the calibration statistics collected on the way.

The method names a registered family (``lowbit.registry``); nothing here names a family.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import registry


class AbsMax:
    """Statistic "absmax": the largest |x| per input feature over every row a layer saw, fp32
    [in_features]. NaN counts as 0 (a NaN row says nothing about a feature's range); inf becomes
    the largest fp32, so the feature still reads as an outlier.

    Handed to ``from_linear`` as ``calibration=peak[None, :]``: one row that reaches, in every
    feature, what the calibration inputs reached, so the family picks the same outlier features as
    it would from all of them.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.peak: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """x: [..., in_features], any float dtype."""
        x = x.detach().reshape(-1, self.in_features)
        peak = (x.float().abs().nan_to_num(0.0).amax(0) if x.shape[0]
                else torch.zeros(self.in_features, dtype=torch.float32, device=x.device))
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak.to(self.peak.device))

    def options(self) -> dict:
        """``from_linear`` keyword arguments; none for a layer that saw no input."""
        return {} if self.peak is None else {"calibration": self.peak[None, :]}


class XtX:
    """Statistic "xtx": XᵀX over every row x a layer saw, fp64 [in_features, in_features], and the
    number of rows. Non-finite elements count as 0, so that one bad token does not turn the whole
    matrix into NaN.

    fp64 because the sum runs over up to millions of rows (fp32 would lose about log2(rows) bits)
    and because fp64 products never run in TF32, whatever the caller set for fp32 matmuls. The
    price is 8·in² bytes per layer, held for every calibrated layer at once.

    Handed to ``from_linear`` as ``calibration={"xtx": xtx, "rows": rows}``.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.xtx: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """x: [..., in_features], any float dtype; every leading dimension counts as rows."""
        x = x.detach().reshape(-1, self.in_features)
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        x = x.to(device=self.xtx.device, dtype=torch.float64).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        self.xtx.addmm_(x.T, x)
        self.rows += x.shape[0]

    def options(self) -> dict:
        """``from_linear`` keyword arguments; none for a layer that saw no input."""
        return {} if self.xtx is None else {"calibration": {"xtx": self.xtx, "rows": self.rows}}


COLLECTORS: dict[str, type] = {"absmax": AbsMax, "xtx": XtX}


@torch.no_grad()
def collect(model: nn.Module, statistics: dict[str, str], batches: Iterable,
            progress: bool = True) -> dict[str, AbsMax | XtX]:
    """Run ``batches`` through ``model`` once and collect, for each layer named in ``statistics``
    (qualified name -> statistic name, a key of ``COLLECTORS``), that statistic of its inputs.

    batches: an iterable of model inputs, each a tensor (``model(batch)``), a tuple or list
    (``model(*batch)``) or a dict (``model(**batch)``); a single tensor is taken as one batch.
    Returns qualified name -> collector (``.options()`` gives its ``from_linear`` arguments).
    """
    for name, statistic in statistics.items():
        if statistic not in COLLECTORS:
            raise ValueError(f"statistic of layer {name!r} must be one of {', '.join(COLLECTORS)}, "
                             f"got {statistic!r}")
    collectors: dict[str, AbsMax | XtX] = {}
    handles = []
    try:
        for name, statistic in statistics.items():
            layer = model.get_submodule(name)
            collector = collectors[name] = COLLECTORS[statistic](layer.in_features)
            handles.append(layer.register_forward_pre_hook(_recorder(collector), with_kwargs=True))
        if isinstance(batches, torch.Tensor):
            batches = [batches]
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
    return collectors


def _recorder(collector):
    def record(module, args, kwargs):
        collector.update(args[0] if args else kwargs["input"])
    return record


def quantize(model: nn.Module, method: str, *, filter_fn: Callable[[nn.Module, str], bool] | None = None,
             calibration: Iterable | None = None, progress: bool = True, **options) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers in place by ``method``'s module, built with
    ``from_linear(linear, **options)``. Returns ``model``.

    method: a registered family (``lowbit.registry.families()``), e.g. "dfloat" or "int8".
    filter_fn(module, fqn) -> bool: True converts the layer. Only modules whose type is exactly
        ``nn.Linear`` are offered; fqn is the qualified name (``model.get_submodule(fqn)``).
        Default: every one except ``lm_head`` (a module named ``lm_head`` or ``*.lm_head``) and
        layers whose weight is tied to another parameter of the model (e.g. an embedding):
        converting those would break the tie and free no memory. A filter_fn that selects a tied
        layer gets it converted, with a warning that the tie is broken.
    calibration: sample inputs, for families that take a statistic of each layer's inputs
        (``Family.calibration``): an iterable of batches, each a tensor (``model(batch)``), a tuple
        (``model(*batch)``) or a dict (``model(**batch)``). They run through the model once before
        any layer is replaced, and each converted layer gets its statistic (``COLLECTORS``).
    progress: show progress bars (calibration batches, layers).

    Each original layer is freed as soon as its replacement is in place (nothing here holds the
    originals), so memory peaks at about the model plus one layer being converted, unless the
    caller still holds references to the layers. If the converted layers end up larger than the
    originals (small layers, whose fixed costs such as a decode table outweigh the savings), a
    warning says so.
    """
    known = [f.name for f in registry.families()]
    if method not in known:
        raise ValueError(f"method must be one of {', '.join(known)}, got {method!r}")
    family = registry.get(method)
    if calibration is not None and family.calibration is None:
        takers = [f.name for f in registry.families() if f.calibration is not None]
        raise ValueError(f"calibration must be None for method {method!r} (it takes no calibration; "
                         f"methods that do: {', '.join(takers) or 'none'}), got {type(calibration).__name__}")
    _check_options(family, options)
    names = _select(model, filter_fn)
    collectors = {}
    if calibration is not None and names:
        collectors = collect(model, dict.fromkeys(names, family.calibration), calibration, progress)
    before = after = 0
    grown = []
    for name in tqdm(names, desc=f"lowbit {method}", unit="layer", disable=not progress):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        collector = collectors.pop(name, None)  # its statistic may be large (xtx): drop it with the layer
        layer_options = {**options, **collector.options()} if collector is not None else options
        layer = family.module.from_linear(linear, **layer_options)
        old_bytes, new_bytes = module_bytes(linear), module_bytes(layer)
        before, after = before + old_bytes, after + new_bytes
        if new_bytes > old_bytes:
            grown.append(name)
        setattr(parent, attr, layer)
        del layer
        # The parent held the last reference the model had to the original; dropping ours frees
        # it now rather than when the next layer's lookup rebinds the name.
        del linear, collector, layer_options
    hf_config = getattr(model, "config", None)
    if names and hasattr(hf_config, "to_json_string"):
        # A transformers model: save_pretrained then writes a checkpoint from_pretrained and
        # lowbit.load read (quant_method "lowbit", each layer's config).
        from lowbit import checkpoint

        hf_config.quantization_config = checkpoint.quantization_config(checkpoint.checkpoint_config(model))
    if after > before:
        warnings.warn(f"quantize(method={method!r}) made the model larger: its {len(names)} converted layers take "
                      f"{after / 1e6:.2f} MB, the originals took {before / 1e6:.2f} MB ({len(grown)} layers grew, e.g. "
                      f"{', '.join(grown[:3])}); leave such layers out with filter_fn", stacklevel=2)
    return model


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (persistent or not), each storage counted once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _check_options(family: registry.Family, options: dict) -> None:
    """Refuse, before anything is converted, options that the family's ``from_linear`` would not take."""
    parameters = list(inspect.signature(family.module.from_linear).parameters.values())[1:]  # after linear
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for option in options:
        if option not in accepted:
            raise TypeError(f"method {family.name!r} takes no option {option!r}: "
                            f"{family.module.__name__}.from_linear accepts {', '.join(accepted) or 'none'}")


def _select(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None) -> list[str]:
    """Qualified names of the layers to convert (names, not modules: see ``quantize``)."""
    owners: dict[object, set[str]] = defaultdict(set)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners[_storage_key(parameter)].add(name)
    names, forced = [], []
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        tied = len(owners[_storage_key(module.weight)]) > 1
        if filter_fn is None:
            if tied or fqn == "lm_head" or fqn.endswith(".lm_head"):
                continue
        elif not filter_fn(module, fqn):
            continue
        elif tied:
            forced.append(fqn)
        names.append(fqn)
    if forced:
        warnings.warn(f"filter_fn selected layers whose weight is tied to another parameter ({', '.join(forced)}): "
                      f"they are converted and the tie is broken (the other parameters keep the original weight, "
                      f"so its memory is not freed)", stacklevel=3)
    return names


def _storage_key(parameter: torch.Tensor) -> object:
    """Equal for two parameters that share memory: the same Parameter, or views of one storage."""
    ptr = parameter.untyped_storage().data_ptr() if parameter.device.type != "meta" else 0
    # Meta and empty tensors have no address to compare; only the same object counts as tied then.
    return ("object", id(parameter)) if ptr == 0 else (parameter.device, ptr)
