"""vLLM's ``quantization="lowbit"``: lowbit checkpoints served by vLLM, tensor parallel included.

``register()`` is the ``vllm.general_plugins`` entry point (setup.py): vLLM calls it in every
process it starts (engine, workers) before it builds a model; it is cheap and idempotent. This
module imports vLLM; ``import lowbit`` never imports this module.

A lowbit checkpoint (``lowbit.save``, or ``save_pretrained`` after ``import lowbit``) carries
``quantization_config = {"quant_method": "lowbit", "layers": {name: config()}, ...}`` in its
config.json; vLLM reads it and asks ``LowbitVllmConfig.get_quant_method`` for each of its layers:

- a linear layer whose checkpoint parts (one, or several for a fused layer: vLLM's ``qkv_proj``
  holds ``q_proj``, ``k_proj``, ``v_proj``; ``gate_up_proj`` holds ``gate_proj``, ``up_proj``)
  are lowbit layers gets the linear method of their family; parts the checkpoint left dense get
  vLLM's ``UnquantizedLinearMethod``; embeddings and a dense ``lm_head`` stay vLLM's own.
- The method registers the stored-form tensors under their checkpoint names with a loader that
  collects one part's tensors whole, builds that part's lowbit layer from them (its stored-form
  header and checksum are checked there: a damaged file raises ``FormatError``), and keeps only
  this rank's shard of it (``LowbitLinear.narrow``): output rows of a column-parallel layer, input
  columns of a row-parallel one. Only one part of one layer is ever whole in memory.
- After loading, the parts of a fused layer are assembled (int8: one layer when their static
  columns agree, as they do when calibrated on the same inputs; dfloat: one stream; codebook:
  one layer per part, since each has its own codebooks) and ``apply`` calls the lowbit layers,
  whose forward runs lowbit's ops.

Per family, a rank holds: int8 its rows (weight, scales, static weight rows) or its columns
(weight columns, every row's scale, the static columns inside); codebook its rows' codes and
scales or its whole input groups of codes (a shard boundary inside a group is refused), the
codebooks on every rank; dfloat a stream re-encoded from its slice of the decoded weight.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear, UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.utils import set_weight_attrs

from lowbit import checkpoint, registry
from lowbit.errors import FormatError, LowbitError

QUANT_METHOD = "lowbit"

# vLLM's shard ids for the parts of its fused layers: "q"/"k"/"v" for QKVParallelLinear,
# 0, 1, ... for MergedColumnParallelLinear.
_QKV = {"q": 0, "k": 1, "v": 2}


class LowbitVllmConfig(QuantizationConfig):
    """vLLM's view of a lowbit checkpoint config (docs/formats.md, "Checkpoints")."""

    def __init__(self, config: dict):
        super().__init__()
        checkpoint.check_config(config, "config.json's quantization_config")
        self.config = config
        self.layers: dict[str, dict] = dict(config["layers"])

    def __repr__(self) -> str:
        return f"LowbitVllmConfig(methods={self.config.get('methods')}, layers={len(self.layers)})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # lowbit's CUDA kernels are built for sm_80 and later

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config is config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict) -> "LowbitVllmConfig":
        return cls({k: v for k, v in config.items() if k != "quant_method"})

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models whose vLLM module names differ from the checkpoint's rename the layer keys.
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    def _parts(self, prefix: str) -> list[str]:
        """The checkpoint layer names vLLM's layer ``prefix`` is made of (fused layers: several)."""
        parent, _, name = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(name)
        if not fused:
            return [prefix]
        return [f"{parent}.{part}" if parent else part for part in fused]

    def get_quant_method(self, layer, prefix: str):
        if isinstance(layer, ParallelLMHead):
            if prefix in self.layers:
                raise LowbitError(f"the checkpoint stores {prefix!r} as a lowbit layer; lowbit's vLLM integration "
                                  "runs the output layer dense only (quantize without it: lowbit.quantize leaves "
                                  "lm_head dense by default)")
            return None
        if not isinstance(layer, LinearBase):
            return None
        parts = self._parts(prefix)
        configs = [self.layers.get(part) for part in parts]
        if all(c is None for c in configs):
            return UnquantizedLinearMethod()
        families = {c["family"] if c is not None else "dense" for c in configs}
        if len(families) > 1:
            described = ", ".join(f"{p}: {c['family'] if c else 'dense'}" for p, c in zip(parts, configs))
            raise LowbitError(f"vLLM fuses {', '.join(parts)} into {prefix!r}, so they must be stored the same "
                              f"way; the checkpoint has {described}")
        for part, c in zip(parts, configs):
            if c.get("bias"):
                raise LowbitError(f"layer {part!r} is a lowbit layer with a bias; lowbit's vLLM integration "
                                  "loads lowbit layers without bias only")
        method = _METHODS.get(configs[0]["family"])
        if method is None:
            raise LowbitError(f"layer {parts[0]!r} uses lowbit method {configs[0]['family']!r}, which lowbit's "
                              f"vLLM integration does not run (it runs {', '.join(sorted(_METHODS))})")
        return method(list(zip(parts, configs)))

