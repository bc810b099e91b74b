"""Runs lowbit's CUDA kernels (csrc/cuda/*.cu) on the CPU, for tests on machines without a GPU.

``build(family)`` rewrites csrc/cuda/<family>.cu into plain C++ — each ``kernel<<<grid, block, smem,
stream>>>(args)`` into ``::emu::launch(grid, block, smem, stream, kernel, args)``, each ``extern
__shared__ T name[];`` into a pointer to the launch's dynamic shared memory, the named-barrier
``asm`` into ``::emu::named_barrier`` — compiles it with g++ against the stand-in CUDA headers in
tests/cuda_emu/include (fibers for the threads of a block, switched where CUDA threads synchronize;
see cuda_runtime.h there) together with tests/cuda_emu/<family>_entry.cpp (C entry points), and
loads the library with ctypes. The kernels' own code runs unchanged: their indexing, shared
memory, barriers, shuffles, rounding, and the launchers' grid and plan arithmetic. What it cannot
show: timing, memory-model races between threads of a block (a fiber runs alone between two
barriers), and inline PTX other than named barriers (tensor-core ``mma`` kernels are not covered).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"


def _launch_name_start(src: str, end: int) -> int:
    """Start of the kernel expression ending at ``end`` (an identifier path with template args)."""
    i, depth = end, 0
    while i > 0:
        c = src[i - 1]
        if c == ">":
            depth += 1
        elif c == "<":
            depth -= 1
        elif depth == 0 and not (c.isalnum() or c in "_:"):
            break
        i -= 1
    return i


def _balanced(src: str, start: int) -> int:
    """Index just past the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced parentheses in a kernel launch")


def rewrite(src: str) -> str:
    """The CUDA source as C++ for the emulation headers."""
    src = re.sub(r"extern\s+__shared__\s+(?:alignas\(\d+\)\s+|__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_shared());", src)
    src = re.sub(r'asm\s+volatile\s*\(\s*"bar(?:rier)?\.sync\s+%0,\s*%1;"\s*:\s*:\s*"r"\(([^)]*)\)\s*,\s*"r"\(([^)]*)\)'
                 r'\s*:\s*"memory"\s*\)\s*;', r"::emu::named_barrier(\1, \2);", src)
    if re.search(r"\basm\b", src):
        raise ValueError("inline PTX other than named barriers cannot run in the emulation")
    out, pos = [], 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            break
        close = src.index(">>>", at)
        name_start = _launch_name_start(src, at)
        name = src[name_start:at].strip()
        config = [c.strip() for c in _split_args(src[at + 3:close])]
        config += ["0", "nullptr"][len(config) - 2:] if len(config) < 4 else []
        paren = src.index("(", close)
        args_end = _balanced(src, paren)
        args = src[paren + 1:args_end - 1].strip()
        call = f"::emu::launch({', '.join(config)}, {name}{', ' + args if args else ''})"
        out.append(src[pos:name_start])
        out.append(call)
        pos = args_end
    out.append(src[pos:])
    return "".join(out)


def _split_args(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


_LIBS: dict[str, ctypes.CDLL] = {}


def build(family: str) -> ctypes.CDLL:
    """The emulated kernels of csrc/cuda/<family>.cu with tests/cuda_emu/<family>_entry.cpp, built
    once per source contents (in the system's temporary directory) and loaded."""
    if family in _LIBS:
        return _LIBS[family]
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler for the CUDA emulation")
    source = ROOT / "csrc" / "cuda" / f"{family}.cu"
    entry = EMU / f"{family}_entry.cpp"
    inputs = [source, entry, EMU / "include" / "cuda_runtime.h", *sorted((ROOT / "csrc").glob("cuda/*.h")),
              *sorted((ROOT / "csrc").glob("common/*.h"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + rewrite.__code__.co_code).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "lowbit-cuda-emu"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"{family}-{digest}.so"
    if not lib.exists():
        rewritten = out_dir / f"{family}-{digest}.cpp"
        rewritten.write_text(rewrite(source.read_text()))
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
               "-w", "-I", str(EMU / "include"), "-I", str(ROOT / "csrc" / "cuda"), "-I", str(ROOT / "csrc"),
               f'-DLOWBIT_EMU_SOURCE="{rewritten}"', str(entry), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation of {family} failed:\n{' '.join(cmd)}\n{result.stderr}")
        os.replace(tmp, lib)
    _LIBS[family] = ctypes.CDLL(str(lib))
    return _LIBS[family]
