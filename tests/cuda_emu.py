"""Runs lowbit's CUDA kernels (csrc/cuda/*.cu) on the CPU, for tests on machines without a GPU.

``build(family)`` rewrites csrc/cuda/<family>.cu into plain C++ — each ``kernel<<<grid, block, smem,
stream>>>(args)`` into ``::emu::launch(grid, block, smem, stream, kernel, args)``, each ``extern
__shared__ T name[];`` into a pointer to the launch's dynamic shared memory, and each inline-PTX
statement it knows (named barriers, ``mma.sync.m16n8k16`` on bf16/fp16, ``cp.async`` and its
groups) into a call of the emulation — compiles it with g++ against the stand-in CUDA headers in
tests/cuda_emu/include (fibers for the threads of a block, switched where CUDA threads
synchronize; see cuda_runtime.h there) together with tests/cuda_emu/<family>_entry.cpp (C entry
points), and loads the library with ctypes. The kernels' own code runs unchanged: their indexing,
shared memory, barriers, shuffles, tensor-core fragment layouts, rounding, and the launchers' grid
and plan arithmetic. What it cannot show: timing, and races between threads of a block (a fiber runs
alone between two barriers; cp.async copies complete at once). Any other inline PTX is refused.
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

import pytest

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
    src = _rewrite_asm(src)
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


def _asm_operands(section: str) -> list[str]:
    """The C++ expressions of an asm operand list: '"+f"(d[0]), "r"(a0)' -> ['d[0]', 'a0']."""
    out = []
    for item in _split_args(section):
        item = item.strip()
        if item:
            out.append(item[item.index("(") + 1:item.rindex(")")].strip())
    return out


def _asm_call(template: str, operands: list[str]) -> str:
    """The emulation's call for one inline-PTX statement."""
    t = " ".join(template.split())
    if re.fullmatch(r"bar(rier)?\.sync %0, %1;", t):
        return f"::emu::named_barrier({operands[0]}, {operands[1]});"
    mma = re.fullmatch(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.\1\.f32 \{%0, %1, %2, %3\}, "
                       r"\{%4, %5, %6, %7\}, \{%8, %9\}, \{%0, %1, %2, %3\};", t)
    if mma:
        return f"::emu::mma16816<{'true' if mma.group(1) == 'bf16' else 'false'}>({', '.join(operands)});"
    copy = re.fullmatch(r"cp\.async\.c[ag]\.shared\.global \[%0\], \[%1\], (\d+)(, %2)?;", t)
    if copy:
        src_size = operands[2] if copy.group(2) else copy.group(1)
        return f"::emu::cp_async({operands[0]}, {operands[1]}, {copy.group(1)}, {src_size});"
    if re.fullmatch(r"cp\.async\.(commit_group|wait_group \d+|wait_all);", t):
        return "(void)0;"  # the copies are already done
    raise ValueError(f"inline PTX the emulation cannot run: {t!r}")


def _rewrite_asm(src: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s*(?:volatile\s*)?\(", src):
        if m.start() < pos:
            continue
        end = _balanced(src, m.end() - 1)
        body = src[m.end():end - 1]
        sections = _split_colons(body)
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0])).replace("\\n", " ")
        operands = _asm_operands(sections[1]) if len(sections) > 1 else []
        operands += _asm_operands(sections[2]) if len(sections) > 2 else []
        semicolon = src.index(";", end)
        out.append(src[pos:m.start()])
        out.append(_asm_call(template, operands))
        pos = semicolon + 1
    out.append(src[pos:])
    return "".join(out)


def _split_colons(body: str) -> list[str]:
    """An asm body split at the colons outside strings and parentheses."""
    parts, cur, depth, quoted = [], [], 0, False
    for i, c in enumerate(body):
        if c == '"' and (i == 0 or body[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        if c == ":" and not quoted and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


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


def library(family: str) -> ctypes.CDLL:
    """build(family) for a test, which is skipped (saying why) where no C++ compiler is found."""
    if compiler() is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    return build(family)


def pointer(t) -> ctypes.c_void_p:
    """A tensor's data as a ctypes pointer; null for None or an empty tensor."""
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)
