"""The dfloat stored form: ``DFloatTensor``, ``compress``, and their dict-of-tensors form.

Layout and decode formula: docs/formats.md ("dfloat") and ``lowbit.reference.dfloat``.
"""

from __future__ import annotations

import math
import zlib

import torch

from lowbit import ops
from lowbit.ops.dfloat import check_stream, check_window_shape
from lowbit.errors import FormatError
from lowbit.reference import dfloat as ref
from lowbit.reference.bitpack import unpack_bits

FORMAT_VERSION = 1
MAGIC = 0x64666C74  # "dflt"
# uint8 (4) came later within version 1: a stream of the other dtypes is unchanged by it, and a
# lowbit from before refuses a uint8 one by its unknown dtype code (docs/formats.md, "dfloat").
DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.uint8: 4}
DEFAULT_WINDOW_BITS = 256
DEFAULT_WINDOWS_PER_BLOCK = 128
HEADER = ("magic", "version", "dtype", "n", "total_bits", "window_bits", "windows_per_block", "max_code_len",
          "checksum", "ndim")  # then the shape, one entry per dimension
STREAM = ("codes", "raw", "gaps", "block_starts", "code_lengths")  # stored tensors besides the header


def codewords(lengths: torch.Tensor) -> torch.Tensor:
    """int32 [256]: each symbol's canonical code, bit-reversed for the LSB-first stream."""
    lens = lengths.tolist()
    return torch.tensor(
        [ref._reverse(code, lens[s]) for s, code in enumerate(ref.canonical_codes(lengths))], dtype=torch.int32
    )


def _crc32(header: list[int], tensors: list[torch.Tensor]) -> int:
    crc = zlib.crc32(torch.tensor(header, dtype=torch.int64).numpy().tobytes())
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().data, crc)
    return crc


