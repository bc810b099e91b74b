"""Static performance evidence for the GPU kernels, without a GPU.

    python bench/static.py [--out bench/results/<date>_static-sm90a.json] [--only REGEX] [--loops REGEX]

Every CUDA kernel in csrc/cuda/*.cu is compiled for sm_90a (nvcc -cubin, the flags of
tests/test_cuda_compile.py plus -lineinfo, which changes no code) and every Triton kernel offline
for sm_90 (one variant each, taken from tests/test_triton_compile.py's list, which records what the
launchers pass). For each kernel the report gives registers, spill bytes, shared memory and the
blocks per SM an H100/H200 can hold; for the kernels in HOT_LOOPS also the SASS instructions of the
hot loop per element and the budget the kernel's target implies (BUDGETS). Until a GPU has measured
a kernel, these are the evidence for its speed: estimates, not measurements.

How a loop is counted. The cubin is disassembled with nvdisasm (-gp: each instruction's PTX line,
whose .loc gives the source line and the line it was inlined at); a
branch to an earlier address closes a loop, [target, branch]. A hot loop is named in HOT_LOOPS by a
line of its source (a regex): the smallest loop holding an instruction of that line (directly or
through an inlined call). Its count is the instructions of the body outside nested loops, minus
those of lines marked cold (paths an iteration takes only at edges, such as a tail chunk); both
sides of any other branch are counted, so the figure is an upper bound on what one iteration
issues when the body has branches, and an exact count when it has none. Divided by the elements
one thread handles per iteration (a constant derived from the source, stated per entry) it gives
per-thread instructions per element.

The budget. An H100 SXM issues R = 132 SMs x 4 schedulers x 1 warp-instruction per cycle x 1.755
GHz = 926.6 G warp-instructions/s. A loop body of I instructions that handles E elements per
thread handles 32 E per warp for I warp-instructions, so reaching T elements/s needs
I / (32 E) * T <= R, that is per-thread instructions per element I / E <= 32 R / T. A kernel that
must move B bytes of HBM per element at bandwidth BW has T = BW / B, hence
I / E <= 32 R B / BW = 8.85 B instructions per byte at 3.35 TB/s. The budget counts the hot loop
only: everything else (prologue, reductions, other kernels) must also fit, so a kernel at its
budget would not quite reach the target. Tools: cuobjdump and nvdisasm as Triton's wheel ships
them (triton/backends/nvidia/bin), else from CUDA_HOME or PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90a"

# ---- the machine: H100 SXM (the H200 has the same SM; its 4.8 TB/s only raises the bounds) ----------

SMS = 132
SCHEDULERS_PER_SM = 4
CLOCK_HZ = 1.755e9
ISSUE_RATE = SMS * SCHEDULERS_PER_SM * CLOCK_HZ  # warp-instructions/s, whole GPU
HBM_BYTES_PER_S = 3.35e12
BF16_FLOPS = 989e12  # dense tensor-core peak
INT8_OPS = 1979e12
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the driver's share of every CTA on sm_90
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32


def budget_for_rate(elements_per_s: float) -> float:
    """Per-thread instructions per element that still issue ``elements_per_s`` (see the docstring)."""
    return 32 * ISSUE_RATE / elements_per_s


@dataclasses.dataclass(frozen=True)
class Budget:
    target: str  # the goal, as the project states it
    unit: str  # what one element is
    rate: float  # elements/s the goal implies
    derivation: str

    @property
    def instructions(self) -> float:
        return budget_for_rate(self.rate)


BF16_GEMV_WEIGHTS_PER_S = HBM_BYTES_PER_S / 2  # cuBLAS bf16 at batch 1: 2 bytes per weight at ~3.35 TB/s
# kv: per token and KV head of head_dim d, 4-bit keys and values take d/2 bytes each, and groups of
# G = 64 (keys: per channel over G tokens; values: per token over G channels) add a scale and a zero
# of 2 bytes each: 4 d / G bytes per token for each; docs/formats.md, "kv". Per cached element (one
# key or value channel of one token): (d + 8 d / G) / (2 d) = 1/2 + 4/G bytes.
KV_BYTES_PER_ELEMENT = 0.5 + 4 / 64

BUDGETS = {
    "dfloat_decode": Budget(
        ">= 1 TB/s of bf16 output", "output element", 1e12 / 2,
        "1e12 B/s / 2 B per bf16 = 5e11 elements/s; 32 R / 5e11"),
    "dfloat_gemv": Budget(
        ">= 1.0x cuBLAS bf16 at batch 1", "weight", BF16_GEMV_WEIGHTS_PER_S,
        "cuBLAS reads 2 B/weight at 3.35 TB/s: 1.675e12 weights/s; 32 R / 1.675e12 (the ~1.34 B/weight "
        "dfloat reads would allow more: issue is the bound)"),
    "int8_gemv": Budget(
        ">= 1.3x bf16 GEMV at batch 1", "weight", 1.3 * BF16_GEMV_WEIGHTS_PER_S,
        "1.3 x 1.675e12 = 2.18e12 weights/s (2.18 TB/s of int8 weights, within HBM); 32 R / 2.18e12"),
    "int8_gemm": Budget(
        ">= 1.5x bf16 GEMM at M >= 2048", "multiply-add", 1.5 * BF16_FLOPS / 2,
        "1.5 x 989 TFLOP/s = 1483 TOP/s (75% of int8's 1979) = 7.4e14 MAC/s; 32 R / 7.4e14"),
    "codebook_gemv": Budget(
        "the HBM bound of 2 bits/weight at batch 1 (8x bf16)", "weight", HBM_BYTES_PER_S / 0.25,
        "0.25 B/weight at 3.35 TB/s = 1.34e13 weights/s; 32 R / 1.34e13 (2x bf16 needs 4x this budget)"),
    "kv_decode": Budget(
        "the HBM bound of a 4-bit KV cache, groups of 64", "cached element", HBM_BYTES_PER_S / KV_BYTES_PER_ELEMENT,
        "0.5625 B per key or value element (KV_BYTES_PER_ELEMENT) at 3.35 TB/s = 5.96e12 elements/s; "
        "32 R / 5.96e12"),
}


# ---- the hot loops: one place for every constant taken from the sources ---------------------------


@dataclasses.dataclass(frozen=True)
class Loop:
    marker: object  # regex of a source line inside the loop, or a tuple of regexes whose lines it
    # must all hold (a loop inlined at several call sites: the body's line and the call's)
    elements: object  # elements one thread handles per iteration: a number, or for a Triton kernel a
    # function of (constexprs, threads)
    why: str  # the derivation of `elements` from the source
    file: str = ""  # where the marker is; default: the kernel's source
    times: int = 1  # how often the loop runs per element (a two-pass decode: 2)
    probe: tuple = ()  # (regex of a line, opcode prefix, count): the body issues `count` such
    # instructions of that line per source iteration; more in the SASS loop means the compiler
    # unrolled it, and the elements per SASS iteration are scaled by the factor
    cold: tuple = ()  # lines on paths an iteration rarely takes (not counted): regexes of single
    # lines, or (first, last) regex pairs of ranges (a function's body)


@dataclasses.dataclass(frozen=True)
class Kernel:
    source: str  # csrc/cuda/<file>.cu, or lowbit.triton_kernels.<module>
    name: str  # CUDA: the __global__ function; Triton: the _..._kernel
    instance: str = ""  # CUDA: regex picking the template instance; Triton: the variant name
    threads: int = 0  # CUDA: threads per CTA as the launcher picks them (Triton: num_warps * 32)
    dynamic_smem: int = 0  # CUDA: dynamic shared memory per CTA the launcher asks for
    budget: str = ""  # key of BUDGETS
    loops: tuple = ()
    note: str = ""


def _dfloat_dynamic_smem() -> int:
    # Tables (16 KB multi-symbol + 8 KB single) and per group a scan scratch of 144 B and a staging
    # buffer: 128 windows of 256 bits at ~10.7 bits/weight hold ~3060 symbols, x 1.125 + 64 + 16
    # rounded to 16 bytes: 3520 B. csrc/cuda/dfloat.cu, make_plan. One group per CTA (its minimum).
    return 4096 * 4 + 4096 * 2 + 144 + 3520


# dfloat: a 12-bit peek yields up to 3 whole codes (csrc/cuda/dfloat.cu, multi_entry); trained bf16
# exponents average ~2.7 bits, so most peeks yield 3: taking 3 makes the decode loops' cost a
# lower bound. Both passes (count, then decode and stage) run the same loop over every code.
DFLOAT_PEEK = r"const uint32_t e = t\.multi\[c\.peek\(\)\];"
DFLOAT_COUNT = Loop((DFLOAT_PEEK, r"count = decode_window\(tables, c, bad, \[\]"), 3,
                    "pass 1 (count): up to 3 codes per 12-bit peek", file="csrc/cuda/dfloat.cu")
DFLOAT_STAGE = Loop((DFLOAT_PEEK, r"decode_window\(tables, c, bad, \[&\]"), 3,
                    "pass 2 (decode, stage in shared memory): up to 3 symbols per peek",
                    cold=(r"for \(int q = 0; q < static_cast<int>\(k\); \+\+q\)",
                          (r"const uint32_t symbol = \(symbols >> \(8 \* q\)\) & 0xFFu;", r"sink\.overflow\(i0")))
# The staged symbols merge with their raw bytes in chunks of 16 output bytes per thread: kVec = 8
# bf16 elements; the per-element path serves only a block's first and last partial chunk.
DFLOAT_TAIL = (r"for \(int e = 0; e < (V|VEC); \+\+e\) \{", r"if \(i >= lo && i < hi\) (out\[i\]|add_one)")
# int8 GEMV (bf16, MT = 1 batch row, CH = 8): per iteration a lane takes U = 4 chunks of CH = 8
# int8 weights in each of R = 2 rows.
INT8_GEMV_WEIGHTS = 4 * 8 * 2
# codebook GEMV (2x8, groups of 8): per round a warp takes kRound = 4 * kRun = 32 units of 8 input
# features for kGemvTiles = 2 n8 tiles of rows: 32 * 8 * 16 = 4096 weights, 128 per thread.
CODEBOOK_GEMV_WEIGHTS = 32 * 8 * 16 // 32
# kv split kernel (4 warps, one query row each: a KV head's 4 query heads; D = 128, 4 bits: P = 2
# codes per byte). The budget's unit is one cached key or value element; keys and values are half
# each, so a loop over keys costs I / (its keys per iteration) / 2 per cached element.
KV_LOOPS = (
    # Word-wise staging (the kernel's path for groups of 64): one 32-bit word of codes per
    # iteration, its 32 / bits codes stored one by one (keys) or as float4s (values). The loop is
    # instantiated for 2, 4 and 8 bits; the largest copy is counted and the probe (the stores of
    # one source iteration) scales its elements to that copy's codes per word.
    Loop(r"for \(int e = threadIdx\.x; e < \(D << kShift\); e \+= kThreads\)", 1 * 2,
         "key staging: one word, one key per store (the probe counts the word's stores); keys are half the "
         "elements", probe=(r"k_s\[\(w \* kCodes \+ u\) \* kp \+ d\] = dequant", "STS", 1)),
    Loop(r"for \(int w = lane; w < words; w \+= 32\)", 4 * 2,
         "value staging: one word, four values per float4 store (the probe counts the word's stores); values "
         "are half the elements", probe=(r"out\[u / 4\] = make_float4", "STS", 1)),
    Loop(r"for \(int d = 0; d < lay\.dq; d \+= 4\)", 4 / 4 * 2,
         "scores: 4 channels of the lane's key per iteration, read by each of the 4 warps (one per "
         "query row): 1 key per thread-iteration; keys are half the elements",
         probe=(r"const float k0 = krow\[d\]", "LDS", 4)),
    Loop(r"for \(int tt = 0; tt < count; \+\+tt\)", 4 / 4 * 2,
         "p v: DCH = 4 channels of one value per lane and iteration, read by each of the 4 warps: 1 "
         "value per thread-iteration; values are half the elements",
         probe=(r"v\[c\] = d < D \? v_s\[", "LDS", 4)),
)


def _triton_tile(*names: str, factor: float = 1):
    """elements per thread and iteration of a Triton loop over a tile: the product of the named
    block sizes (constexprs) times factor, over the threads that share it."""
    def elements(constexprs: dict, threads: int) -> float:
        return math.prod(constexprs[n] for n in names) * factor / threads
    elements.__doc__ = " x ".join(names) + (f" x {factor}" if factor != 1 else "") + " / threads"
    return elements


KERNELS = (
    # ---- CUDA ----
    Kernel("csrc/cuda/bitpack.cu", "pack_bits_kernel", r"ILi4E", 256,
           note="one thread per packed byte; no target (not on a model's path)"),
    Kernel("csrc/cuda/bitpack.cu", "unpack_bits_kernel", r"ILi4E", 256,
           note="one thread per value; no target"),
    Kernel("csrc/cuda/dfloat.cu", "decode_kernel", r"It", 128, _dfloat_dynamic_smem(), "dfloat_decode",
           (DFLOAT_COUNT, DFLOAT_STAGE,
            Loop(r"for \(int64_t a = \(lo & ~int64_t\(V - 1\)\) \+ int64_t\(g\.tid\) \* V; a < hi; a \+= stride\)",
                 8, "consume: one 16-byte chunk, 8 bf16 outputs, per thread and iteration", cold=(DFLOAT_TAIL,))),
           note="128 threads: one group of round_up(128 windows per block, 32); the launcher adds groups "
                "while the occupancy API says more stay resident"),
    Kernel("csrc/cuda/dfloat.cu", "gemv_kernel", r"ILNS1_5DTypeE0ELi8ELi1E", 128, _dfloat_dynamic_smem(),
           "dfloat_gemv",
           (DFLOAT_COUNT, DFLOAT_STAGE,
            Loop(r"for \(int64_t r = 0; r < rounds; \+\+r\)", 8,
                 "consume: a chunk of VEC = 8 weights per thread and round, times x, summed per row; the "
                 "warp's flush runs about once per row it crosses, the per-element path at block edges",
                 cold=(DFLOAT_TAIL, (r"__device__ __forceinline__ void flush\(", r"for \(int b = 0; b < BMAX; \+\+b\) acc\[b\] = 0\.f;"),
                       r"flush\(acc, key, lane\);"))),
           note="bf16, chunks of 8, batch 1"),
    Kernel("csrc/cuda/dfloat.cu", "gemv_epilogue_kernel", r"I.*DTypeE0E", 256, note="thread per output"),
    Kernel("csrc/cuda/int8.cu", "prepass_kernel", r"I.*DTypeE0E", 128, note="bf16; 128 threads when a row needs fewer"),
    Kernel("csrc/cuda/int8.cu", "gemv_kernel", r"ILNS1_5DTypeE0ELi1ELi8E", 256, budget="int8_gemv",
           loops=(Loop(r"for \(int64_t c0 = int64_t\(warp\) \* 32 \+ lane; c0 < chunks; c0 \+= U \* stride\)",
                       INT8_GEMV_WEIGHTS, "U = 4 chunks of CH = 8 weights in each of R = 2 rows"),),
           note="bf16, batch 1, chunks of 8 weights; 8 warps"),
    Kernel("csrc/cuda/codebook.cu", "gemv_kernel", r"INS2_8BF16PathELi8ELi8E", 256, 2 * 256 * 8 * 2, "codebook_gemv",
           (Loop(r"for \(; base < a\.units; base \+= step\)", CODEBOOK_GEMV_WEIGHTS,
                 "kRound = 32 units of 8 features x 16 rows per warp and round = 128 weights per thread"),),
           note="2x8 codebooks, groups of 8, bf16; dynamic smem: the two 256 x 8 bf16 codebooks (one copy)"),
    Kernel("csrc/cuda/codebook.cu", "gemm_kernel", r"INS2_8BF16PathELi8ELi8E", 256, note="dequantize-tile GEMM, batch > 16"),
    Kernel("csrc/cuda/kv.cu", "decode_split_kernel", r"I.*DTypeE0ELi1ELi4E", 128, 4 * (4 * 128 + 32 * 129 + 32 * 128),
           "kv_decode", KV_LOOPS, note="bf16, 4 bits, one query row per warp; dynamic smem: Layout(D=128, QT=4) floats"),
    Kernel("csrc/cuda/kv.cu", "decode_merge_kernel", r"I.*DTypeE0E", 128),
    Kernel("csrc/cuda/kv.cu", "quantize_kernel", r"I.*DTypeE0E", 128),
    # ---- Triton (num_warps from the variant) ----
    Kernel("lowbit.triton_kernels.bitpack", "_pack_bits_kernel", "bits4"),
    Kernel("lowbit.triton_kernels.bitpack", "_unpack_bits_kernel", "bits4"),
    Kernel("lowbit.triton_kernels.dfloat", "_dfloat_decode_kernel", "bf16-wpb128", budget="dfloat_decode"),
    Kernel("lowbit.triton_kernels.dfloat", "_dfloat_gemv_kernel", "bf16-b1-wpb128", budget="dfloat_gemv"),
    Kernel("lowbit.triton_kernels.int8", "_int8_prepass_kernel", "bf16-k4096-t6"),
    Kernel("lowbit.triton_kernels.int8", "_int8_gemv_kernel", "bf16-n4096", budget="int8_gemv",
           loops=(Loop(r"for k0 in range\(0, K, BLOCK_K\):", _triton_tile("BLOCK_N", "BLOCK_K"),
                       "a BLOCK_N x BLOCK_K tile of weights per program and iteration"),)),
    Kernel("lowbit.triton_kernels.int8", "_int8_matmul_kernel", "bf16-m65", budget="int8_gemm",
           loops=(Loop(r"^    for k0 in range\(0, K, BLOCK_K\):", _triton_tile("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                       "BLOCK_M x BLOCK_N x BLOCK_K multiply-adds per program and iteration"),),
           note="M > 64 takes the largest tile, as M >= 2048 does"),
    Kernel("lowbit.triton_kernels.codebook", "_codebook_gemv_kernel", "2x8-g8-bf16-m1", budget="codebook_gemv",
           loops=(Loop(r"for j0 in range\(0, groups, BLOCK_G\):", _triton_tile("BLOCK_N", "BLOCK_G", "G"),
                       "BLOCK_N rows x BLOCK_G groups of G weights per program and iteration"),)),
    Kernel("lowbit.triton_kernels.codebook", "_codebook_matmul_kernel", "2x8-g8-bf16-cbbf16-m65"),
    Kernel("lowbit.triton_kernels.codebook", "_codebook_dequantize_kernel", "2x8-g8-bf16"),
    Kernel("lowbit.triton_kernels.codebook", "_codebook_nearest_kernel", "g8-weights"),
    Kernel("lowbit.triton_kernels.kv", "_kv_decode_attention_kernel", "32-8-128-g64-4bit-bf16", budget="kv_decode",
           loops=(Loop(r"for c in range\(c0, c1\):", _triton_tile("BLOCK_T", "BLOCK_D", factor=2),
                       "a chunk of BLOCK_T tokens x BLOCK_D channels of keys and of values per iteration"),)),
    Kernel("lowbit.triton_kernels.kv", "_kv_quantize_kernel", "keys-64-g64-4bit-bf16"),
)


# ---- tools ---------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home, "bin", "nvcc")
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def find_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: Triton's copy, else CUDA_HOME's, else PATH's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return str(candidate)
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", name).exists():
            return str(Path(home, "bin", name))
    return shutil.which(name)


# ---- SASS: instructions, loops ---------------------------------------------------------------------

_FUNCTION = re.compile(r"^\.text\.(\S+):$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(.*)$')
_INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_BRANCHES = ("BRA", "BRX", "JMP", "JMX")


@dataclasses.dataclass
class Instruction:
    address: int
    text: str
    lines: frozenset  # (file name, line): the instruction's own line and every inlined-at line
    target: int | None = None  # a branch's target, as an index into the function's instructions


@dataclasses.dataclass
class LoopBody:
    start: int  # index of the first instruction
    end: int  # index of the backward branch

    def contains(self, other: "LoopBody") -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)


_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,\s*function_name\s+[^,]+,\s*inlined_at\s+(\d+)\s+(\d+))?")


def ptx_lines(ptx: str) -> dict[int, frozenset]:
    """PTX text -> its line number -> the source lines (file name, line) of the ``.loc`` in force
    there: the line itself and, for inlined code, the line it was inlined at.

    nvdisasm -gp maps each SASS instruction to a PTX line; the PTX's ``.loc`` directives keep the
    inlined functions' own lines, which the cubin's DWARF line table (-g, -gi) mostly folds into the
    kernel's first line."""
    files: dict[str, str] = {}
    for line in ptx.splitlines():
        m = _FILE.match(line)
        if m:
            files[m.group(1)] = Path(m.group(2)).name
    out: dict[int, frozenset] = {}
    current = frozenset()
    for number, line in enumerate(ptx.splitlines(), 1):
        m = _LOC.match(line)
        if m:
            chain = [(files.get(m.group(1), m.group(1)), int(m.group(2)))]
            if m.group(3):
                chain.append((files.get(m.group(3), m.group(3)), int(m.group(4))))
            current = frozenset(chain)
        out[number] = current
    return out


