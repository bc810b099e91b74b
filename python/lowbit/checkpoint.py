"""``lowbit.save(model, dir)`` / ``lowbit.load(dir)``: a whole model with lowbit layers, as files.

A checkpoint folder (docs/formats.md, "Checkpoints") holds:

- ``lowbit.json``: format and version, the lowbit version that wrote it, the methods used, each
  lowbit layer's ``config()`` by qualified name, the ``nn.Linear`` layers left dense, tied tensors
  (saved once), and the CRC-32 of every stored tensor;
- ``model.safetensors``, or shards ``model-00001-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` (transformers' layout), holding ``model.state_dict()``;
- for a transformers model, its ``config.json`` (with ``quantization_config``: quant_method
  "lowbit" and the same per-layer configs, so that ``from_pretrained`` reads the folder after
  ``import lowbit``) and ``generation_config.json``.

``load`` builds the model with its parameters on ``meta`` (nothing allocated), puts an empty lowbit
layer where each was, and fills every tensor from the memory-mapped shards with
``load_state_dict(assign=True)``: memory peaks at about the compressed model. Each lowbit layer
checks its stored-form header; every tensor's CRC-32 is checked against ``lowbit.json``. A
corrupted, truncated or foreign file raises ``FormatError`` naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import zlib
from pathlib import Path

import torch
from torch import nn

from lowbit import files, registry
from lowbit.errors import FormatError, LowbitError
from lowbit.nn.base import LowbitLinear

FORMAT = "lowbit.checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "lowbit.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30


def _version() -> str:
    import lowbit

    return lowbit.__version__


def tensor_crc(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data.data)


def layer_configs(model: nn.Module) -> dict[str, dict]:
    """Qualified name -> ``config()`` of every lowbit layer of ``model``."""
    return {fqn: module.config() for fqn, module in model.named_modules() if isinstance(module, LowbitLinear)}


def checkpoint_config(model: nn.Module, tied: dict[str, str] | None = None,
                      checksums: dict[str, int] | None = None) -> dict:
    """What ``lowbit.json`` (and a transformers ``quantization_config``) says of ``model``."""
    layers = layer_configs(model)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": _version(),
        "methods": sorted({c["family"] for c in layers.values()}),
        "layers": layers,
        "dense_linear": [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear],
        "tied": tied or {},
        "checksums": checksums or {},
    }


def quantization_config(config: dict) -> dict:
    """The ``quantization_config`` of a transformers config.json: the checkpoint config without
    the checksums (which ``lowbit.json`` keeps)."""
    return {"quant_method": "lowbit", **{k: v for k, v in config.items() if k != "checksums"}}


def check_config(config: dict, where: str) -> None:
    """Refuse a checkpoint config this lowbit cannot read: foreign, newer, or naming a method that
    is not registered."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FormatError(f"{where} is not a lowbit checkpoint config (its format is not {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise FormatError(f"{where} has checkpoint format version {version!r}; this lowbit ({_version()}) reads "
                          f"versions up to {FORMAT_VERSION}: upgrade lowbit to load it")
    known = {f.name for f in registry.families()}
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise FormatError(f"{where}: 'layers' must map layer names to configs")
    for fqn, layer in layers.items():
        family = layer.get("family") if isinstance(layer, dict) else None
        if family not in known:
            raise FormatError(f"{where}: layer {fqn!r} uses method {family!r}, which this lowbit does not know "
                              f"(known: {', '.join(sorted(known))})")


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, tied): a tensor that shares memory with an earlier one (tied weights) is saved
    once; ``tied`` maps the dropped name to the kept one."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise LowbitError(f"model tensor {name!r} is on the meta device (not loaded): nothing to save")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().cpu().contiguous()
    return kept, tied


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save(model: nn.Module, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         progress: bool = True) -> Path:
    """Save ``model`` (with lowbit layers, e.g. after ``lowbit.quantize``) to the folder ``path``
    (created if needed; files of an earlier checkpoint there are replaced). Returns the folder."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be an int >= 1, got {max_shard_bytes!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LowbitError(f"path {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors, tied = _dedupe(model.state_dict())
    checksums = {name: tensor_crc(t) for name, t in tensors.items()}
    config = checkpoint_config(model, tied, checksums)
    shards = _shards(tensors, max_shard_bytes)
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in tqdm(list(zip(names, shards)), desc="lowbit save", unit="shard",
                            disable=not progress or len(shards) < 2):
        files.write_file(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        files.write_text(folder / INDEX_NAME, json.dumps(index, indent=1))
    hf_config = getattr(model, "config", None)
    if hasattr(hf_config, "to_json_string"):
        hf_config = copy.deepcopy(hf_config)
        hf_config.architectures = hf_config.architectures or [type(model).__name__]
        hf_config.quantization_config = quantization_config(config)
        files.write_text(folder / "config.json", hf_config.to_json_string(use_diff=True))
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            files.write_text(folder / "generation_config.json", generation.to_json_string(use_diff=True))
    files.write_text(folder / CONFIG_NAME, json.dumps(config, indent=1))
    return folder


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on ``meta`` (allocated one at a time, then dropped) and
    their buffers where they are made: computed buffers (a rotary table) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path.parent} is not a lowbit checkpoint: it has no {path.name}") from None
    except ValueError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None


def read_config(folder: Path) -> tuple[dict, str]:
    """(checkpoint config, the file it came from): ``lowbit.json``, else the ``quantization_config``
    of a transformers config.json that ``save_pretrained`` wrote for a lowbit model."""
    if (folder / CONFIG_NAME).exists():
        return _read_json(folder / CONFIG_NAME), str(folder / CONFIG_NAME)
    hf = folder / "config.json"
    quantization = _read_json(hf).get("quantization_config") if hf.exists() else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "lowbit":
        raise FormatError(f"{folder} is not a lowbit checkpoint: it has no {CONFIG_NAME} and no config.json whose "
                          "quantization_config is lowbit's")
    return {k: v for k, v in quantization.items() if k != "quant_method"}, f"{hf} (quantization_config)"


def tied_linear(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module``'s weight shares memory with another parameter of ``model`` (a tied output layer)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return False
    ptr = weight.untyped_storage().data_ptr()
    return sum(p.untyped_storage().data_ptr() == ptr for _, p in model.named_parameters(remove_duplicate=False)
               if p.device.type != "meta") > 1


def _transformers_skeleton(folder: Path, dtype) -> nn.Module:
    if not (folder / "config.json").exists():
        raise LowbitError(f"{folder} holds no transformers config.json, so lowbit cannot build the model: pass "
                          "model= (the architecture, e.g. built under lowbit.checkpoint.parameters_on_meta())")
    try:
        import transformers
    except ModuleNotFoundError:
        raise LowbitError(f"{folder} holds a transformers model: install transformers to load it, or pass "
                          "model=") from None
    config = transformers.AutoConfig.from_pretrained(folder)
    config.quantization_config = None  # the layers are swapped here, not by the quantizer
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise LowbitError(f"{folder}/config.json names no architecture this transformers has ({names}): pass model=")
    with parameters_on_meta():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    return model


def _shard_files(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index}: no weight_map")
        return weight_map
    if not (folder / WEIGHTS_NAME).exists():
        raise FormatError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return {}


def _read_shards(folder: Path, weight_map: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, name -> file) from the memory-mapped shards; unreadable files -> FormatError."""
    from safetensors import safe_open

    names = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_NAME]
    tensors, where = {}, {}
    for name in names:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    where[key] = str(path)
        except FileNotFoundError:
            raise FormatError(f"{path}: the shard is missing") from None
        except Exception as exc:  # safetensors' own error: truncated or not a safetensors file
            if isinstance(exc, (LowbitError, MemoryError)):
                raise
            raise FormatError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    return tensors, where


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device=None, dtype=None,
         backend: str | None = None) -> nn.Module:
    """Load a checkpoint written by ``lowbit.save`` (or by ``save_pretrained`` of a lowbit model).

    model: the architecture to fill, dense (its linear layers are replaced as the checkpoint
        says; its parameters may be on ``meta``). None: build it from the folder's transformers
        ``config.json``.
    device: where to put the model (default: CPU, where the shards are mapped).
    dtype: the dtype of the dense parts when the model is built from config.json (default: the
        checkpoint's). backend: the lowbit layers' backend.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise LowbitError(f"path {folder} is not a folder")
    config, where_config = read_config(folder)
    check_config(config, where_config)
    if model is None:
        model = _transformers_skeleton(folder, dtype)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    swap_layers(model, config["layers"], backend=backend)
    tensors, where = _read_shards(folder, _shard_files(folder))
    checksums = config.get("checksums", {})
    for key, t in tensors.items():
        if key in checksums and tensor_crc(t) != checksums[key]:
            raise FormatError(f"{where[key]}: tensor {key!r} fails its checksum: the file was altered or damaged")
    tied = config.get("tied", {})
    _fill(model, tensors, where, tied)
    if device is not None:
        model.to(device)
    return model.eval()


def swap_layers(model: nn.Module, layers: dict[str, dict], *, backend: str | None = None) -> None:
    """Replace each layer named in ``layers`` by an empty lowbit layer (on ``meta``) built from its config."""
    for fqn, layer_config in layers.items():
        parent_name, _, attr = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            getattr(parent, attr)
        except AttributeError:
            raise FormatError(f"the checkpoint has a layer {fqn!r}, which the model does not have") from None
        family = registry.get(layer_config["family"])
        try:
            layer = family.module.from_config(layer_config, device="meta", backend=backend)
        except (TypeError, ValueError, KeyError) as exc:
            raise FormatError(f"layer {fqn!r}: its config cannot build a {family.module.__name__} ({exc})") from None
        setattr(parent, attr, layer)


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], where: dict[str, str], tied: dict[str, str]) -> None:
    """Load ``tensors`` into ``model`` (assign=True), layer by layer for the lowbit ones so that an
    error names its file and tensor; then re-tie and check that nothing is left on meta."""
    lowbit_layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, LowbitLinear)}
    used = set()
    for fqn, layer in lowbit_layers.items():
        prefix = fqn + "."
        part = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in part)
        try:
            layer.load_state_dict(part, assign=True)
        except RuntimeError as exc:
            files_ = sorted({where[prefix + k] for k in part}) or ["the checkpoint"]
            message = " ".join(str(exc).split())
            raise FormatError(f"{', '.join(files_)}: layer {fqn!r}: {message}") from None
    rest = {k: t for k, t in tensors.items() if k not in used}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        key = result.unexpected_keys[0]
        raise FormatError(f"{where.get(key, 'the checkpoint')}: tensor {key!r} belongs to no part of the model")
    for name, source in tied.items():
        owner_name, _, attr = name.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        value = getattr(model.get_submodule(src_owner), src_attr)
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = value
        else:
            owner._buffers[attr] = value
    if not tied and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # save_pretrained drops tied tensors without saying which: transformers re-ties
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise FormatError(f"the checkpoint has no tensor for {left[0]!r} ({len(left)} left unloaded)")