class LowbitLinearMethod(LinearMethodBase):
    """Runs one vLLM linear layer from lowbit layers (one per checkpoint part, or merged)."""

    family = ""
    stored = ()  # the stored-form tensor names (state dict keys) of one lowbit layer

    def __init__(self, parts: list[tuple[str, dict]]):
        self.parts = parts

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.parts):
            raise LowbitError(f"vLLM's layer has {len(output_partition_sizes)} parts, the checkpoint names "
                              f"{len(self.parts)}: {[p for p, _ in self.parts]}")
        for (name, config), rows in zip(self.parts, output_partition_sizes):
            if config["in_features"] != input_size:
                raise FormatError(f"layer {name!r} has in_features {config['in_features']} in the checkpoint, "
                                  f"the model's layer has {input_size}")
        layer.lowbit_rows = list(output_partition_sizes)
        layer.lowbit_columns = input_size_per_partition
        layer.lowbit_dtype = params_dtype
        layer.lowbit_pending = {}
        layer.lowbit_shards = {}
        # The stored dtypes, from an empty layer on meta (the header is an int64 tensor).
        empty = registry.get(self.family).module.from_config(self.parts[0][1], device="meta")
        dtypes = {name: t.dtype for name, t in empty.named_buffers()}
        for key in self.stored:
            # A placeholder that names the tensor for vLLM's loader; the part's lowbit layer
            # takes the tensors (whole, checked, then narrowed) and the placeholder goes.
            param = nn.Parameter(torch.empty(0, dtype=dtypes.get(key, torch.int64)), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, key)})
            layer.register_parameter(key, param)

    def _loader(self, layer, key: str):
        def load(param, loaded_weight: torch.Tensor, shard_id=None):
            part = self._part_index(shard_id)
            pending = layer.lowbit_pending.setdefault(part, {})
            pending[key] = loaded_weight
            if len(pending) == len(self.stored):
                layer.lowbit_shards[part] = self._shard(layer, part, layer.lowbit_pending.pop(part),
                                                        param.device)
        return load

    def _part_index(self, shard_id) -> int:
        if shard_id is None:
            return 0
        index = _QKV.get(shard_id, shard_id)
        if not isinstance(index, int) or not 0 <= index < len(self.parts):
            raise LowbitError(f"vLLM gave shard id {shard_id!r} for a layer of parts "
                              f"{[p for p, _ in self.parts]}")
        return index

    def _shard(self, layer, part: int, tensors: dict, device: torch.device):
        """This rank's lowbit layer of checkpoint part ``part``, from its whole stored tensors."""
        name, config = self.parts[part]
        family = registry.get(config["family"])
        try:
            module = family.module.from_config(config, device="meta")
        except (TypeError, ValueError, KeyError) as exc:
            raise FormatError(f"layer {name!r}: its config cannot build a {family.module.__name__} ({exc})") from None
        try:
            module.load_state_dict(tensors, assign=True)
        except RuntimeError as exc:
            raise FormatError(f"layer {name!r}: {' '.join(str(exc).split())}") from None
        dim, start, length = _rank_slice(layer, part, config)
        if length != (config["out_features"], config["in_features"])[dim]:
            module = module.narrow(dim, start, length)
        return module.to(device=device, dtype=layer.lowbit_dtype)

    def process_weights_after_loading(self, layer) -> None:
        for i, (name, _) in enumerate(self.parts):
            if i not in layer.lowbit_shards:
                got = sorted(layer.lowbit_pending.get(i, {}))
                raise FormatError(f"the checkpoint lacks tensors of lowbit layer {name!r}: it needs "
                                  f"{', '.join(self.stored)}; found {', '.join(got) or 'none'}")
        shards = [layer.lowbit_shards[i] for i in range(len(self.parts))]
        for key in self.stored:
            delattr(layer, key)
        del layer.lowbit_pending, layer.lowbit_shards
        layer.lowbit_layers = nn.ModuleList(self.assemble(shards))

    def assemble(self, shards: list) -> list:
        """The lowbit layers ``apply`` runs, their outputs concatenated: the parts as they are."""
        return shards

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        modules = layer.lowbit_layers
        y = modules[0](x) if len(modules) == 1 else torch.cat([m(x) for m in modules], dim=-1)
        return y if bias is None else y + bias