def parse_sass(text: str, ptx: dict[int, frozenset] | None = None) -> dict[str, list[Instruction]]:
    """nvdisasm -c -gp (or -g) output -> function name -> its instructions, branch targets
    resolved; ``ptx``: ptx_lines() of the PTX the cubin was built from, for -gp."""
    functions: dict[str, list[Instruction]] = {}
    labels: dict[str, dict[str, int]] = {}
    current, lines = None, frozenset()
    for raw in text.splitlines():
        m = _FUNCTION.match(raw.strip())
        if m:
            current = m.group(1)
            functions[current], labels[current], lines = [], {}, frozenset()
            continue
        if current is None:
            continue
        m = _LINE.search(raw)
        if m and m.group(1) == ".nv_debug_ptx_txt":
            lines = (ptx or {}).get(int(m.group(2)), frozenset())
            continue
        if m:
            chain = [(Path(m.group(1)).name, int(m.group(2)))]
            chain += [(Path(f).name, int(n)) for f, n in _INLINED.findall(m.group(3))]
            lines = frozenset(chain)
            continue
        m = _LABEL.match(raw.strip())
        if m:
            labels[current][m.group(1)] = len(functions[current])
            continue
        m = _INSTRUCTION.match(raw)
        if m:
            functions[current].append(Instruction(int(m.group(1), 16), m.group(2), lines))
    for name, instructions in functions.items():
        for ins in instructions:
            t = _TARGET.search(ins.text)
            if t and t.group(1) in labels[name]:
                ins.target = labels[name][t.group(1)]  # index of the instruction the label precedes
    return functions