class DFloatTensor:
    """A float tensor stored losslessly with Huffman-coded exponents, or a uint8 tensor with
    Huffman-coded bytes (dfloat format).

    Attributes: ``shape``, ``dtype``, ``device``, ``nbytes`` (bytes of the stored form: codes, raw
    bits, gaps, block starts, code lengths and header), ``bits_per_weight`` (8 * nbytes / numel).
    ``decompress()`` gives back the original tensor, bit for bit.
    """

    def __init__(self, *, codes, raw, gaps, block_starts, code_lengths, shape, dtype, total_bits,
                 window_bits, windows_per_block, table=None):
        self.codes, self.raw, self.gaps, self.block_starts = codes, raw, gaps, block_starts
        self.code_lengths = code_lengths
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.total_bits = int(total_bits)
        self.window_bits = int(window_bits)
        self.windows_per_block = int(windows_per_block)
        # Derived from code_lengths, not stored.
        self.table = ref.decode_table(code_lengths.cpu()).to(codes.device) if table is None else table

    # -- facts ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def _stream(self) -> list[torch.Tensor]:
        return [self.codes, self.raw, self.gaps, self.block_starts, self.code_lengths]

    @property
    def nbytes(self) -> int:
        header = 8 * (len(HEADER) + len(self.shape))
        return header + sum(t.numel() * t.element_size() for t in self._stream())

    @property
    def bits_per_weight(self) -> float:
        n = self.numel()
        return 8 * self.nbytes / n if n else float("nan")

    def __repr__(self) -> str:
        return (f"DFloatTensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"bits_per_weight={self.bits_per_weight:.3f})")

    # -- use --------------------------------------------------------------------------------------
    def stream_args(self) -> tuple:
        """The stream arguments of lowbit::dfloat_decode / dfloat_gemv, in order."""
        return (self.codes, self.raw, self.gaps, self.block_starts, self.table)

    def decompress(self, *, backend: str | None = None) -> torch.Tensor:
        """The original tensor, bit for bit."""
        flat = ops.dfloat_decode(*self.stream_args(), self.numel(), self.dtype, self.total_bits,
                                 self.window_bits, self.windows_per_block, backend=backend)
        return flat.reshape(self.shape)

    def to(self, device) -> "DFloatTensor":
        """The same stored form on ``device`` (moved, never re-encoded)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return DFloatTensor(
            **{name: t.to(device) for name, t in zip(STREAM, self._stream())},
            shape=self.shape, dtype=self.dtype, total_bits=self.total_bits, window_bits=self.window_bits,
            windows_per_block=self.windows_per_block, table=self.table.to(device),
        )

    # -- stored form ------------------------------------------------------------------------------
    def _header(self, checksum: int) -> list[int]:
        return [MAGIC, FORMAT_VERSION, DTYPE_CODES[self.dtype], self.numel(), self.total_bits, self.window_bits,
                self.windows_per_block, ref.MAX_CODE_LEN, checksum, len(self.shape), *self.shape]

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The stored form: ``{prefix + name: tensor}`` for header, codes, raw, gaps, block_starts,
        code_lengths (safetensors-friendly; the header carries a version and a CRC-32)."""
        checksum = _crc32(self._header(0), self._stream())
        out = {prefix + "header": torch.tensor(self._header(checksum), dtype=torch.int64)}
        out.update({prefix + name: t for name, t in zip(STREAM, self._stream())})
        return out

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> "DFloatTensor":
        """Rebuild from ``to_dict``'s output; refuses altered, truncated or foreign data with FormatError."""
        missing = [prefix + k for k in ("header",) + STREAM if prefix + k not in d]
        if missing:
            raise FormatError(f"stored dfloat tensor is missing {', '.join(missing)}")
        header_t = d[prefix + "header"]
        if header_t.dtype != torch.int64 or header_t.dim() != 1 or header_t.numel() < len(HEADER):
            raise FormatError(f"{prefix}header must be a 1-D int64 tensor of >= {len(HEADER)} entries")
        header = header_t.tolist()
        fields = dict(zip(HEADER, header))
        if fields["magic"] != MAGIC:
            raise FormatError(f"{prefix}header does not start with the dfloat magic number: not a dfloat tensor")
        if fields["version"] != FORMAT_VERSION:
            raise FormatError(f"stored with dfloat format version {fields['version']}; this lowbit reads "
                              f"version {FORMAT_VERSION}")
        dtypes = {code: dt for dt, code in DTYPE_CODES.items()}
        if fields["dtype"] not in dtypes:
            raise FormatError(f"unknown dtype code {fields['dtype']} in {prefix}header")
        shape = header[len(HEADER):]
        if len(shape) != fields["ndim"] or any(s < 0 for s in shape) or math.prod(shape) != fields["n"]:
            raise FormatError(f"{prefix}header's shape {shape} disagrees with its {fields['n']} elements")
        if fields["max_code_len"] != ref.MAX_CODE_LEN:
            raise FormatError(f"codes of up to {fields['max_code_len']} bits; this lowbit reads {ref.MAX_CODE_LEN}")
        stream = [d[prefix + name] for name in STREAM]
        for name, t in zip(STREAM, stream):
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{prefix}{name} must be a tensor, got {type(t).__name__}")
        codes, raw, gaps, block_starts, lengths = stream
        dtype, n, total_bits = dtypes[fields["dtype"]], fields["n"], fields["total_bits"]
        why = ref.check_lengths(lengths.cpu())
        if why:
            raise FormatError(f"{prefix}code_lengths: {why}")
        table = ref.decode_table(lengths.cpu())
        check_stream(n, dtype, codes, raw, gaps, block_starts, table.to(codes.device), total_bits,
                                 fields["window_bits"], fields["windows_per_block"])
        if _crc32([*header[:8], 0, *header[9:]], stream) != fields["checksum"]:
            raise FormatError(f"checksum mismatch in {prefix or 'the'} dfloat data: it was altered or truncated")
        starts = block_starts.cpu()
        windows = -(-total_bits // fields["window_bits"])
        if starts[0] != 0 or starts[-1] != n or bool((starts[1:] < starts[:-1]).any()):
            raise FormatError(f"{prefix}block_starts must rise from 0 to {n}")
        if windows and bool((unpack_bits(gaps.cpu(), 4, windows) >= ref.MAX_CODE_LEN).any()):
            raise FormatError(f"{prefix}gaps holds a gap >= {ref.MAX_CODE_LEN}")
        return cls(codes=codes, raw=raw, gaps=gaps, block_starts=block_starts, code_lengths=lengths, shape=shape,
                   dtype=dtype, total_bits=total_bits, window_bits=fields["window_bits"],
                   windows_per_block=fields["windows_per_block"], table=table.to(codes.device))


def compress(t: torch.Tensor, *, window_bits: int = DEFAULT_WINDOW_BITS,
             windows_per_block: int = DEFAULT_WINDOWS_PER_BLOCK, backend: str | None = None) -> DFloatTensor:
    """Compress a bf16, fp16, fp32 or uint8 tensor losslessly (uint8: packed integer codes, e.g.
    the KV cache's, whose bytes are Huffman-coded whole). The encoder runs on the CPU
    (``backend``: auto, cpu or reference); the result lives on ``t``'s device. ``t`` is not
    modified."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"t must be a bfloat16, float16, float32 or uint8 tensor, got {t.dtype}")
    check_window_shape(window_bits, windows_per_block, ValueError)
    x = t.detach().to("cpu").contiguous()
    counts = ops.op("dfloat_histogram", backend, "cpu")(x)
    lengths = ref.code_lengths(counts)
    total_bits = int((counts * lengths.to(torch.int64)).sum())
    codes, raw, gaps, block_starts = ops.op("dfloat_encode", backend, "cpu")(
        x, lengths, codewords(lengths), total_bits, window_bits, windows_per_block)
    result = DFloatTensor(codes=codes, raw=raw, gaps=gaps, block_starts=block_starts, code_lengths=lengths,
                          shape=t.shape, dtype=t.dtype, total_bits=total_bits, window_bits=window_bits,
                          windows_per_block=windows_per_block)
    return result.to(t.device)


def entropy_bound(t: torch.Tensor) -> dict[str, float]:
    """Bits/weight bounds of exponent-only coding for ``t``: ``symbol`` = H(symbol) + raw bits (what
    dfloat's Huffman code approaches), ``exponent`` = H(exponent field) + all other bits. For uint8
    the symbol is the whole byte, so both are H(byte)."""
    symbols, _ = ref.split_fields(t.detach().cpu())
    width, shift, raw_bytes = ref.LAYOUTS[t.dtype]

    def entropy(values: torch.Tensor) -> float:
        p = torch.bincount(values.to(torch.int64)).double()
        p = p[p > 0] / values.numel()
        return float(-(p * p.log2()).sum())

    exp_bits = 8 if t.dtype != torch.float16 else 5
    exponent = symbols.to(torch.int64) >> (8 - exp_bits)
    return {"symbol": entropy(symbols) + 8 * raw_bytes, "exponent": entropy(exponent) + (width - exp_bits)}


# The container of ``compress_state_dict`` / ``lowbit compress`` (docs/formats.md, "dfloat files").
# Version 2 keeps every key in lowbit's own namespace: "tensor:<name>" for a tensor kept as it is,
# "dfloat:<part>:<name>" for a part of a compressed one. Part names hold no ":", so a key names
# exactly one (kind, part, name) and no tensor name can collide with another tensor's parts.
# Version 1 wrote "<name>.<part>" and "<name>" side by side, so that tensors "a" and "a.raw"
# collided; it is still read.
CONTAINER_VERSION = 2
_KEPT, _PART = "tensor:", "dfloat:"


def compress_state_dict(state_dict: dict[str, torch.Tensor], *, progress: bool = True,
                        min_numel: int = 1024) -> dict[str, torch.Tensor]:
    """Every float tensor of at least ``min_numel`` elements -> its stored form, under
    ``"dfloat:<part>:<name>"``; other tensors are kept as they are, under ``"tensor:<name>"``
    (container version 2, see ``CONTAINER_VERSION``). A progress bar counts weights."""
    from tqdm.auto import tqdm

    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict's keys must be strings, got {type(name).__name__} {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] must be a tensor, got {type(t).__name__}")
    out: dict[str, torch.Tensor] = {}
    total = sum(t.numel() for t in state_dict.values())
    with tqdm(total=total, unit="w", unit_scale=True, desc="dfloat compress", disable=not progress) as bar:
        for name, t in state_dict.items():
            # Floats only: integer tensors of a checkpoint (uint8 too) are kept as they are.
            if t.is_floating_point() and t.dtype in DTYPE_CODES and t.numel() >= min_numel:
                for part, value in compress(t).to_dict().items():
                    out[f"{_PART}{part}:{name}"] = value
            else:
                out[_KEPT + name] = t
            bar.update(t.numel())
    return out


def container_version(stored: dict) -> int:
    """2 when every key is in version 2's namespace, else 1 (the older ``<name>.<part>`` keys)."""
    return 2 if stored and all(k.startswith((_KEPT, _PART)) for k in stored) else 1


def stored_tensors(stored: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a container into (name -> the parts of its compressed form, name -> kept tensor).
    Refuses with FormatError a key of version 2's namespace that names no known part, and a name
    both kept and compressed."""
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    kept: dict[str, torch.Tensor] = {}
    if container_version(stored) == 2:
        for key, t in stored.items():
            if key.startswith(_KEPT):
                kept[key[len(_KEPT):]] = t
                continue
            part, sep, name = key[len(_PART):].partition(":")
            if not sep or part not in ("header",) + STREAM:
                raise FormatError(f"key {key!r} is not a dfloat part (dfloat:<part>:<name>, part one of "
                                  f"{', '.join(('header',) + STREAM)})")
            compressed.setdefault(name, {})[part] = t
    else:
        names = [key[: -len(".header")] for key in stored if key.endswith(".header")]
        parts = {f"{name}.{part}" for name in names for part in ("header",) + STREAM}
        kept = {key: t for key, t in stored.items() if key not in parts}
        compressed = {name: {part: stored[f"{name}.{part}"] for part in ("header",) + STREAM
                             if f"{name}.{part}" in stored} for name in names}
    both = sorted(set(kept) & set(compressed))
    if both:
        raise FormatError(f"{both[0]!r} is stored both as a kept tensor and compressed: not a file lowbit wrote")
    return compressed, kept


def decompress_state_dict(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``compress_state_dict``: the original tensors, bit for bit (either container
    version). Refuses corrupted parts with FormatError naming the tensor."""
    compressed, out = stored_tensors(stored)
    for name, parts in compressed.items():
        try:
            out[name] = DFloatTensor.from_dict(parts).decompress()
        except FormatError as exc:
            raise FormatError(f"tensor {name!r}: {exc}") from None
    return out
