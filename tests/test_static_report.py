"""bench/static.py: the static GPU report (registers, occupancy, hot-loop SASS per element).

The loop counting is checked on kernels compiled here whose SASS is known in outline: a grid-stride
loop of one fused multiply-add per element, and the same loop doing the work twice per element,
which must count more instructions per element. Then the tool runs end to end on one CUDA and one
Triton kernel. Skipped, with the reason, when nvcc or nvdisasm (shipped in Triton's wheel, or in a
CUDA toolkit) is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lowbit_bench_static", ROOT / "bench" / "static.py")
static = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = static
_spec.loader.exec_module(static)

LOOP_SOURCE = r"""
extern "C" __global__ void once(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
#pragma unroll 1
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {  // LOOP
    y[i] = a * x[i] + y[i];
  }
}
extern "C" __global__ void twice(const float* __restrict__ x, float* __restrict__ y, const float* __restrict__ w,
                                 float* __restrict__ z, float a, int n) {
#pragma unroll 1
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {  // LOOP
    y[i] = a * x[i] + y[i];
    z[i] = a * w[i] + z[i];
  }
}
"""


def _tools():
    nvcc, nvdisasm = static._nvcc(), static.find_tool("nvdisasm")
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if nvdisasm is None:
        pytest.skip("nvdisasm not found (it ships in Triton's wheel and in CUDA toolkits)")
    return nvcc, nvdisasm


@pytest.fixture(scope="module")
def loops_compiled(tmp_path_factory):
    nvcc, nvdisasm = _tools()
    work = tmp_path_factory.mktemp("static_loops")
    source = work / "loops.cu"
    source.write_text(LOOP_SOURCE)
    return source, static.compile_cuda(source, work, nvcc, nvdisasm)


def _per_element(compiled, name):
    source, c = compiled
    loop = static.Loop(r"// LOOP", 1, "one element per iteration", file=str(source))
    return static.hot_loop(c["sass"][name], loop, source)


def test_one_loop_found_and_counted(loops_compiled):
    _, c = loops_compiled
    instructions = c["sass"]["once"]
    assert len(static.find_loops(instructions)) == 1
    once = _per_element(loops_compiled, "once")
    # Two loads, an FFMA, a store, the index step, compare and branch, and address arithmetic.
    assert 5 <= once["instructions"] <= 16, once
    assert once["nested_loops"] == 0 and once["copies"] == 1
    assert c["functions"]["once"]["spills"] == 0 and c["functions"]["once"]["regs"] > 0


def test_doubled_body_counts_more(loops_compiled):
    once = _per_element(loops_compiled, "once")["instructions"]
    twice = _per_element(loops_compiled, "twice")["instructions"]
    assert twice >= once + 4, (once, twice)


def test_cold_lines_are_not_counted(loops_compiled):
    source, c = loops_compiled
    loop = static.Loop(r"// LOOP", 1, "", file=str(source), cold=(r"z\[i\] = a \* w\[i\] \+ z\[i\];",))
    twice_without_z = static.hot_loop(c["sass"]["twice"], loop, source)
    assert twice_without_z["cold"] > 0
    assert twice_without_z["instructions"] < _per_element(loops_compiled, "twice")["instructions"]


def test_occupancy():
    # 256 threads at 32 registers: 8 CTAs by threads; at 128 registers, 2 by registers.
    assert static.blocks_per_sm(32, 256, 0) == {"blocks": 8, "limited_by": "threads", "warps_per_sm": 64}
    assert static.blocks_per_sm(128, 256, 0)["blocks"] == 2
    assert static.blocks_per_sm(32, 128, 100 * 1024) == {"blocks": 2, "limited_by": "shared memory",
                                                         "warps_per_sm": 8}


def test_budget_formula():
    # A memory-bound kernel at 3.35 TB/s may issue 8.85 per-thread instructions per byte it reads.
    assert static.budget_for_rate(static.HBM_BYTES_PER_S / 1) == pytest.approx(8.85, abs=0.01)
    assert static.BUDGETS["dfloat_gemv"].instructions == pytest.approx(17.7, abs=0.05)


def test_report_on_one_cuda_and_one_triton_kernel(tmp_path):
    """The command as users run it, on one kernel of each kind (a subprocess: Triton compiles
    offline only outside the interpreter that conftest turns on)."""
    _tools()
    pytest.importorskip("triton")
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "static.py"), "--out", str(out),
           "--only", r"^(csrc/cuda/int8\.cu:gemv_kernel|lowbit\.triton_kernels\.int8:_int8_gemv_kernel)$"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [e["kernel"] for e in report["kernels"]] == ["gemv_kernel", "_int8_gemv_kernel"]
    for e in report["kernels"]:
        assert e["registers"] > 0 and e["spills"] is not None and e["occupancy"]["blocks"] >= 1
        assert e["instructions_per_element"] > 0 and e["budget"]["unit"] == "weight"
        assert e["verdict"].startswith(("within", "over"))
    assert "gemv_kernel" in result.stdout and "budget" in result.stdout
    print("\n" + result.stdout)


def test_committed_report_lists_every_kernel():
    committed = sorted((ROOT / "bench" / "results").glob("*_static-sm90a.json"))
    assert committed, "no bench/results/<date>_static-sm90a.json committed"
    report = json.loads(committed[-1].read_text())
    names = {(e["source"], e["kernel"]) for e in report["kernels"]}
    assert names == {(k.source, k.name) for k in static.KERNELS}, "the committed report is out of date"
