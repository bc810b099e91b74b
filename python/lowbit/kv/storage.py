"""Stored prompt caches: a ``QuantizedKVCache`` written to a file and read back, so that a prompt's
prefill is computed once (docs/formats.md, "kv", "Stored caches").

The file is safetensors: a header (magic "lbkv", version, CRC-32 over every stored tensor, then the
cache's fields), per layer a small int64 ``meta`` tensor, and each of the layer's tensors (packed
codes, scales, zeros, residual window) entropy-coded losslessly with lowbit's one codec (dfloat:
bytes and floats alike), each with its own header and checksum.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit import files, stored
from lowbit.dfloat.format import DTYPE_CODES, DFloatTensor, compress
from lowbit.errors import FormatError

MAGIC = stored.magic_number("lbkv")
VERSION = 1
FIELDS = ("bits", "group_size", "residual_length", "layers", "dtype", "batch", "heads", "head_dim")
META = ("seen", "dropped", "blocks", "residual_tokens", "sliding_window")  # sliding_window -1: none
TENSORS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "keys", "values")
FLOATS = {code: dtype for dtype, code in DTYPE_CODES.items() if dtype.is_floating_point}


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    p = layer.packed()
    return {**{name: p[name] for name in TENSORS[:6]}, "keys": layer.keys, "values": layer.values}


def state(cache) -> dict[str, torch.Tensor]:
    """The stored form of ``cache`` as a dict of tensors (CPU), coded losslessly."""
    layers = [layer for layer in cache.layers]
    if not layers or not all(layer.is_initialized for layer in layers):
        raise ValueError("cache: every layer must hold tokens before it is saved (run the prompt through the model "
                         "with this cache first)")
    first = layers[0]
    out: dict[str, torch.Tensor] = {}
    ordered: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        meta = torch.tensor([layer.seen, layer.dropped, layer.blocks, layer.keys.shape[2],
                             -1 if layer.sliding_window is None else layer.sliding_window], dtype=torch.int64)
        out[f"layers.{i}.meta"] = meta
        ordered.append(meta)
        for name, t in _layer_tensors(layer).items():
            coded = compress(t.detach().to("cpu").contiguous()).to_dict(f"layers.{i}.{name}.")
            out.update(coded)
            ordered.extend(coded.values())
    fields = [cache.bits, cache.group_size, cache.residual_length, len(layers), DTYPE_CODES[first.dtype],
              first.batch, first.heads, first.head_dim]
    out["header"] = stored.make_header(MAGIC, VERSION, fields, ordered)
    return out


def save(cache, path: str | os.PathLike) -> Path:
    """Writes ``cache`` to ``path`` (safetensors), safely: a file that is complete or not there."""
    from safetensors.torch import save_file

    tensors = state(cache)
    return files.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "lowbit.kv"}),
                            what="path")


def load(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The ``QuantizedKVCache`` saved at ``path``, its tensors on ``device``. Altered, truncated or
    foreign files are refused with FormatError before anything is used."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lowbit.kv.cache import QuantizedKVCache, QuantizedKVLayer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    header = d.get("header")
    at = stored.FIELDS + FIELDS.index("layers")
    if header is None or header.dtype != torch.int64 or header.dim() != 1 or header.numel() <= at:
        raise FormatError(f"{path}: no valid header: not a lowbit KV cache")
    count = int(header[at])
    if not 0 < count < 1 << 16:
        raise FormatError(f"{path}: the header's layer count ({count}) is not valid")
    ordered = []
    for i in range(count):
        ordered.append(d.get(f"layers.{i}.meta"))
        for name in TENSORS:
            prefix = f"layers.{i}.{name}."
            ordered.extend(d.get(prefix + k) for k in ("header", "codes", "raw", "gaps", "block_starts", "code_lengths"))
    _, values = stored.read_header(d["header"], magic=MAGIC, versions=(VERSION,), nfields=len(FIELDS),
                                   tensors=ordered, what=str(path))
    f = dict(zip(FIELDS, values))
    if f["dtype"] not in FLOATS:
        raise FormatError(f"{path}: unknown dtype code {f['dtype']}")
    device = torch.device(device)
    cache = QuantizedKVCache(f["bits"], f["group_size"], f["residual_length"])
    layers = []
    for i in range(count):
        meta = dict(zip(META, d[f"layers.{i}.meta"].tolist()))
        window = None if meta["sliding_window"] < 0 else meta["sliding_window"]
        layer = QuantizedKVLayer(f["bits"], f["group_size"], f["residual_length"], window)
        t = {name: DFloatTensor.from_dict(d, f"layers.{i}.{name}.").decompress().to(device) for name in TENSORS}
        _restore(layer, t, meta, f, device, path)
        layer.resolve_ops()
        layers.append(layer)
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


def _restore(layer, t: dict, meta: dict, f: dict, device: torch.device, path: Path) -> None:
    """Sets a fresh layer to the stored state, checking that the tensors agree with each other."""
    dtype = FLOATS[f["dtype"]]
    b, h, d, g = f["batch"], f["heads"], f["head_dim"], f["group_size"]
    nb, r = meta["blocks"], meta["residual_tokens"]
    if min(nb, r, meta["seen"], meta["dropped"]) < 0 or meta["seen"] != meta["dropped"] + nb * g + r:
        raise FormatError(f"{path}: a layer's token counts disagree ({meta})")
    expected = {"k_codes": (b, h, nb, d), "k_scale": (b, h, nb, d), "k_zero": (b, h, nb, d),
                "v_codes": (b, h, nb * g), "v_scale": (b, h, nb * g, d // g), "v_zero": (b, h, nb * g, d // g),
                "keys": (b, h, r, d), "values": (b, h, r, d)}
    for name, shape in expected.items():
        if tuple(t[name].shape[:len(shape)]) != shape or (name not in ("k_codes", "v_codes") and t[name].dtype != dtype):
            raise FormatError(f"{path}: {name} has shape {list(t[name].shape)} and dtype {t[name].dtype}; the "
                              f"header says {list(shape)} of {dtype}")
    layer.dtype, layer.device = dtype, device
    layer.batch, layer.heads, layer.head_dim = b, h, d
    layer.k_codes, layer.k_scale, layer.k_zero = t["k_codes"], t["k_scale"], t["k_zero"]
    layer.v_codes, layer.v_scale, layer.v_zero = t["v_codes"], t["v_scale"], t["v_zero"]
    layer.keys, layer.values = t["keys"], t["values"]
    layer.blocks, layer.dropped, layer.seen = nb, meta["dropped"], meta["seen"]
    layer.is_initialized = True
