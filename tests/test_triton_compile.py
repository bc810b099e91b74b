"""Every Triton kernel compiles offline for sm_80 and sm_90 with the arguments its launcher passes.

The interpreter (how the CPU tests run the kernels) cannot check what only the compiler does: the
rules of tl.dot on shapes and dtypes, layouts, register pressure. So each ``_..._kernel`` in
triton_kernels/ is compiled here with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
which needs no GPU, and its registers, spills and shared memory are reported (the conftest's
summary prints them). A kernel without variants below fails ``test_every_kernel_has_variants``.

The signatures are not written by hand. A variant calls the kernel's Python launcher on ``meta``
tensors with the kernel swapped for a recorder, and Triton's own specialization rule turns the
recorded arguments into what a real launch compiles: pointer dtypes, i32 or i64, an int equal to 1
as a constant, 16-divisible ints and pointers marked so. The variants therefore follow the
launchers' tiles, warps and dtype choices as they change; they pick the shapes that select them.

Under TRITON_INTERPRET=1 ``@triton.jit`` makes interpreted functions, which cannot be compiled, so
the compiles run in one subprocess per target without it (``python test_triton_compile.py``), each
in a fresh Triton cache: ptxas then always runs, and its log gives registers and spills (a
CompiledKernel reads those from the driver, which needs a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8"}
WORKER_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile of one kernel: what ASTSource and triton.compile take, as plain data."""

    module: str  # lowbit.triton_kernels.<family>
    kernel: str
    name: str  # the variant's id
    signature: dict  # argument -> Triton type, "constexpr" for constants
    constexprs: dict
    attrs: dict  # argument index -> specialization ("D": divisible by 16)
    options: dict  # num_warps, num_stages, enable_fp_fusion, ...

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.name}"


# ---- recording launches ----------------------------------------------------------------------


