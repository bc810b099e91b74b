"""The header every lowbit stored form carries (docs/formats.md, "Stored-form header").

A header is a 1-D int64 tensor ``[magic, version, checksum, field_0, field_1, ...]``: a magic
number naming the format, its version, a CRC-32 over the fields and the stored tensors' bytes
(computed with the checksum slot set to 0), then the format's own fields. A stored form whose
header is missing, foreign, of another version or whose checksum disagrees with its tensors is
refused with ``FormatError`` before anything is decoded.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from lowbit.errors import FormatError

MAGIC, VERSION, CHECKSUM = 0, 1, 2  # positions of the common fields
FIELDS = 3  # where the format's own fields start


def magic_number(tag: str) -> int:
    """The magic number of a four-letter tag, e.g. ``magic_number("lbi8")``."""
    raw = tag.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"tag must be 4 ASCII characters, got {tag!r}")
    return int.from_bytes(raw, "big")


def crc32(header: Sequence[int], tensors: Sequence[torch.Tensor | None]) -> int:
    """CRC-32 of the header's integers (int64, little-endian) and the tensors' bytes, in order;
    None stands for an absent tensor."""
    crc = zlib.crc32(torch.tensor(list(header), dtype=torch.int64).numpy().tobytes())
    for t in tensors:
        if t is None:
            crc = zlib.crc32(b"\0", crc)
            continue
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(b"\1", crc)
        crc = zlib.crc32(data.data, crc)
    return crc


def make_header(magic: int, version: int, fields: Sequence[int], tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The header of a stored form: int64 [3 + len(fields)]. Tensors on ``meta`` (an empty layer,
    not loaded yet) have no bytes to check: their header is a meta tensor of the same shape."""
    if any(t is not None and t.device.type == "meta" for t in tensors):
        return torch.empty(FIELDS + len(fields), dtype=torch.int64, device="meta")
    values = [magic, version, 0, *map(int, fields)]
    values[CHECKSUM] = crc32(values, tensors)
    return torch.tensor(values, dtype=torch.int64)


def read_header(header: torch.Tensor | None, *, magic: int, versions: Sequence[int], nfields: int | None,
                tensors: Sequence[torch.Tensor | None], what: str) -> tuple[int, list[int]]:
    """Check a stored header against its tensors -> (version, fields). ``what`` names the stored
    form in messages; ``nfields`` is the number of fields (None: any)."""
    if header is None:
        raise FormatError(f"{what}: the header is missing; this is not a lowbit stored form")
    if not isinstance(header, torch.Tensor) or header.dtype != torch.int64 or header.dim() != 1 \
            or header.numel() < FIELDS:
        raise FormatError(f"{what}: the header must be a 1-D int64 tensor of at least {FIELDS} entries")
    values = header.tolist()
    if values[MAGIC] != magic:
        raise FormatError(f"{what}: the header has magic number {values[MAGIC]:#x}, expected {magic:#x}: "
                          "not this format")
    if values[VERSION] not in versions:
        raise FormatError(f"{what}: stored with format version {values[VERSION]}; this lowbit reads version "
                          f"{', '.join(map(str, versions))}")
    if nfields is not None and len(values) != FIELDS + nfields:
        raise FormatError(f"{what}: the header has {len(values) - FIELDS} fields, expected {nfields}")
    stored = values[CHECKSUM]
    values[CHECKSUM] = 0
    if crc32(values, tensors) != stored:
        raise FormatError(f"{what}: checksum mismatch: the stored data was altered or truncated")
    return values[VERSION], values[FIELDS:]
