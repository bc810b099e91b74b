"""The backend-selection rule (lowbit.backend) and life without the compiled extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit.errors import BackendUnavailableError

from conftest import skip_unless_available


def test_auto_prefers_the_native_cpu_kernel():
    skip_unless_available("cpu", "cpu")
    assert lowbit.backend.resolve("pack_bits", "auto", torch.device("cpu")) == "cpu"


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    assert lowbit.backend.resolve("pack_bits", "auto", torch.device("cpu")) in ("cpu", "reference")


def test_environment_variable_is_the_default(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    assert lowbit.backend.requested(None) == "reference"
    assert lowbit.backend.requested("cpu") == "cpu", "the argument wins over the environment"
    monkeypatch.setenv("LOWBIT_BACKEND", "Reference ")
    assert lowbit.backend.requested(None) == "reference"


def test_environment_variable_reaches_the_kernel(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    assert lowbit.ops.op("pack_bits", None, "cpu") is torch.ops.lowbit.pack_bits_reference.default
    monkeypatch.delenv("LOWBIT_BACKEND")
    skip_unless_available("cpu", "cpu")
    assert lowbit.ops.op("pack_bits", None, "cpu") is torch.ops.lowbit.pack_bits.default


def test_every_op_has_one_registered_op_per_backend():
    """A backend name means the same on every op: lowbit::<op> is native, <op>_triton Triton,
    <op>_reference the reference; each has the same schema."""
    for name, spec in lowbit.ops.definitions().items():
        native = getattr(torch.ops.lowbit, name).default._schema
        reference = getattr(torch.ops.lowbit, f"{name}_reference").default._schema
        assert str(reference).replace(f"{name}_reference", name) == str(native)
        assert set(lowbit.ops.implementations(name)) <= {"cuda", "triton", "cpu", "reference"}
        if spec.triton:
            assert "triton" in lowbit.ops.implementations(name)


def test_auto_falls_back_where_a_backend_lacks_the_op():
    # dfloat_gemv has no CPU kernel and int8_linear no CUDA one: auto picks the next that has it.
    assert lowbit.ops.resolve("dfloat_gemv", "auto", "cpu") == "reference"
    with pytest.raises(BackendUnavailableError, match="has no 'cpu' implementation"):
        lowbit.ops.resolve("dfloat_gemv", "cpu", "cpu")
    assert "cuda" not in lowbit.ops.implementations("int8_linear")


def test_unknown_backend_names_the_source(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of auto, cuda, triton, cpu, reference; got 'gpu'"):
        lowbit.ops.pack_bits(torch.zeros(3, dtype=torch.uint8), 2, backend="gpu")
    monkeypatch.setenv("LOWBIT_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"LOWBIT_BACKEND must be one of .*; got 'fast'"):
        lowbit.ops.pack_bits(torch.zeros(3, dtype=torch.uint8), 2)


def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises(BackendUnavailableError, match="runs on CUDA tensors, but the input is on cpu"):
        lowbit.ops.pack_bits(torch.zeros(3, dtype=torch.uint8), 2, backend="cuda")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("LOWBIT_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    result = _run(
        """
        import torch, lowbit
        try:
            lowbit.ops.pack_bits(torch.zeros(3, dtype=torch.uint8), 2, backend="triton")
        except lowbit.BackendUnavailableError as e:
            print("ERROR:", e)
        """
    )
    assert "set TRITON_INTERPRET=1" in result.stdout, result.stderr


def test_import_and_fallbacks_without_the_extension():
    result = _run(
        """
        import torch, lowbit
        from lowbit import _native
        assert not _native.status().loaded
        v = torch.arange(10, dtype=torch.uint8)
        # auto falls back to the reference; triton still runs in the interpreter
        auto = lowbit.ops.pack_bits(v, 4)
        tri = lowbit.ops.pack_bits(v, 4, backend="triton")
        assert torch.equal(auto, tri), (auto, tri)
        print("RESOLVED:", lowbit.backend.resolve("pack_bits", "auto", torch.device("cpu")))
        try:
            lowbit.ops.pack_bits(v, 4, backend="cpu")
        except lowbit.BackendUnavailableError as e:
            print("ERROR:", e)
        try:
            torch.ops.lowbit.pack_bits(v, 4)
        except lowbit.BackendUnavailableError as e:
            print("NATIVE:", e)
        """,
        LOWBIT_DISABLE_NATIVE="1",
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr
    assert "RESOLVED: reference" in result.stdout
    assert "needs the compiled extension: disabled by LOWBIT_DISABLE_NATIVE" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout
    assert "NATIVE: lowbit::pack_bits: backend 'cpu' needs the compiled extension" in result.stdout


def test_available_reports_every_backend():
    table = lowbit.backend.available("cpu")
    assert set(table) == {"cuda", "triton", "cpu", "reference"}
    assert table["reference"] is None
    assert "CUDA tensors" in table["cuda"]


def test_modules_resolve_their_ops_once_and_again_when_told(monkeypatch):
    """A module picks its ops when built (not at every call); setting .backend picks them again."""
    skip_unless_available("cpu", "cpu")
    layer = lowbit.nn.Int8Linear.from_linear(torch.nn.Linear(16, 8))
    assert layer._linear is torch.ops.lowbit.int8_linear.default
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    x = torch.randn(2, 16)
    layer(x)
    assert layer._linear is torch.ops.lowbit.int8_linear.default, "a forward must not resolve again"
    layer.backend = "reference"
    assert layer._linear is torch.ops.lowbit.int8_linear_reference.default
    fresh = lowbit.nn.DFloatLinear.from_linear(torch.nn.Linear(16, 8))
    assert fresh._decode is torch.ops.lowbit.dfloat_decode_reference.default, "built under LOWBIT_BACKEND"