class _Launched(Exception):
    def __init__(self, args, kwargs):
        super().__init__("launched")
        self.args_, self.kwargs = args, kwargs


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` raises _Launched with the arguments."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise _Launched(args, kwargs)
        return launch


def _meta(*shape, dtype=torch.uint8):
    return torch.empty(shape, dtype=dtype, device="meta")


def _record(module_name: str, kernel: str, name: str, launch) -> Variant:
    """Runs ``launch()`` (a launcher call) with ``kernel`` recorded instead of run -> its Variant."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    module = importlib.import_module(module_name)
    fn = getattr(module, kernel)
    # The launchers go through torch's wrap_triton, which accepts Triton functions only.
    wrap = getattr(module, "wrap_triton", None)
    setattr(module, kernel, _Recorder())
    if wrap is not None:
        module.wrap_triton = lambda k: k
    try:
        launch()
    except _Launched as launched:
        args, kwargs = launched.args_, launched.kwargs
    else:
        raise AssertionError(f"{module_name}: {name} did not launch {kernel}")
    finally:
        setattr(module, kernel, fn)
        if wrap is not None:
            module.wrap_triton = wrap
    names = list(fn.arg_names)
    positional = [n for n in names if n not in kwargs]
    assert len(args) == len(positional), f"{kernel}: {len(args)} positional arguments for {positional}"
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(positional, args))
    for index, arg in enumerate(names):
        if arg in kwargs:
            signature[arg], constexprs[arg] = "constexpr", kwargs[arg]
            continue
        # The rule a launch applies (JITFunction.run): -> (type, "D" / "" / None) or ("constexpr", 1).
        kind, spec = native_specialize_impl(BaseBackend, values[arg], False, True, True)
        if kind == "constexpr":
            signature[arg], constexprs[arg] = "constexpr", spec
        else:
            signature[arg] = kind
            if spec:
                attrs[str(index)] = spec
    options = {k: v for k, v in kwargs.items() if k not in names}
    return Variant(module_name, kernel, name, signature, constexprs, attrs, options)


# ---- the variants: launcher calls that reach every launch configuration ----------------------


def _bitpack_launches():
    from lowbit.reference.bitpack import SUPPORTED_BITS, packed_length
    from lowbit.triton_kernels import bitpack

    for bits in SUPPORTED_BITS:
        n = 4096
        yield "_pack_bits_kernel", f"bits{bits}", lambda: bitpack.pack_bits(_meta(64, n), bits)
        yield "_unpack_bits_kernel", f"bits{bits}", lambda: bitpack.unpack_bits(
            _meta(64, packed_length(n, bits)), bits, n)
    # More than 2^31 - 1 elements: the sizes become i64.
    yield "_pack_bits_kernel", "bits4-i64", lambda: bitpack.pack_bits(_meta(1 << 20, 4097), 4)
    yield "_unpack_bits_kernel", "bits4-i64", lambda: bitpack.unpack_bits(
        _meta(1 << 20, packed_length(4097, 4)), 4, 4097)


def _dfloat_stream(n: int, dtype, windows_per_block: int, window_bits: int = 256):
    """Stream tensors of the right dtypes (sizes do not matter to a compile) and the ints."""
    from lowbit.reference.dfloat import LAYOUTS, MAX_CODE_LEN

    raw_bytes = LAYOUTS[dtype][2]
    total_bits = 3 * n + 5
    windows = -(-total_bits // window_bits)
    blocks = -(-windows // windows_per_block)
    stream = (_meta(windows * window_bits // 8 + 4), _meta(n * raw_bytes), _meta(-(-windows // 2)),
              _meta(blocks + 1, dtype=torch.int64), _meta(1 << MAX_CODE_LEN, dtype=torch.int16))
    return stream, total_bits, window_bits, windows_per_block


def _dfloat_launches():
    from lowbit.dfloat.format import DEFAULT_WINDOWS_PER_BLOCK
    from lowbit.triton_kernels import dfloat

    n = 4096 * 4096
    # windows_per_block: the default (128 lanes, 4 warps) and the smallest (1 lane, 1 warp); uint8
    # decodes too (no raw bytes), gemv takes floats only.
    for wpb in (DEFAULT_WINDOWS_PER_BLOCK, 1):
        for dtype in (*FLOAT_DTYPES, torch.uint8):
            stream, total_bits, window_bits, _ = _dfloat_stream(n, dtype, wpb)
            yield "_dfloat_decode_kernel", f"{_DTYPE[dtype]}-wpb{wpb}", lambda: dfloat.decode(
                *stream, n, dtype, total_bits, window_bits, wpb)
    stream, total_bits, window_bits, wpb = _dfloat_stream(1 << 31, torch.bfloat16, DEFAULT_WINDOWS_PER_BLOCK)
    yield "_dfloat_decode_kernel", "bf16-i64", lambda: dfloat.decode(
        *stream, 1 << 31, torch.bfloat16, total_bits, window_bits, wpb)

    out_features, in_features = 4096, 4096
    # Batch tiles 1 and 8 (the largest); 3 rows take a tile of 4.
    default = DEFAULT_WINDOWS_PER_BLOCK
    for batch, wpb, dtypes in ((1, default, FLOAT_DTYPES), (8, default, FLOAT_DTYPES), (3, 1, (torch.bfloat16,))):
        for dtype in dtypes:
            stream, total_bits, window_bits, _ = _dfloat_stream(out_features * in_features, dtype, wpb)
            yield "_dfloat_gemv_kernel", f"{_DTYPE[dtype]}-b{batch}-wpb{wpb}", lambda: dfloat.gemv(
                _meta(batch, in_features, dtype=dtype), *stream, out_features, total_bits, window_bits, wpb)
    # An lm_head of 2^31 weights: n and total_bits become i64.
    stream, total_bits, window_bits, wpb = _dfloat_stream(131072 * 16384, torch.bfloat16, DEFAULT_WINDOWS_PER_BLOCK)
    yield "_dfloat_gemv_kernel", "bf16-b1-i64", lambda: dfloat.gemv(
        _meta(1, 16384, dtype=torch.bfloat16), *stream, 131072, total_bits, window_bits, wpb)


def _int8_launches():
    from lowbit.triton_kernels import int8

    def prepass(m, k, s, dtype, threshold):
        return lambda: int8.prepass(_meta(m, k, dtype=dtype), _meta(k), _meta(s, dtype=torch.int32), threshold)

    # K = 4096 keeps the row in registers, 32768 walks it twice; 97 and 16384: the narrowest and
    # widest single-block rows (1 and 16 warps). Threshold 0 turns the dynamic split off.
    for k in (4096, 32768):
        for dtype in FLOAT_DTYPES:
            for threshold in (6.0, 0.0):
                yield "_int8_prepass_kernel", f"{_DTYPE[dtype]}-k{k}-t{threshold:g}", prepass(64, k, 5, dtype,
                                                                                              threshold)
    for k in (97, 16384):
        yield "_int8_prepass_kernel", f"bf16-k{k}-t6", prepass(64, k, 5, torch.bfloat16, 6.0)

    def matmul(m, n, k, s, dtype, threshold, bias):
        return lambda: int8.matmul(
            _meta(m, k, dtype=dtype), _meta(m, k, dtype=torch.int8), _meta(m, dtype=torch.float32), _meta(k),
            _meta(m, s, dtype=dtype), _meta(n, k, dtype=torch.int8), _meta(n, dtype=torch.float32),
            _meta(n, s, dtype=dtype), _meta(n, dtype=dtype) if bias else None, threshold)

    # M picks the tile config (_matmul_config): <= 16, <= 32, <= 64, larger.
    for m in (1, 17, 33, 65):
        for dtype in FLOAT_DTYPES:
            yield "_int8_matmul_kernel", f"{_DTYPE[dtype]}-m{m}", matmul(m, 4096, 4096, 5, dtype, 6.0, True)
    yield "_int8_matmul_kernel", "bf16-m65-t0-nobias", matmul(65, 4096, 4096, 0, torch.bfloat16, 0.0, False)

    def gemv(m, n, k, s, dtype, bias):
        return lambda: int8.gemv(_meta(m, k, dtype=dtype), _meta(n, k, dtype=torch.int8),
                                 _meta(n, dtype=torch.float32), _meta(s, dtype=torch.int32),
                                 _meta(n, s, dtype=dtype), _meta(n, dtype=dtype) if bias else None)

    # N picks 16 or 32 weight rows per program; K tiles follow x's dtype.
    for n in (4096, 16384):
        for dtype in FLOAT_DTYPES:
            yield "_int8_gemv_kernel", f"{_DTYPE[dtype]}-n{n}", gemv(1, n, 4096, 5, dtype, True)
    yield "_int8_gemv_kernel", "bf16-m5-n4096-nobias", gemv(5, 4096, 4096, 0, torch.bfloat16, False)


def _codebook_launches():
    from lowbit.triton_kernels import codebook

    def layer(n, in_features, count, nbits, g, codebook_dtype):
        codes = _meta(n, in_features // g, count, dtype=torch.uint8 if nbits == 8 else torch.int16)
        return codes, _meta(count, 1 << nbits, 1, g, dtype=codebook_dtype), _meta(n, 1, 1, 1, dtype=torch.float16)

    def matmul(m, count, nbits, g, dtype, codebook_dtype, bias=True, n=4096, k=4096):
        return lambda: codebook.matmul(_meta(m, k, dtype=dtype), *layer(n, k, count, nbits, g, codebook_dtype),
                                       _meta(n, dtype=dtype) if bias else None)

    # (num_codebooks, nbits, group_size): AQLM's 2x8 and 1x16 with groups of 8, and groups of 4.
    configs = ((2, 8, 8), (1, 16, 8), (2, 8, 4), (1, 8, 4))
    # gemv: M picks the x rows per program (1, 4, 16) and with N the weight rows (16, 8 or 4),
    # which set the K step.
    for count, nbits, g in configs:
        yield "_codebook_gemv_kernel", f"{count}x{nbits}-g{g}-bf16-m1", matmul(1, count, nbits, g, torch.bfloat16,
                                                                                torch.bfloat16)
    for n in (16384, 1024):
        yield "_codebook_gemv_kernel", f"2x8-g8-bf16-m1-n{n}", matmul(1, 2, 8, 8, torch.bfloat16, torch.bfloat16,
                                                                      n=n)
    for m in (4, 16):
        yield "_codebook_gemv_kernel", f"2x8-g8-bf16-m{m}", matmul(m, 2, 8, 8, torch.bfloat16, torch.bfloat16)
    yield "_codebook_gemv_kernel", "2x8-g8-fp32-m1-nobias", matmul(1, 2, 8, 8, torch.float32, torch.float16, False)
    # matmul: the dot mode (x dtype, codebooks' dtype: _dot_mode) and M (the tile config).
    for m in (17, 33, 65):
        for dtype, codebook_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                      (torch.bfloat16, torch.float16), (torch.float32, torch.float16)):
            name = f"2x8-g8-{_DTYPE[dtype]}-cb{_DTYPE[codebook_dtype]}-m{m}"
            yield "_codebook_matmul_kernel", name, matmul(m, 2, 8, 8, dtype, codebook_dtype)
    for count, nbits, g in configs[1:]:
        yield "_codebook_matmul_kernel", f"{count}x{nbits}-g{g}-fp16-m65", matmul(65, count, nbits, g, torch.float16,
                                                                                   torch.float16)
    yield "_codebook_matmul_kernel", "2x8-g8-fp16-cbfp32-m65-nobias", matmul(65, 2, 8, 8, torch.float16,
                                                                             torch.float32, False)
    for count, nbits, g in configs:
        for dtype in FLOAT_DTYPES:
            yield "_codebook_dequantize_kernel", f"{count}x{nbits}-g{g}-{_DTYPE[dtype]}", lambda: codebook.dequantize(
                *layer(4096, 4096, count, nbits, g, torch.float16), dtype)
    for g, weights in ((8, True), (8, False), (4, True)):
        yield "_codebook_nearest_kernel", f"g{g}-{'weights' if weights else 'plain'}", lambda: codebook.nearest(
            _meta(1 << 20, g, dtype=torch.float32), _meta(1 << 20, g, dtype=torch.float32) if weights else None,
            _meta(65536, g, dtype=torch.float32))


def _kv_launches():
    from lowbit.triton_kernels import kv

    def attend(hq, hkv, length, d, g, bits, tokens, dtype, masked):
        nb = (tokens - 32) // g
        r = tokens - nb * g
        u8 = torch.uint8
        args = (_meta(1, hq, length, d, dtype=dtype), _meta(1, hkv, nb, d, g * bits // 8, dtype=u8),
                _meta(1, hkv, nb, d, dtype=dtype), _meta(1, hkv, nb, d, dtype=dtype),
                _meta(1, hkv, nb * g, d * bits // 8, dtype=u8), _meta(1, hkv, nb * g, d // g, dtype=dtype),
                _meta(1, hkv, nb * g, d // g, dtype=dtype), _meta(1, hkv, r, d, dtype=dtype),
                _meta(1, hkv, r, d, dtype=dtype))
        mask = _meta(1, 1, length, tokens, dtype=torch.bool) if masked else None
        return lambda: kv.decode_attention(*args, mask, bits, g, d ** -0.5)

    # SmolLM2's 9/3 heads of 64 at every bit width; 32/8 heads of 128 in every dtype; 16 queries
    # with a padding mask; groups of 32.
    for bits in (2, 4, 8):
        yield "_kv_decode_attention_kernel", f"9-3-64-g64-{bits}bit-bf16", attend(9, 3, 1, 64, 64, bits, 16384,
                                                                                  torch.bfloat16, False)
    for dtype in FLOAT_DTYPES:
        yield "_kv_decode_attention_kernel", f"32-8-128-g64-4bit-{_DTYPE[dtype]}", attend(32, 8, 1, 128, 64, 4, 65536,
                                                                                         dtype, False)
    yield "_kv_decode_attention_kernel", "32-8-128-g64-4bit-bf16-l16-mask", attend(32, 8, 16, 128, 64, 4, 16384,
                                                                                  torch.bfloat16, True)
    yield "_kv_decode_attention_kernel", "9-3-64-g32-2bit-fp16", attend(9, 3, 1, 64, 32, 2, 4096, torch.float16,
                                                                        False)

    def quantize(part, d, g, bits, dtype):
        """The keys' (a group per block and channel, stride d) or the values' (stride 1) launch for a
        prompt of 4096 tokens of 8 heads."""
        tokens = 8 * 4096
        x = _meta(tokens, d, dtype=dtype)
        if part == "keys":
            rows, stride, codes = tokens // g * d, d, _meta(tokens // g, d, g * bits // 8)
        else:
            rows, stride, codes = tokens * (d // g), 1, _meta(tokens, d * bits // 8)
        scale = _meta(rows, dtype=dtype)
        return lambda: kv.quantize_groups(x, codes, scale, scale, rows, stride, bits, g)

    # Every bit width and dtype for keys and values; head_dim 128 with groups of 32 and 128.
    for part in ("keys", "values"):
        for bits in (2, 4, 8):
            yield "_kv_quantize_kernel", f"{part}-64-g64-{bits}bit-bf16", quantize(part, 64, 64, bits, torch.bfloat16)
        for dtype in (torch.float16, torch.float32):
            yield "_kv_quantize_kernel", f"{part}-128-g32-4bit-{_DTYPE[dtype]}", quantize(part, 128, 32, 4, dtype)
        yield "_kv_quantize_kernel", f"{part}-128-g128-2bit-bf16", quantize(part, 128, 128, 2, torch.bfloat16)


# module -> its launches: (kernel, variant name, a launcher call), each called as soon as it is
# yielded (so a lambda may use the loop's variables).
LAUNCHES = {
    "lowbit.triton_kernels.bitpack": _bitpack_launches,
    "lowbit.triton_kernels.codebook": _codebook_launches,
    "lowbit.triton_kernels.dfloat": _dfloat_launches,
    "lowbit.triton_kernels.int8": _int8_launches,
    "lowbit.triton_kernels.kv": _kv_launches,
}


def _variants() -> list[Variant]:
    return [_record(module, kernel, name, launch)
            for module, launches in LAUNCHES.items() for kernel, name, launch in launches()]


VARIANTS = _variants()


def _kernels() -> dict[str, list[str]]:
    """module -> its ``_..._kernel`` Triton functions, found by scanning triton_kernels/*.py."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"lowbit.triton_kernels.{path.stem}")
        found[module.__name__] = sorted(
            name for name, value in vars(module).items()
            if isinstance(value, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"))
    return found


def test_every_kernel_has_variants():
    kernels = _kernels()
    assert any(kernels.values()), "no _..._kernel Triton function found in triton_kernels/"
    covered = {(v.module, v.kernel) for v in VARIANTS}
    found = {(module, kernel) for module, names in kernels.items() for kernel in names}
    missing = sorted(f"{m}.{k}" for m, k in found - covered)
    assert not missing, f"no compile variants for {missing}: add its launcher calls to LAUNCHES in {__file__}"
    stale = sorted(f"{m}.{k}" for m, k in covered - found)
    assert not stale, f"variants of kernels that no longer exist: {stale}"


# ---- compiling, in subprocesses --------------------------------------------------------------


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """arch -> variant id -> result dict: compiled all at once, one subprocess per arch in parallel."""
    work = tmp_path_factory.mktemp("triton_compile")
    specs = work / "variants.json"
    specs.write_text(json.dumps([dataclasses.asdict(v) for v in VARIANTS]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    start = time.perf_counter()
    for arch in ARCHS:
        out = work / f"sm_{arch}.jsonl"
        procs[arch] = (subprocess.Popen(
            [sys.executable, __file__, str(arch), str(specs), str(out), str(work / f"cache_sm_{arch}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for arch, (proc, out) in procs.items():
        try:
            log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        results[arch] = {r["id"]: r for r in done}
        # A worker that died (crash, timeout) fails the variant it was on and those after it.
        pending = [v.id for v in VARIANTS if v.id not in results[arch]]
        if pending:
            why = f"the sm_{arch} worker exited ({proc.returncode}) before this variant:\n{log[-4000:]}"
            results[arch][pending[0]] = {"id": pending[0], "error": why}
    results["seconds"] = time.perf_counter() - start
    return results


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_triton_compiles(variant, arch, compiled, record_property):
    result = compiled[arch].get(variant.id)
    assert result is not None, f"sm_{arch}: not compiled (its worker stopped earlier)"
    assert "error" not in result, f"sm_{arch} {variant.id}:\n{result['error']}"
    record_property("triton_compile", {"kernel": variant.kernel, "variant": variant.name, "arch": f"sm_{arch}",
                                       "regs": result["regs"], "spills": result["spills"],
                                       "smem": result["smem"], "seconds": compiled["seconds"]})


# ---- the worker ------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(variant: dict, target, seen: dict) -> dict:
    """-> {"id", "regs", "spills", "smem"} or {"id", "error"}. ``seen``: binary hash -> (regs,
    spills) of the kernels compiled so far, for variants that compile to one of them (a cache
    hit runs no ptxas, so leaves no log)."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    vid = f"{variant['kernel']}-{variant['name']}"
    fn = getattr(importlib.import_module(variant["module"]), variant["kernel"])
    if not isinstance(fn, JITFunction):
        return {"id": vid, "error": f"{variant['kernel']} is a {type(fn).__name__}, not a JITFunction"}
    attrs = {(int(i),): triton.backends.compiler.BaseBackend.parse_attr(spec) for i, spec in variant["attrs"].items()}
    src = ASTSource(fn, signature=variant["signature"], constexprs=variant["constexprs"], attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=variant["options"])
    except Exception as exc:  # a compile error: the message names the kernel line
        return {"id": vid, "error": f"{type(exc).__name__}: {exc}"}
    regs, spills = _REGS.search(log.getvalue()), _SPILLS.search(log.getvalue())
    if regs and spills:
        seen[kernel.hash] = int(regs.group(1)), int(spills.group(1))
    regs, spills = seen.get(kernel.hash, (None, None))
    return {"id": vid, "regs": regs, "spills": spills, "smem": kernel.metadata.shared,
            "seconds": round(time.perf_counter() - start, 2)}


def _worker(arch: str, specs: str, out: str, cache: str) -> None:
    """Compiles every variant in ``specs`` for sm_<arch>, one JSON line per variant to ``out``."""
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas runs and logs every kernel
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", int(arch), 32)
    seen = {}
    with open(out, "w") as f:
        for variant in json.loads(Path(specs).read_text()):
            f.write(json.dumps(_compile(variant, target, seen)) + "\n")
            f.flush()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