def _opcode(ins: Instruction) -> str:
    words = ins.text.split()
    return words[1] if words[0].startswith("@") else words[0]


def find_loops(instructions: list[Instruction]) -> list[LoopBody]:
    """Backward branches (not to themselves) -> loops [target, last branch to it], by target."""
    ends: dict[int, int] = {}
    for index, ins in enumerate(instructions):
        target = ins.target
        if target is not None and target < index and _opcode(ins).split(".")[0] in _BRANCHES:
            ends[target] = max(ends.get(target, index), index)
    return sorted((LoopBody(s, e) for s, e in ends.items()), key=lambda l: (l.start, l.end))


def counted(instructions: list[Instruction], loop: LoopBody, loops: list[LoopBody],
            cold: frozenset = frozenset()) -> dict:
    """Instructions of ``loop`` outside its nested loops and outside the ``cold`` lines."""
    nested = [l for l in loops if loop.contains(l)]
    inside = set()
    for l in nested:
        inside.update(range(l.start, l.end + 1))
    count = skipped_cold = 0
    for index in range(loop.start, loop.end + 1):
        if index in inside or _opcode(instructions[index]) == "NOP":
            continue
        if instructions[index].lines & cold:
            skipped_cold += 1
            continue
        count += 1
    calls = sum(1 for i in range(loop.start, loop.end + 1) if _opcode(instructions[i]).startswith("CALL"))
    return {"instructions": count, "cold": skipped_cold, "nested_loops": len(nested),
            "nested_instructions": len(inside), "calls": calls}