class Int8LinearMethod(LowbitLinearMethod):
    family = "int8"
    stored = ("weight", "weight_scale", "static_idx", "static_weight", "threshold", "weight_header")

    def assemble(self, shards):
        # Parts of a fused layer share their input, so calibration gives them the same static
        # columns; then they run as one layer (one activation pre-pass, one product).
        first = shards[0]
        if len(shards) == 1 or any(not torch.equal(s.static_idx, first.static_idx)
                                   or s._threshold != first._threshold for s in shards[1:]):
            return shards
        from lowbit.int8.format import Int8Weight

        merged = type(first)(first.in_features, sum(s.out_features for s in shards), False, first._threshold,
                             dtype=first.dtype, device="meta", backend=first.backend,
                             gemv_max_rows=first.gemv_max_rows)
        merged._setup(Int8Weight(torch.cat([s.weight for s in shards]),
                                 torch.cat([s.weight_scale for s in shards]), first.static_idx,
                                 torch.cat([s.static_weight for s in shards])),
                      first._threshold, first.gemv_max_rows)
        return [merged]

class CodebookLinearMethod(LowbitLinearMethod):
    family = "codebook"
    stored = ("codes", "codebooks", "scales", "weight_header")

class DFloatLinearMethod(LowbitLinearMethod):
    family = "dfloat"
    stored = ("weight_header", "weight_codes", "weight_raw", "weight_gaps", "weight_block_starts",
              "weight_code_lengths")

    def assemble(self, shards):
        # One stream for a fused layer: one decode and one product per call.
        if len(shards) == 1:
            return shards
        from lowbit.dfloat.format import compress

        first = shards[0]
        weight = torch.cat([s._decoded() for s in shards])
        merged = type(first)(first.in_features, weight.shape[0], False, dtype=first.dtype, device="meta",
                             mode=first.mode, backend=first.backend)
        merged._set_weight(compress(weight))
        return [merged]

def _rank_slice(layer, part: int, config: dict) -> tuple[int, int, int]:
    """(dim, start, length) of checkpoint part ``part`` that this rank holds."""
    if isinstance(layer, ReplicatedLinear):
        return 0, 0, config["out_features"]
    rank = getattr(layer, "tp_rank", 0)
    if isinstance(layer, RowParallelLinear):
        columns = layer.lowbit_columns
        return 1, rank * columns, columns
    rows = layer.lowbit_rows[part]
    if isinstance(layer, QKVParallelLinear) and part > 0:
        rank //= layer.num_kv_head_replicas  # K/V heads fewer than ranks: shared by several
    return 0, rank * rows, rows


_METHODS = {m.family: m for m in (Int8LinearMethod, CodebookLinearMethod, DFloatLinearMethod)}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register quantization method "lowbit" with vLLM."""
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(LowbitVllmConfig)


