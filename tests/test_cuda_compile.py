"""Every CUDA source compiles with nvcc for sm_80 and sm_90a; the CUDA torch glue parses.

The kernels in csrc/cuda/ include no torch headers, so their check needs nvcc only, not a CUDA build
of torch. It is skipped (with the reason shown) only when nvcc is absent.

The glue (csrc/bindings_cuda.cpp, or csrc/bindings/*_cuda.cpp once split per family) includes
torch's c10/cuda headers. The CPU torch wheel ships those but not the header CMake generates for a
CUDA build, so a stub of it (and of nothing that exists) sits in a temporary directory; the glue is
then checked with ``g++ -fsyntax-only`` against torch's headers and the CUDA toolkit's. It is
skipped only when no C++ compiler or no CUDA headers are found.
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
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


# ---- the CUDA torch glue ---------------------------------------------------------------------

GLUE_SOURCES = sorted({*ROOT.glob("csrc/bindings_cuda.cpp"), *ROOT.glob("csrc/bindings/*_cuda.cpp")})
# Headers a CUDA build of torch generates and the CPU wheel lacks: path -> content of the stub,
# as a CUDA build of torch (shared libraries) generates it.
STUB_HEADERS = {"c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"}


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("c++")


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory: CUDA_HOME / CUDA_PATH, torch's guess, nvcc's, /usr/local/cuda."""
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME]
    nvcc = _nvcc()
    if nvcc is not None:
        homes.append(Path(nvcc).resolve().parents[1])  # nvcc may also be a wrapper outside the toolkit
    homes.append("/usr/local/cuda")
    for home in homes:
        if home and Path(home, "include", "cuda_runtime_api.h").exists():
            return Path(home, "include")
    return None


def _syntax_check(source: Path, cxx: str, includes: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    # -std=c++20 as torch.utils.cpp_extension builds the extension; torch's and CUDA's headers
    # as system headers, so that -Wall -Werror judges the glue only.
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-DLOWBIT_WITH_CUDA",
           "-I", str(ROOT / "csrc"), *(f"-isystem{d}" for d in includes), str(source)]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def glue_checks(tmp_path_factory):
    """source -> (command, its result): every glue file checked at once, one per core."""
    from torch.utils.cpp_extension import include_paths

    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler found (set CXX or install g++)")
    cuda = _cuda_include()
    if cuda is None:
        pytest.skip("no CUDA headers found (set CUDA_HOME to a CUDA toolkit)")
    torch_includes = include_paths()
    stubs = tmp_path_factory.mktemp("torch_cuda_stubs")
    for header, text in STUB_HEADERS.items():
        if not any(Path(d, header).exists() for d in torch_includes):
            (stubs / header).parent.mkdir(parents=True, exist_ok=True)
            (stubs / header).write_text(text)
    includes = [*torch_includes, str(cuda), str(stubs)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda source: _syntax_check(source, cxx, includes), GLUE_SOURCES)
        return dict(zip(GLUE_SOURCES, results))


def test_there_is_cuda_glue():
    assert GLUE_SOURCES, "neither csrc/bindings_cuda.cpp nor csrc/bindings/*_cuda.cpp exists"


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: str(p.relative_to(ROOT / "csrc")))
def test_cuda_glue_compiles(source, glue_checks):
    cmd, result = glue_checks[source]
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
