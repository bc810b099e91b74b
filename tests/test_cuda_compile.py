"""Every CUDA source compiles with nvcc for sm_80 and sm_90a.

The kernels in csrc/cuda/ include no torch headers, so this check needs nvcc only, not a CUDA build
of torch. It is skipped (with the reason shown) only when nvcc is absent.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90a")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home, "bin", "nvcc")
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/ holds no .cu files"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    compute = arch.replace("sm_", "compute_")
    cmd = [
        nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
        "-std=c++17", "-O3", f"-gencode=arch={compute},code={arch}",
        "-I", str(ROOT / "csrc"), "-Werror", "all-warnings",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    print(f"nvcc {arch} {source.name}: ok")
