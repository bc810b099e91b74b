"""setup.py's choice between the CUDA and the CPU-only build (_cuda_reason_off), with fake torch,
environment and toolkits, so that every case runs on a machine without CUDA."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fake nvcc programs are shell scripts")


@pytest.fixture(scope="module")
def setup_py():
    # Imported under another name than __main__, so setup() does not run.
    spec = importlib.util.spec_from_file_location("lowbit_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_torch(cuda="13.0", cuda_home=None):
    return SimpleNamespace(__version__="2.13.0", version=SimpleNamespace(cuda=cuda),
                           utils=SimpleNamespace(cpp_extension=SimpleNamespace(CUDA_HOME=cuda_home)))


def fake_nvcc(folder: Path, script: str) -> Path:
    path = folder / "bin" / "nvcc"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def toolkit(folder: Path, release: str = "13.0") -> Path:
    fake_nvcc(folder, f'echo "Cuda compilation tools, release {release}, V{release}.88"')
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime_api.h").write_text("")
    return folder


def which_on(path: str):
    return lambda name: shutil.which(name, path=path)


def test_a_usable_toolkit_builds_cuda(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda")
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=str(home)), {}, which_on(str(home / "bin")))
    assert off is None


def test_lowbit_no_cuda_wins_over_a_usable_toolkit(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda")
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=str(home)), {"LOWBIT_NO_CUDA": "1"}, which_on(""))
    assert off == "LOWBIT_NO_CUDA is set"


def test_cpu_torch(setup_py):
    off = setup_py._cuda_reason_off(fake_torch(cuda=None), {}, which_on(""))
    assert "CPU build" in off


def test_no_nvcc(setup_py, tmp_path):
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=None), {}, which_on(str(tmp_path)))
    assert "nvcc was not found" in off


def test_cuda_home_without_nvcc(setup_py, tmp_path):
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=str(tmp_path)), {"CUDA_HOME": str(tmp_path)}, which_on(""))
    assert off == f"CUDA_HOME={tmp_path} has no bin/nvcc"


def test_wrapped_nvcc(setup_py, tmp_path):
    # /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc: torch guesses CUDA_HOME=/usr/local.
    real = toolkit(tmp_path / "cuda-13.0")
    wrapper = fake_nvcc(tmp_path / "local", f'exec {real}/bin/nvcc "$@"')
    guessed = str(wrapper.parent.parent)
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=guessed), {}, which_on(str(wrapper.parent)))
    assert f"CUDA_HOME={guessed}" in off and "include/cuda_runtime_api.h" in off
    assert f"nvcc on PATH ({wrapper})" in off and "wrapper" in off


def test_nvcc_that_fails(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda")
    fake_nvcc(home, 'echo "nvcc: cannot load libnvvm.so" >&2; exit 3')
    off = setup_py._cuda_reason_off(fake_torch(cuda_home=str(home)), {}, which_on(""))
    assert off == f"`{home}/bin/nvcc --version` exited with 3: nvcc: cannot load libnvvm.so"


@pytest.mark.parametrize("release", ["12.8", "14.0"])
def test_nvcc_of_another_major_version_than_torch(setup_py, tmp_path, release):
    home = toolkit(tmp_path / "cuda", release=release)
    off = setup_py._cuda_reason_off(fake_torch(cuda="13.0", cuda_home=str(home)), {}, which_on(""))
    assert off == f"nvcc {release} at {home}/bin/nvcc is not CUDA 13.x like torch's CUDA 13.0"


def test_this_machine_gives_a_decision(setup_py):
    # The real torch and environment: whatever the answer, deciding must not raise.
    import torch
    import torch.utils.cpp_extension  # noqa: F401

    off = setup_py._cuda_reason_off(torch, os.environ, shutil.which)
    assert off is None or isinstance(off, str)
