"""Shared test set-up.

Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be set before
Triton compiles anything, so it is set here, before lowbit or Triton is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lowbit  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


BACKENDS_BY_DEVICE = {"cpu": ("reference", "cpu", "triton"), "cuda": ("reference", "triton", "cuda")}


def _backend_params():
    for device, names in BACKENDS_BY_DEVICE.items():
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for name in names:
            yield pytest.param((device, name), marks=marks, id=f"{device}-{name}")


def skip_unless_available(backend: str, device: str) -> None:
    why = lowbit.backend.why_unavailable(backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


def param_id(value) -> str:
    """A test id for a parameter: dtypes without "torch.", shapes as 3x7."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def run_in_cuda_graph(fn):
    """fn() run once eagerly (warm-up), then captured in a CUDA graph and replayed: -> its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.fixture(params=list(_backend_params()))
def backend_device(request):
    """(backend, device) for every backend on every device type, skipped where it cannot run."""
    device, backend = request.param
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device; none is visible")
    skip_unless_available(backend, device)
    return backend, device


def pytest_terminal_summary(terminalreporter):
    """Say in the log whether the nvcc check ran, since CI has no other way to show it."""
    outcomes = {}
    for status in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(status, []):
            if "test_cuda_compile.py::test_nvcc_compiles" in report.nodeid and report.when in ("call", "setup"):
                outcomes[report.nodeid] = status
    if outcomes:
        counts = {s: list(outcomes.values()).count(s) for s in ("passed", "failed", "skipped")}
        terminalreporter.write_line(
            f"nvcc check: {counts['passed']} compiled, {counts['failed']} failed, {counts['skipped']} skipped "
            "(csrc/cuda/*.cu x sm_80, sm_90a)"
        )
