"""The dfloat commands of ``lowbit``: ``compress``, ``decompress``, ``inspect`` (safetensors files).

``add_cli`` is registered as the family's ``Family.add_cli``; ``lowbit``'s ``main`` runs the
handler set as ``func`` and turns its errors into one line naming the command's ``input`` and
``output`` files."""

from __future__ import annotations

import argparse
import json

import torch

import lowbit
import lowbit.files


FORMAT_NAME = "lowbit.dfloat"


def _read(path) -> tuple[dict, dict | None]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


# torch dtype -> safetensors' name, to check a source header against the restored tensors.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _raw_header(path) -> bytes:
    """The JSON header of a safetensors file, as its bytes (with the padding that follows it)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(size)


def _write_like(path, header: bytes, tensors: dict) -> None:
    """Write ``tensors`` as a safetensors file whose header is ``header`` byte for byte: the file
    ``lowbit compress`` read, restored exactly. Refuses a header that does not describe them."""
    try:
        entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    except ValueError:
        raise lowbit.FormatError("the stored source header is not JSON") from None
    if entries.keys() != tensors.keys():
        raise lowbit.FormatError("the stored source header names other tensors than the file holds")
    for name, entry in entries.items():
        t = tensors[name]
        if _ST_DTYPES.get(entry.get("dtype")) != t.dtype or list(entry.get("shape", ())) != list(t.shape):
            raise lowbit.FormatError(f"the stored source header describes {name!r} as {entry.get('dtype')} "
                                     f"{entry.get('shape')}, the file holds {t.dtype} {list(t.shape)}")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        offset = 0
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            data = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy()
            if end - begin != data.size or begin < offset:
                raise lowbit.FormatError(f"the stored source header's offsets of {name!r} do not fit its bytes")
            f.write(b"\0" * (begin - offset))
            f.write(data.data)
            offset = end


def _bits_equal(a: dict, b: dict) -> str | None:
    """None when ``a`` and ``b`` hold the same names, dtypes, shapes and bits, else the first difference."""
    if a.keys() != b.keys():
        return f"names differ: {sorted(set(a) ^ set(b))[:4]}"
    for name, t in a.items():
        u = b[name]
        if t.dtype != u.dtype or t.shape != u.shape or not torch.equal(t.contiguous().view(torch.uint8),
                                                                     u.contiguous().view(torch.uint8)):
            return f"tensor {name!r} differs"
    return None


def cmd_compress(args) -> int:
    """Compress every float tensor of a safetensors file losslessly (dfloat). The source's
    safetensors metadata travels inside the output and its mode and times are the output's; an
    output that is the input is replaced only after the written file decompressed to the input."""
    from safetensors.torch import save_file

    output = lowbit.files.output_path(args.output)  # refuse a bad output before the work
    state, source_metadata = _read(args.input)
    if (source_metadata or {}).get("format") == FORMAT_NAME:
        raise lowbit.LowbitError(f"{args.input} is already a lowbit.dfloat file (lowbit decompress restores it)")
    stored = lowbit.dfloat.compress_state_dict(state, progress=not args.quiet)
    metadata = {"format": FORMAT_NAME, "format_version": str(lowbit.dfloat.format.CONTAINER_VERSION)}
    if source_metadata is not None:
        metadata["source_metadata"] = json.dumps(source_metadata)
    # The source's header as it was (safetensors orders its metadata by hash, so rewriting the
    # same tensors and metadata need not give the same bytes): decompress restores the file exactly.
    metadata["source_header"] = _raw_header(args.input).decode("utf-8")

    def verify(tmp):
        back, back_metadata = _read(tmp)
        problem = _bits_equal(state, lowbit.dfloat.decompress_state_dict(back))
        if problem is None and json.loads(back_metadata.get("source_metadata", "null")) != source_metadata:
            problem = "the metadata differs"
        if problem:
            raise lowbit.LowbitError(f"the compressed file did not decompress to {args.input} ({problem}); "
                                     f"{args.input} was left as it was")

    in_place = lowbit.files.same_file(args.input, output)
    lowbit.files.write_file(output, lambda tmp: save_file(stored, str(tmp), metadata=metadata), like=args.input,
                            verify=verify if in_place or args.verify else None)
    before = sum(t.numel() * t.element_size() for t in state.values())
    after = sum(t.numel() * t.element_size() for t in stored.values())
    print(f"{args.input}: {before / 1e6:.1f} MB -> {args.output}: {after / 1e6:.1f} MB ({after / before:.1%})")
    return 0


def _source_metadata(path, metadata: dict | None) -> dict | None:
    if (metadata or {}).get("format") != FORMAT_NAME:
        raise lowbit.FormatError(f"{path} is not a file written by lowbit compress (its metadata has no "
                                 f"format = {FORMAT_NAME})")
    version = metadata.get("format_version")
    if version not in ("1", str(lowbit.dfloat.format.CONTAINER_VERSION)):
        raise lowbit.FormatError(f"{path} was written with lowbit.dfloat file version {version}; this lowbit reads "
                                 f"versions 1 and {lowbit.dfloat.format.CONTAINER_VERSION}: upgrade lowbit")
    try:
        return json.loads(metadata["source_metadata"]) if "source_metadata" in metadata else None
    except ValueError:
        raise lowbit.FormatError(f"{path}: its source_metadata is not JSON") from None


def cmd_decompress(args) -> int:
    """Restore the source file: its bytes (tensors, metadata, header as it was), mode and times."""
    from safetensors.torch import save_file

    output = lowbit.files.output_path(args.output)
    stored, metadata = _read(args.input)
    source_metadata = _source_metadata(args.input, metadata)
    restored = lowbit.dfloat.decompress_state_dict(stored)
    header = metadata.get("source_header")

    def write(tmp):
        if header is not None:
            _write_like(tmp, header.encode("utf-8"), restored)
        else:  # written by a lowbit that kept no header: the same tensors and metadata
            save_file(restored, str(tmp), metadata=source_metadata)

    def verify(tmp):
        problem = _bits_equal(restored, _read(tmp)[0])
        if problem:
            raise lowbit.LowbitError(f"the restored file did not read back ({problem}); {args.input} was left as it was")

    in_place = lowbit.files.same_file(args.input, output)
    lowbit.files.write_file(output, write, like=args.input, verify=verify if in_place else None)
    print(f"{args.input} -> {args.output}")
    return 0


def cmd_inspect(args) -> int:
    """Per tensor: shape, dtype, and bits/weight of the stored form (checksums verified)."""
    from safetensors.torch import load_file

    compressed, _ = lowbit.dfloat.format.stored_tensors(load_file(args.input))
    total_bits = total_weights = 0
    for name in sorted(compressed):
        try:
            d = lowbit.dfloat.DFloatTensor.from_dict(compressed[name])
        except lowbit.FormatError as exc:
            raise lowbit.FormatError(f"tensor {name!r}: {exc}") from None
        total_bits += 8 * d.nbytes
        total_weights += d.numel()
        print(f"{name:<60} {str(list(d.shape)):<16} {str(d.dtype)[6:]:<9} {d.bits_per_weight:6.3f} bits/weight")
    if not compressed:
        print(f"{args.input}: no dfloat tensors")
    else:
        print(f"{len(compressed)} dfloat tensors, {total_weights:,} weights, {total_bits / total_weights:.3f} bits/weight")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p_compress = subparsers.add_parser("compress", help="compress a safetensors file losslessly (dfloat)")
    p_compress.add_argument("input")
    p_compress.add_argument("output")
    p_compress.add_argument("--quiet", action="store_true", help="no progress bar")
    p_compress.add_argument("--verify", action="store_true",
                            help="decompress the written file and compare before keeping it (always done in place)")
    p_decompress = subparsers.add_parser("decompress", help="restore a file written by `lowbit compress`, bit for bit")
    p_decompress.add_argument("input")
    p_decompress.add_argument("output")
    p_inspect = subparsers.add_parser("inspect", help="list the compressed tensors of a file and their bits/weight")
    p_inspect.add_argument("input")
    p_compress.set_defaults(func=cmd_compress)
    p_decompress.set_defaults(func=cmd_decompress)
    p_inspect.set_defaults(func=cmd_inspect)
