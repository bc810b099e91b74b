"""Command line: ``lowbit demo | info | bench``, plus the commands each registered family adds
(``Family.add_cli``; dfloat's ``compress | decompress | inspect``).

A family's command is a subparser whose ``func`` default is its handler, ``handler(args) -> int``
(the exit code). ``main`` runs it and turns whatever it raises into one ``lowbit: error: ...`` line,
naming the command's ``input`` and ``output`` arguments when the message does not. A command that
takes arguments it does not know (``bench`` passes them to pytest) sets ``passes_unknown=True`` and
reads them as ``args.extra``; any other refuses them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
import lowbit.files
from lowbit import _native
from lowbit.demo import bitpack


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise lowbit.LowbitError("--device cuda asked for, but no CUDA device is visible")
    return device


def _backend_lines(device: torch.device) -> list[str]:
    lines = []
    for name, why in lowbit.backend.available(device).items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return lines


def _family_lines() -> list[str]:
    families = lowbit.registry.families()
    width = max([len(f.name) for f in families], default=0)
    return [f"  {f.name:<{width}}  {f.description}" for f in families]


def _op_lines(device: torch.device) -> list[str]:
    """One row per op: which backends implement it, and which one ``auto`` runs on ``device``."""
    backends = lowbit.backend.BACKENDS[1:]
    names = list(lowbit.ops.definitions())
    width = max([2] + [len(n) for n in names])
    lines = [f"  {'op':<{width}}  " + " ".join(f"{b:<{len(b)}}" for b in backends) + "  auto"]
    for name in names:
        impls = lowbit.ops.implementations(name)
        cells = " ".join(f"{'yes' if b in impls else '-':<{len(b)}}" for b in backends)
        lines.append(f"  {name:<{width}}  {cells}  {lowbit.ops.resolve(name, 'auto', device)}")
    chosen = os.environ.get("LOWBIT_BACKEND", "auto").strip().lower()
    if chosen != "auto":
        lines.append(f"  LOWBIT_BACKEND={chosen}: calls that name no backend ask for {chosen}, not auto")
    return lines


def cmd_info(args) -> int:
    device = _device(args.device)
    native = _native.status()
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"extension lowbit._C: {'loaded' if native.loaded else 'not loaded (' + str(native.error) + ')'}"
          + (", with CUDA kernels" if native.cuda else ""))
    for family in lowbit.registry.families():
        for line in family.info(device) if family.info else []:
            print(line)
    print(f"backends for {device.type} tensors:")
    print("\n".join(_backend_lines(device)))
    print("families:")
    print("\n".join(_family_lines()))
    print(f"ops: the backends that implement each, and the one auto runs on {device.type} tensors")
    print("\n".join(_op_lines(device)))
    return 0


def cmd_demo(args) -> int:
    """The kernel checks (bit packing, then each registered family's section, in registration
    order), then the main job: SmolLM2 compressed by every family, saved, reloaded and measured."""
    device = _device(args.device)
    cmd_info(args)
    sections = [("bit packing", bitpack)] + [(f.name, f.demo) for f in lowbit.registry.families() if f.demo]
    try:
        from lowbit.kv import demo as kv_demo  # needs transformers
        sections.append(("kv", kv_demo.demo))
    except ModuleNotFoundError as exc:
        print(f"\nkv cache: skipped ({exc})")
        kv_demo = None
    failed = [name for name, run in sections if not run(device)]
    print("\nall backends agree with the reference" if not failed else
          f"\nMISMATCH: a backend disagrees with the reference (in {', '.join(failed)})")
    if not args.no_model:
        from lowbit import model_demo

        if not model_demo.run(quick=args.quick, plot_path=args.plot, progress=not args.quiet):
            failed.append("model")
        elif kv_demo is not None and model_demo.model_available() is None \
                and not kv_demo.model_part(quick=args.quick, progress=not args.quiet):
            failed.append("kv model")
        print("\ndemo: every check passed" if not failed else f"\ndemo: FAILED ({', '.join(failed)})")
    return 0 if not failed else 1


def _report(args, doc: dict, table) -> int:
    """--json - prints ``doc`` as JSON; otherwise the table, and ``doc`` written to --json if given."""
    if args.json == "-":
        print(json.dumps(doc, indent=1))
        return 0
    print(table())
    if args.json:
        written = lowbit.files.write_text(args.json, json.dumps(doc, indent=1), what="--json")
        print(f"results: {written}")
    return 0


def _eval_kv(args) -> int:
    """--kv-bits: the dense KV cache against lowbit's quantized one, decoded token by token, on the
    model's weights as --method leaves them."""
    from lowbit import evaluation
    from lowbit.kv import evaluation as kv_evaluation

    if args.compare:
        raise ValueError("--kv-bits evaluates one model: give --method, not --compare")
    known = ["none"] + [f.name for f in lowbit.registry.families()]
    if args.method not in known:
        raise ValueError(f"--method must name {', '.join(known)}, got {args.method!r}")
    for name in ("kv_prompt_tokens", "kv_decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, tokenizer = evaluation.load_dense(args.model)
    if args.method != "none":
        lowbit.quantize(model, args.method, progress=not args.quiet)
    result = kv_evaluation.evaluate(model, tokenizer, args.kv_bits, group_size=args.kv_group,
                                    residual_length=args.kv_residual, prompt_tokens=args.kv_prompt_tokens,
                                    decode_tokens=args.kv_decode_tokens, progress=not args.quiet)
    doc = {"model": args.model, "method": args.method, "text": "pydoc_data.topics",
           "torch_threads": torch.get_num_threads(), "cpu": evaluation.cpu_facts(), "kv": result}
    return _report(args, doc, lambda: kv_evaluation.table(result))


def cmd_eval(args) -> int:
    """Perplexity, speed, size and memory of a model, dense or compressed, one method or several."""
    from lowbit import evaluation

    if args.kv_bits is not None:
        return _eval_kv(args)
    methods = [m.strip() for m in args.compare.split(",") if m.strip()] if args.compare else [args.method]
    known = ["none"] + [f.name for f in lowbit.registry.families()]
    for method in methods:
        if method not in known:
            raise ValueError(f"--method / --compare must name {', '.join(known)}, got {method!r}")
    results = []
    with tempfile.TemporaryDirectory(prefix="lowbit-eval-") as folder:
        for method in methods:
            print(f"lowbit eval: {args.model}, method {method}", file=sys.stderr, flush=True)
            save_to = None if args.no_reload else os.path.join(folder, method)
            results.append(evaluation.run_method(args.model, method, tokens=args.tokens, window=args.window,
                                                 new_tokens=args.new_tokens, save_to=save_to,
                                                 progress=not args.quiet,
                                                 calibration_tokens=args.calibration_tokens))
    doc = {"model": args.model, "tokens": args.tokens, "window": args.window, "text": "pydoc_data.topics",
           "torch_threads": torch.get_num_threads(), "cpu": lowbit.evaluation.cpu_facts(),
           "results": [r.to_dict() for r in results]}
    return _report(args, doc, lambda: evaluation.table(results))


def cmd_quantize(args) -> int:
    """Load a model (dense), compress its linear layers with a family, and save it as a checkpoint
    folder that ``lowbit.load``, ``lowbit eval`` and transformers' ``from_pretrained`` read."""
    from lowbit import evaluation

    known = [f.name for f in lowbit.registry.families()]
    if args.method not in known:
        raise ValueError(f"--method must name {', '.join(known)}, got {args.method!r}")
    if args.calibration_tokens < 0:
        raise ValueError(f"--calibration-tokens must be >= 0, got {args.calibration_tokens}")
    model, tokenizer = evaluation.load_dense(args.model)
    calibration = None
    if args.calibration_tokens:
        if lowbit.registry.get(args.method).calibration is None:
            raise ValueError(f"--calibration-tokens: method {args.method!r} takes no calibration")
        calibration = evaluation.calibration_batches(tokenizer, args.calibration_tokens)
    start = time.perf_counter()
    lowbit.quantize(model, args.method, calibration=calibration, progress=not args.quiet)
    seconds = time.perf_counter() - start
    folder = lowbit.save(model, args.out, progress=not args.quiet)
    tokenizer.save_pretrained(folder)
    bits = evaluation.linear_bits_per_weight(model)
    print(f"{args.model}: {args.method} in {seconds:.1f} s, {bits:.2f} bits per linear weight -> {folder}")
    return 0


def _bench_dir(path: str | None) -> Path:
    candidates = [Path(path)] if path else [
        Path(lowbit.__file__).resolve().parents[2] / "bench",  # source checkout (editable install)
        Path.cwd() / "bench",
    ]
    for candidate in candidates:
        if (candidate / "harness.py").exists():
            return candidate
    raise lowbit.LowbitError(f"no benchmark folder found (looked in {', '.join(str(c) for c in candidates)}); "
                             "run it from a source checkout or pass --path")


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


def cmd_bench(args) -> int:
    """Run bench/ under pytest (``args.extra``: further pytest arguments) and print its results."""
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
    cmd += args.extra
    proc = subprocess.run(cmd, cwd=bench, capture_output=True, text=True)
    written = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("lowbit results: ")]
    if proc.returncode != 0 or not written:
        sys.stdout.write(proc.stdout[-6000:])
        sys.stderr.write(proc.stderr[-6000:])
        print(f"lowbit: error: pytest exited with {proc.returncode}" + ("" if written else "; no results written"),
              file=sys.stderr)
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


