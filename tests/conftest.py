"""Shared test set-up.

Triton kernels run on CPU tensors in Triton's interpreter when no CUDA device is visible:
TRITON_INTERPRET must be set before Triton compiles anything, so it is set here, after torch is
imported (to ask it for a device) and before lowbit or Triton is.

Under CI (``CI=true``) the run fails at its start, with the reason, when the compiled extension
or Triton is missing: the tests that need them would otherwise be skipped, and a green run would
mean nothing. Elsewhere those tests are skipped with the same reason.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lowbit  # noqa: E402
from helpers import param_id  # noqa: E402, F401  (re-exported: test files import it from here)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_in_ci() -> list[str]:
    """What a CI run needs and this environment lacks, each with its reason."""
    missing = []
    native = lowbit._native.status()
    if not native.loaded:
        missing.append(f"the compiled extension lowbit._C is not loaded ({native.error}); {lowbit._native.BUILD_HINT}")
    try:
        import triton  # noqa: F401
    except Exception as exc:
        missing.append(f"Triton is not importable ({type(exc).__name__}: {exc})")
    return missing


def pytest_sessionstart(session):
    if _in_ci():
        missing = _missing_in_ci()
        if missing:
            raise pytest.UsageError(" ".join(("CI is set, but " + "; and ".join(missing)).split()))


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


def _outcomes(terminalreporter, test: str) -> dict:
    """nodeid -> (outcome, report) of every run of ``test`` ("file.py::name"); a test that
    failed or errored in any phase counts as failed."""
    outcomes = {}
    for status in ("passed", "skipped", "failed", "error"):
        for report in terminalreporter.stats.get(status, []):
            if test in report.nodeid and report.when in ("setup", "call"):
                outcomes[report.nodeid] = ("failed" if status == "error" else status, report)
    return outcomes


def _counts(outcomes: dict) -> dict:
    statuses = [status for status, _ in outcomes.values()]
    return {s: statuses.count(s) for s in ("passed", "failed", "skipped")}


def _largest(rows: list[dict], key: str, unit: str = "") -> str:
    """The largest value of ``key`` over ``rows`` and the variant that has it ("?" if unknown)."""
    known = [r for r in rows if r[key] is not None]
    if not known:
        return "?"
    top = max(known, key=lambda r: r[key])
    return f"{top[key]}{unit} [{top['variant']}]" if top[key] else f"0{unit}"


def _triton_lines(outcomes: dict, verbose: bool) -> list[str]:
    """One line per kernel and arch: the largest registers, spills and shared memory over its
    variants, and where they occur; with -v one line per variant."""
    rows = [dict(props) for _, report in outcomes.values() for key, props in report.user_properties
            if key == "triton_compile"]
    lines = []
    if verbose:
        for r in rows:
            lines.append(f"  {r['kernel']}[{r['variant']}] {r['arch']}: {r['regs']} regs, "
                         f"{r['spills']} B spilled, {r['smem']} B smem")
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), group in sorted(groups.items()):
        lines.append(f"  {kernel} {arch}: regs {_largest(group, 'regs')}, spills {_largest(group, 'spills', ' B')}, "
                     f"smem {_largest(group, 'smem', ' B')} (largest of {len(group)} variants)")
    return lines


def pytest_terminal_summary(terminalreporter):
    """Say in the log whether the compile checks ran and what they found, since CI has no other
    way to show it."""
    nvcc = _outcomes(terminalreporter, "test_cuda_compile.py::test_nvcc_compiles")
    glue = _outcomes(terminalreporter, "test_cuda_compile.py::test_cuda_glue_compiles")
    if nvcc or glue:
        n, g = _counts(nvcc), _counts(glue)
        terminalreporter.write_line(
            f"nvcc check: {n['passed']} compiled, {n['failed']} failed, {n['skipped']} skipped "
            f"(csrc/cuda/*.cu x sm_80, sm_90a); CUDA glue syntax check: {g['passed']} passed, "
            f"{g['failed']} failed, {g['skipped']} skipped (g++ -fsyntax-only)"
        )
    triton = _outcomes(terminalreporter, "test_triton_compile.py::test_triton_compiles")
    if triton:
        t = _counts(triton)
        seconds = [props["seconds"] for _, report in triton.values() for key, props in report.user_properties
                   if key == "triton_compile"]
        took = f"; {seconds[0]:.0f} s" if seconds else ""
        terminalreporter.write_line(
            f"triton check: {t['passed']} compiled, {t['failed']} failed, {t['skipped']} skipped "
            f"(triton_kernels/*.py _..._kernel variants x sm_80, sm_90{took})"
        )
        for line in _triton_lines(triton, terminalreporter.verbosity > 0):
            terminalreporter.write_line(line)