def _marker_lines(path: Path, pattern) -> set:
    """(file name, line) of the lines of ``path`` matching ``pattern``: a regex, or a (first, last)
    pair of regexes naming the range from the first match of one to the next match of the other."""
    text = path.read_text().splitlines()
    if isinstance(pattern, str):
        found = {(path.name, n) for n, line in enumerate(text, 1) if re.search(pattern, line)}
    else:
        first = next((n for n, line in enumerate(text, 1) if re.search(pattern[0], line)), None)
        last = next((n for n, line in enumerate(text, 1) if first and n >= first and re.search(pattern[1], line)),
                    None)
        found = {(path.name, n) for n in range(first, last + 1)} if first and last else set()
    if not found:
        raise LookupError(f"{path}: no line matches {pattern!r}")
    return found


def hot_loop(instructions: list[Instruction], loop_spec: Loop, path: Path) -> dict:
    """The smallest loop holding an instruction of ``loop_spec.marker``'s line; the largest such
    loop when several disjoint ones do (a loop versioned by the compiler)."""
    loops = find_loops(instructions)
    markers = (loop_spec.marker,) if isinstance(loop_spec.marker, str) else loop_spec.marker
    wanted = [_marker_lines(path, m) for m in markers]
    marks = set().union(*wanted)
    cold = frozenset().union(*(_marker_lines(path, c) for c in loop_spec.cold)) if loop_spec.cold else frozenset()
    holding = [l for l in loops
               if all(any(instructions[i].lines & w for i in range(l.start, l.end + 1)) for w in wanted)]
    if not holding:
        raise LookupError(f"no loop holds a line matching {loop_spec.marker!r} ({sorted(marks)})")
    smallest = [l for l in holding if not any(l.contains(o) for o in holding)]
    results = [counted(instructions, l, loops, cold) for l in smallest]
    best = max(results, key=lambda r: r["instructions"])
    best["copies"] = len(smallest)
    best["unroll"] = 1
    if loop_spec.probe:
        line, opcode, per_iteration = loop_spec.probe
        probe_lines = _marker_lines(path, line)
        l = smallest[results.index(best)]
        seen = sum(1 for i in range(l.start, l.end + 1)
                   if instructions[i].lines & probe_lines and _opcode(instructions[i]).startswith(opcode))
        best["unroll"] = max(1, round(seen / per_iteration))
    best["lines"] = sorted(n for _, n in marks)
    return best


