"""transformers' ``quant_method: "lowbit"``: ``LowbitConfig`` and ``LowbitHfQuantizer`` (5.x).

Registered when transformers' quantizers are imported after ``import lowbit`` (``lowbit.integrations``).

- **A lowbit checkpoint** (``lowbit.save`` or ``save_pretrained`` of a lowbit model: config.json
  carries ``quantization_config`` with each layer's config) loads with ``from_pretrained(dir)``.
  transformers 5 sets tensors into the model key by key and never runs a module's
  ``_load_from_state_dict``, so before the weights load each lowbit layer's place is held by a
  ``_Slot`` with no tensors (transformers then skips its keys: no dense copy, no shape checks), and
  after it each layer is built on ``meta`` and filled from the mapped shards with its own
  ``load_state_dict(assign=True)``: the stored-form headers and checksums are checked there.
- **Quantize while loading**: ``from_pretrained(dense_dir, quantization_config=LowbitConfig(method="int8"))``
  loads the dense weights, then runs ``lowbit.quantize``; ``save_pretrained`` then writes a lowbit
  checkpoint.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

import lowbit
from lowbit import checkpoint, registry
from lowbit.errors import FormatError
from lowbit.nn.base import DTYPES, LowbitLinear

QUANT_METHOD = "lowbit"


@register_quantization_config(QUANT_METHOD)
class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lowbit model.

    method: the family ``from_pretrained`` quantizes a dense model with (quantize while loading).
    options: further ``lowbit.quantize`` keyword arguments for that (e.g. ``{"threshold": 6.0}``).
    modules_to_not_convert: layer names (or name suffixes) left dense when quantizing.
    layers: ``{layer name: config()}`` of the layers stored in lowbit form (a lowbit checkpoint);
    with format, format_version, methods, dense_linear, tied as ``lowbit.json`` has them.
    """

    def __init__(self, method: str | None = None, *, options: dict | None = None,
                 modules_to_not_convert: list[str] | None = None, layers: dict | None = None,
                 format: str = checkpoint.FORMAT, format_version: int = checkpoint.FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.method = method
        self.options = dict(options or {})
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.layers = dict(layers or {})
        self.format, self.format_version = format, format_version
        for key in ("lowbit_version", "methods", "dense_linear", "tied"):
            if key in kwargs:
                setattr(self, key, kwargs.pop(key))
        kwargs.pop("quant_method", None)
        self.post_init()

    def post_init(self):
        known = [f.name for f in registry.families()]
        if self.method is not None and self.method not in known:
            raise ValueError(f"method must be one of {', '.join(known)}, got {self.method!r}")
        checkpoint.check_config({k: v for k, v in self.__dict__.items() if k != "quant_method"},
                                "config.json's quantization_config")


class _Slot(nn.Module):
    """Holds a lowbit layer's place while transformers loads the rest: no parameters, no buffers."""

    def __init__(self, config: dict):
        super().__init__()
        self.lowbit_config = dict(config)

    def forward(self, *args, **kwargs):
        raise RuntimeError("this lowbit layer was never loaded")


def _resolve(model: nn.Module, fqn: str) -> str | None:
    """``fqn`` as a module name of ``model`` (the checkpoint may hold the base model's prefix or not)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = dict(model.named_modules())
    for candidate in (fqn, fqn.removeprefix(prefix + ".") if prefix else fqn, f"{prefix}.{fqn}" if prefix else fqn):
        if candidate in names:
            return candidate
    return None


def _read_layers(files: list[str], wanted: dict[str, str], prefix: str):
    """({model name: {local key: tensor}}, {model name: file}) for the wanted layers' keys."""
    from safetensors import safe_open

    tensors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    where: dict[str, str] = {}

    def owner(key: str) -> tuple[str | None, str]:
        path, _, name = key.rpartition(".")  # a lowbit layer has no submodules
        for candidate in (path, path.removeprefix(prefix + "."), f"{prefix}.{path}"):
            if candidate in wanted:
                return wanted[candidate], name
        return None, name

    for file in files:
        if not file.endswith(".safetensors"):
            raise FormatError(f"{file}: lowbit checkpoints are safetensors files")
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    fqn, name = owner(key)
                    if fqn is not None:
                        tensors[fqn][name] = handle.get_tensor(key)
                        where[fqn] = file
        except FormatError:
            raise
        except Exception as exc:  # safetensors' own error: truncated or not a safetensors file
            raise FormatError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    return tensors, where


def _device_of(model: nn.Module, fqn: str) -> torch.device:
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        best = max((k for k in device_map if k == "" or fqn == k or fqn.startswith(k + ".")), key=len, default=None)
        if best is not None and device_map[best] not in ("disk", "meta"):
            device = device_map[best]
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@register_quantizer(QUANT_METHOD)
class LowbitHfQuantizer(HfQuantizer):
    requires_calibration = False  # True would forbid quantizing while loading

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._files: list[str] = []
        self._slots: dict[str, str] = {}  # checkpoint name -> model name

    def validate_environment(self, device_map=None, **kwargs):
        config = self.quantization_config
        if self.pre_quantized and not config.layers:
            raise FormatError("config.json's quantization_config (lowbit) lists no layers")
        if not self.pre_quantized and config.method is None:
            raise ValueError("LowbitConfig(method=...) is needed to quantize while loading")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lowbit layers cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        if not self.pre_quantized:
            return model
        self._files = list(checkpoint_files or [])
        if not self._files:
            raise ValueError("loading a lowbit checkpoint needs its files (from_pretrained(state_dict=...) is not "
                             "supported)")
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        for saved_name, layer_config in self.quantization_config.layers.items():
            fqn = _resolve(model, saved_name)
            if fqn is None:
                raise FormatError(f"the checkpoint has a lowbit layer {saved_name!r}, which "
                                  f"{type(model).__name__} does not have")
            parent_name, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _Slot(layer_config))
            self._slots[saved_name] = fqn
            # The slot holds no tensors, so its keys would be reported as unexpected.
            ignore.add(rf"(^|\.){re.escape(fqn.removeprefix(model.base_model_prefix + '.'))}\.")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            self._fill(model)
        else:
            self._quantize(model)
        return model

    def _fill(self, model):
        tensors, where = _read_layers(self._files, dict(self._slots), model.base_model_prefix)
        model_dtype = getattr(model.config, "dtype", None)
        for saved_name, fqn in self._slots.items():
            layer_config = model.get_submodule(fqn).lowbit_config
            family = registry.get(layer_config["family"])
            layer = family.module.from_config(layer_config, device="meta")
            try:
                layer.load_state_dict(tensors.pop(fqn, {}), strict=True, assign=True)
            except RuntimeError as exc:
                raise FormatError(f"{where.get(fqn, 'the checkpoint')}: layer {saved_name!r}: "
                                  f"{' '.join(str(exc).split())}") from None
            device = _device_of(model, fqn)
            if layer.device != device:
                layer = layer.to(device)
            if isinstance(model_dtype, torch.dtype) and model_dtype in DTYPES and layer.dtype != model_dtype:
                layer = layer.to(model_dtype)  # from_pretrained(dtype=...) other than the stored one
            parent_name, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)
        self._slots.clear()

    def _quantize(self, model):
        config = self.quantization_config
        skip = config.modules_to_not_convert
        filter_fn = None
        if skip:
            def filter_fn(module, fqn):  # lowbit's default skips (lm_head, tied layers) still apply
                if fqn == "lm_head" or fqn.endswith(".lm_head") or checkpoint.tied_linear(model, module):
                    return False
                return not any(fqn == s or fqn.endswith("." + s) for s in skip)
        lowbit.quantize(model, config.method, filter_fn=filter_fn, progress=False, **config.options)
        # postprocess_model set model.config.quantization_config to this object: save_pretrained
        # writes it, so the saved folder is a lowbit checkpoint.
        for key, value in checkpoint.checkpoint_config(model).items():
            if key != "checksums":
                setattr(config, key, value)

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False
