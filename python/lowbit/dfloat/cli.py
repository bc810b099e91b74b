"""The dfloat commands of ``lowbit``: ``compress``, ``decompress``, ``inspect`` (safetensors files).

``add_cli`` is registered as the family's ``Family.add_cli``; ``lowbit``'s ``main`` runs the
handler set as ``func`` and turns its errors into one line naming the command's ``input`` and
``output`` files."""

from __future__ import annotations

import argparse

import lowbit


def cmd_compress(args) -> int:
    """Compress every float tensor of a safetensors file losslessly (dfloat)."""
    from safetensors.torch import load_file, save_file

    state = load_file(args.input)
    stored = lowbit.dfloat.compress_state_dict(state, progress=not args.quiet)
    save_file(stored, args.output, metadata={"format": "lowbit.dfloat",
                                              "format_version": str(lowbit.dfloat.FORMAT_VERSION)})
    before = sum(t.numel() * t.element_size() for t in state.values())
    after = sum(t.numel() * t.element_size() for t in stored.values())
    print(f"{args.input}: {before / 1e6:.1f} MB -> {args.output}: {after / 1e6:.1f} MB ({after / before:.1%})")
    return 0


def cmd_decompress(args) -> int:
    from safetensors.torch import load_file, save_file

    save_file(lowbit.dfloat.decompress_state_dict(load_file(args.input)), args.output)
    print(f"{args.input} -> {args.output}")
    return 0


def cmd_inspect(args) -> int:
    """Per tensor: shape, dtype, and bits/weight of the stored form (checksums verified)."""
    from safetensors.torch import load_file

    stored = load_file(args.input)
    names = sorted(k[: -len(".header")] for k in stored if k.endswith(".header"))
    total_bits = total_weights = 0
    for name in names:
        d = lowbit.dfloat.DFloatTensor.from_dict(stored, prefix=name + ".")
        total_bits += 8 * d.nbytes
        total_weights += d.numel()
        print(f"{name:<60} {str(list(d.shape)):<16} {str(d.dtype)[6:]:<9} {d.bits_per_weight:6.3f} bits/weight")
    if not names:
        print(f"{args.input}: no dfloat tensors")
    else:
        print(f"{len(names)} dfloat tensors, {total_weights:,} weights, {total_bits / total_weights:.3f} bits/weight")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p_compress = subparsers.add_parser("compress", help="compress a safetensors file losslessly (dfloat)")
    p_compress.add_argument("input")
    p_compress.add_argument("output")
    p_compress.add_argument("--quiet", action="store_true", help="no progress bar")
    p_decompress = subparsers.add_parser("decompress", help="restore a file written by `lowbit compress`, bit for bit")
    p_decompress.add_argument("input")
    p_decompress.add_argument("output")
    p_inspect = subparsers.add_parser("inspect", help="list the compressed tensors of a file and their bits/weight")
    p_inspect.add_argument("input")
    p_compress.set_defaults(func=cmd_compress)
    p_decompress.set_defaults(func=cmd_decompress)
    p_inspect.set_defaults(func=cmd_inspect)