# ---- occupancy -------------------------------------------------------------------------------------


def blocks_per_sm(regs: int, threads: int, smem: int) -> dict:
    """CTAs an H100 SM holds: the least of its thread, CTA, register and shared-memory limits.
    Registers go to warps in units of 256 (8 per thread); every CTA also costs the reserved 1 KB."""
    warps = -(-threads // 32)
    by_threads = THREADS_PER_SM // (warps * 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    limits = {"threads": by_threads, "blocks": BLOCKS_PER_SM, "registers": by_regs, "shared memory": by_smem}
    limiter = min(limits, key=limits.get)
    return {"blocks": limits[limiter], "limited_by": limiter, "warps_per_sm": limits[limiter] * warps}


# ---- compiling: CUDA ---------------------------------------------------------------------------------

_PTXAS_FUNCTION = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_$]+)'?")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> function -> {regs, spills (stores + loads, bytes), stack, smem (static)}."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_FUNCTION.search(line)
        if m:
            current = out.setdefault(m.group(1), {"regs": None, "spills": 0, "stack": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILLS.search(line)
        if m:
            current["stack"], current["spills"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        m = _PTXAS_USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return out


def compile_cuda(source: Path, work: Path, nvcc: str, nvdisasm: str) -> dict:
    """-> {"functions": ptxas figures per function, "sass": function -> instructions, "seconds"}.

    In two steps, nvcc -ptx then ptxas (what nvcc -cubin runs), so that the PTX, whose .loc
    directives give the SASS its source lines, is at hand."""
    start = time.perf_counter()
    ptx, cubin = work / (source.stem + ".ptx"), work / (source.stem + ".cubin")
    steps = [
        [nvcc, "-ptx", str(source), "-o", str(ptx), "-std=c++17", "-O3", "-lineinfo", f"-arch={ARCH}",
         "-I", str(ROOT / "csrc")],
        [str(Path(nvcc).resolve().parent / "ptxas"), f"-arch={ARCH}", "-O3", "-lineinfo", "-v", str(ptx),
         "-o", str(cubin)],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{result.stderr[-4000:]}")
    sass = subprocess.run([nvdisasm, "-c", "-gp", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {"functions": parse_ptxas(result.stderr + result.stdout),
            "sass": parse_sass(sass, ptx_lines(ptx.read_text())), "seconds": time.perf_counter() - start}


# ---- compiling: Triton (in a subprocess: no TRITON_INTERPRET, a fresh cache so that ptxas logs) ----


def _triton_variants(kernels: list[Kernel]) -> list[dict]:
    # The launchers run on meta tensors only: the compiled extension is never needed, so an absent
    # or stale build of it cannot stop the report.
    os.environ.setdefault("LOWBIT_DISABLE_NATIVE", "1")
    spec = importlib.util.spec_from_file_location("_triton_compile_list", ROOT / "tests" / "test_triton_compile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    by_id = {(v.module, v.kernel, v.name): v for v in module.VARIANTS}
    chosen = []
    for k in kernels:
        v = by_id.get((k.source, k.name, k.instance))
        if v is None:
            raise LookupError(f"tests/test_triton_compile.py lists no variant {k.instance!r} of {k.source}.{k.name}")
        chosen.append(dataclasses.asdict(v))
    return chosen


def _triton_worker(specs: str, out: str) -> None:
    """Compiles each variant of ``specs`` for sm_90; writes its ptxas figures and cubin's SASS."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    nvdisasm = find_tool("nvdisasm")
    target = GPUTarget("cuda", 90, 32)
    results = []
    work = Path(out).parent
    for variant in json.loads(Path(specs).read_text()):
        start = time.perf_counter()
        module = importlib.import_module(variant["module"])
        fn = getattr(module, variant["kernel"])
        attrs = {(int(i),): BaseBackend.parse_attr(s) for i, s in variant["attrs"].items()}
        src = ASTSource(fn, signature=variant["signature"], constexprs=variant["constexprs"], attrs=attrs)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=variant["options"])
        cubin = work / f"{variant['kernel']}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", "-gp", str(cubin)], capture_output=True, text=True, check=True).stdout
        figures = parse_ptxas(log.getvalue())
        mine = figures.get(kernel.metadata.name) or next(iter(figures.values()), {})
        results.append({"kernel": variant["kernel"], "name": kernel.metadata.name, "regs": mine.get("regs"),
                        "spills": mine.get("spills"), "smem": kernel.metadata.shared,
                        "threads": kernel.metadata.num_warps * 32, "sass": sass, "ptx": kernel.asm["ptx"],
                        "file": fn.fn.__code__.co_filename, "constexprs": variant["constexprs"], "seconds": time.perf_counter() - start})
    Path(out).write_text(json.dumps(results))


def start_triton(kernels: list[Kernel], work: Path) -> tuple[subprocess.Popen, Path]:
    specs, out = work / "triton_variants.json", work / "triton_results.json"
    specs.write_text(json.dumps(_triton_variants(kernels)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "triton_cache")
    env["LOWBIT_DISABLE_NATIVE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, __file__, "--triton-worker", str(specs), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


# ---- the report ----------------------------------------------------------------------------------------


def _loop_report(instructions, kernel: Kernel, path: Path, constexprs: dict, threads: int) -> dict | None:
    if not kernel.loops:
        return None
    loops, total = [], 0.0
    for spec in kernel.loops:
        where = ROOT / spec.file if spec.file else path
        found = hot_loop(instructions, spec, where)
        elements = spec.elements(constexprs, threads) if callable(spec.elements) else spec.elements
        why = spec.why + (f" ({spec.elements.__doc__} = {elements:g})" if callable(spec.elements) else "")
        elements *= found["unroll"]
        per_element = found["instructions"] * spec.times / elements
        total += per_element
        loops.append({"marker": spec.marker, "file": where.name, **found, "elements_per_iteration": elements,
                      "times": spec.times, "why": why, "instructions_per_element": round(per_element, 4)})
    return {"loops": loops, "instructions_per_element": round(total, 4)}


def _entry(kernel: Kernel, figures: dict, threads: int, dynamic_smem: int, instructions, path: Path,
           constexprs: dict | None = None) -> dict:
    smem = (figures.get("smem") or 0) + dynamic_smem
    entry = {"source": kernel.source, "kernel": kernel.name, "variant": kernel.instance,
             "function": figures.get("function"), "threads": threads, "registers": figures.get("regs"),
             "spills": figures.get("spills"), "stack": figures.get("stack"), "smem": smem,
             "occupancy": blocks_per_sm(figures.get("regs") or 1, threads, smem), "note": kernel.note}
    hot = _loop_report(instructions, kernel, path, constexprs or {}, threads)
    if hot:
        entry.update(hot)
    if kernel.budget:
        b = BUDGETS[kernel.budget]
        entry["budget"] = {"target": b.target, "unit": b.unit, "elements_per_s": b.rate,
                           "instructions_per_element": round(b.instructions, 4), "derivation": b.derivation}
        if hot:
            ratio = hot["instructions_per_element"] / b.instructions
            entry["verdict"] = "within budget" if ratio <= 1 else f"over by {ratio:.2f}x"
            entry["over_by"] = round(ratio, 3)
    return entry


def run(kernels=KERNELS, jobs: int | None = None) -> dict:
    nvcc, nvdisasm = _nvcc(), find_tool("nvdisasm")
    missing = [name for name, tool in (("nvcc", nvcc), ("nvdisasm", nvdisasm)) if tool is None]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found (CUDA_HOME, PATH, or Triton's wheel)")
    cuda = [k for k in kernels if k.source.endswith(".cu")]
    triton_kernels = [k for k in kernels if not k.source.endswith(".cu")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-static-") as tmp:
        work = Path(tmp)
        proc = out = None
        if triton_kernels:
            proc, out = start_triton(triton_kernels, work)
        # The longest compile (the largest file) first, so that it never starts last.
        sources = sorted({ROOT / k.source for k in cuda}, key=lambda p: -p.stat().st_size)
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            compiled = dict(zip(sources, pool.map(lambda s: compile_cuda(s, work, nvcc, nvdisasm), sources)))
        entries = []
        for k in cuda:
            c = compiled[ROOT / k.source]
            pattern = re.compile(rf"\d{re.escape(k.name)}{k.instance}")
            names = sorted(n for n in c["functions"] if pattern.search(n))
            if not names:
                raise LookupError(f"{k.source}: no compiled function matches {k.name} {k.instance!r}")
            figures = {**c["functions"][names[0]], "function": names[0]}
            entries.append(_entry(k, figures, k.threads, k.dynamic_smem, c["sass"].get(names[0], []), ROOT / k.source))
        if proc is not None:
            log, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"the Triton compiles failed:\n{log[-4000:]}")
            for k, r in zip(triton_kernels, json.loads(out.read_text())):
                sass = parse_sass(r["sass"], ptx_lines(r["ptx"]))
                figures = {"regs": r["regs"], "spills": r["spills"], "smem": r["smem"], "function": r["name"]}
                entries.append(_entry(k, figures, r["threads"], 0, sass.get(r["name"], []), Path(r["file"]),
                                      r["constexprs"]))
        functions = {str(s.relative_to(ROOT)): c["functions"] for s, c in compiled.items()}
    return {
        "kind": "static",
        "arch": ARCH,
        "date": datetime.date.today().isoformat(),
        "machine": {"sms": SMS, "schedulers_per_sm": SCHEDULERS_PER_SM, "clock_hz": CLOCK_HZ,
                    "issue_rate_warp_instructions_per_s": ISSUE_RATE, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                    "regs_per_sm": REGS_PER_SM, "smem_per_sm": SMEM_PER_SM, "threads_per_sm": THREADS_PER_SM,
                    "blocks_per_sm": BLOCKS_PER_SM},
        "budget_formula": "per-thread instructions per element <= 32 * issue_rate / elements_per_s",
        "tools": {"nvcc": nvcc, "nvdisasm": nvdisasm, "nvcc_version": _version(nvcc)},
        "seconds": round(time.perf_counter() - start, 1),
        "kernels": entries,
        "cuda_functions": functions,
        "estimate": "static figures: until a GPU measures these kernels, GPU speeds are estimates from this report",
    }


def _version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else out.strip().splitlines()[-1:]


def table(report: dict) -> str:
    head = ("kernel", "source", "regs", "spills", "smem", "blocks/SM", "instr/elem", "budget", "verdict")
    rows = []
    for e in report["kernels"]:
        ipe = e.get("instructions_per_element")
        b = e.get("budget", {})
        rows.append((e["kernel"] + (f" [{e['variant']}]" if e["source"].startswith("lowbit") else ""),
                     Path(e["source"]).name if e["source"].endswith(".cu") else e["source"].rsplit(".", 1)[-1] + ".py",
                     str(e["registers"]), str(e["spills"]), str(e["smem"]),
                     f"{e['occupancy']['blocks']} ({e['occupancy']['limited_by']})",
                     "-" if ipe is None else f"{ipe:.3g}/{b.get('unit', 'element')}",
                     "-" if not b else f"{b['instructions_per_element']:.3g}",
                     e.get("verdict", "-")))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def list_loops(pattern: str) -> None:
    """--loops REGEX: every loop of the CUDA functions matching REGEX, with its source lines, to
    choose the markers of HOT_LOOPS."""
    nvcc, nvdisasm = _nvcc(), find_tool("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted({k.source for k in KERNELS if k.source.endswith(".cu")}):
            c = compile_cuda(ROOT / source, Path(tmp), nvcc, nvdisasm)
            for name, instructions in c["sass"].items():
                if not re.search(pattern, name):
                    continue
                loops = find_loops(instructions)
                print(f"{source} {name}: {len(instructions)} instructions, {len(loops)} loops")
                for l in loops:
                    own = sorted({n for i in range(l.start, l.end + 1) for f, n in instructions[i].lines
                                  if f == Path(source).name or f.endswith(".h")})
                    r = counted(instructions, l, loops)
                    print(f"   [{l.start}, {l.end}] {r['instructions']} (+{r['nested_instructions']} nested) "
                          f"lines {own[:40]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--only", metavar="REGEX", help="only the kernels whose source:name matches REGEX")
    parser.add_argument("--jobs", type=int, help="parallel nvcc compiles (default: the cores)")
    parser.add_argument("--loops", metavar="REGEX", help="list the loops of the CUDA functions matching REGEX")
    parser.add_argument("--triton-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.triton_worker:
        _triton_worker(*args.triton_worker)
        return 0
    if args.loops:
        list_loops(args.loops)
        return 0
    kernels = [k for k in KERNELS if not args.only or re.search(args.only, f"{k.source}:{k.name}")]
    report = run(kernels, jobs=args.jobs)
    print(table(report))
    print(f"\n{report['seconds']} s; budgets: {report['budget_formula']}; {report['estimate']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