class _Commands(argparse._SubParsersAction):
    """The subcommands, the foundation's and every family's: each accepts --debug after its name too.
    Its default is SUPPRESS so that a --debug given before the name is not reset."""

    def add_parser(self, name, **kwargs):
        debug_after = argparse.ArgumentParser(add_help=False)
        debug_after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="on an error, show the full traceback")
        kwargs["parents"] = [*kwargs.get("parents", ()), debug_after]
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The foundation's commands, then those of each registered family (``Family.add_cli``)."""
    parser = _Parser(prog="lowbit", description=lowbit.__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, action=_Commands)
    p_demo = sub.add_parser("demo", help="run every available backend on built-in data and check it")
    p_info = sub.add_parser("info", help="show the extension, the families and which backends run each op")
    p_bench = sub.add_parser("bench", help="run the benchmarks (extra arguments go to pytest, e.g. -k bits4)")
    for p in (p_demo, p_info, p_bench):
        p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible")
    p_bench.add_argument("--path", help="benchmark folder (default: bench/ of the source checkout)")
    p_bench.add_argument("--out", help="results JSON path (default: bench/results/<date>_<device>.json)")
    p_bench.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    p_demo.add_argument("--quick", action="store_true", help="a shorter model run (1024 tokens, fewer steps)")
    p_demo.add_argument("--no-model", action="store_true", help="only the kernel checks, not the SmolLM2 run")
    p_demo.add_argument("--plot", default="lowbit-demo.png", help="where the perplexity/size plot goes")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")
    p_eval = sub.add_parser("eval", help="perplexity, speed, size and memory of a model, dense or compressed")
    p_eval.add_argument("model", help=f"'smollm2' (the packaged SmolLM2-135M-Instruct), a lowbit or "
                                      f"transformers folder, or a .gguf file")
    p_eval.add_argument("--method", default="none", help="none (dense) or a family: dfloat, int8, ...")
    p_eval.add_argument("--compare", help="several methods side by side in one process, e.g. none,dfloat,int8")
    p_eval.add_argument("--tokens", type=int, default=4096, help="tokens of text for the perplexity (default 4096)")
    p_eval.add_argument("--window", type=int, default=1024, help="tokens per perplexity window (default 1024)")
    p_eval.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated to time decoding")
    p_eval.add_argument("--calibration-tokens", type=int, default=0,
                        help="calibrate the methods that take calibration (int8, codebook) on this many tokens "
                             "from the end of the text, disjoint from the evaluated span (default 0: none)")
    p_eval.add_argument("--kv-bits", type=int, choices=(2, 4, 8), default=None,
                        help="instead: the KV cache quantized to 2, 4 or 8 bits against the dense cache, "
                             "decoded token by token (perplexity change, agreement, bytes, speed)")
    p_eval.add_argument("--kv-group", type=int, default=64, help="with --kv-bits: the group size (default 64)")
    p_eval.add_argument("--kv-residual", type=int, default=32,
                        help="with --kv-bits: newest tokens kept in full precision at least (default 32)")
    p_eval.add_argument("--kv-prompt-tokens", type=int, default=512, help="with --kv-bits: prefilled tokens")
    p_eval.add_argument("--kv-decode-tokens", type=int, default=512,
                        help="with --kv-bits: tokens then fed one at a time (default 512)")
    p_eval.add_argument("--json", help="write the results as JSON to this path ('-': print JSON instead of the table)")
    p_eval.add_argument("--no-reload", action="store_true",
                        help="measure the model as compressed in memory; by default each method is saved to a "
                             "temporary folder and read back (lowbit.load, and transformers' from_pretrained), "
                             "timing both loads and the memory they take")
    p_eval.add_argument("--quiet", action="store_true", help="no progress bars")
    p_eval.set_defaults(func=cmd_eval)
    p_quant = sub.add_parser("quantize", help="compress a model's linear layers with a family and save the checkpoint")
    p_quant.add_argument("model", help="'smollm2' (the packaged SmolLM2-135M-Instruct), a transformers folder or a "
                                       ".gguf file")
    p_quant.add_argument("--method", required=True, help="a family: dfloat, int8, codebook, ...")
    p_quant.add_argument("--out", required=True, help="the checkpoint folder to write")
    p_quant.add_argument("--calibration-tokens", type=int, default=0,
                         help="calibrate on this many tokens of text (pydoc_data.topics, from its end; default 0)")
    p_quant.add_argument("--quiet", action="store_true", help="no progress bars")
    p_quant.set_defaults(func=cmd_quantize)
    p_demo.set_defaults(func=cmd_demo)
    p_info.set_defaults(func=cmd_info)
    p_bench.set_defaults(func=cmd_bench, passes_unknown=True)
    for family in lowbit.registry.families():
        if family.add_cli is not None:
            family.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
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
