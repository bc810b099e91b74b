"""Benchmark harness: timing, device facts, and the result records written to bench/results/.

Timing: pytest-benchmark's ``benchmark.pedantic`` runs a callable that calls the op ``inner``
times and then synchronizes the device, so asynchronous GPU work is inside the measured time; the
per-call time is the round median divided by ``inner``. Each benchmark runs ours and the baseline
(torch's dense op of the same shape and dtype) in the same process; conftest.py pairs them.

A record (one per benchmarked callable), as written to the results JSON:
    op, case, backend ("baseline" for torch's op), shapes, dtype, device, median_s,
    gbps (bytes moved / median), tflops (flops / median, when the op does arithmetic),
    pct_peak (of the device's memory bandwidth or matrix peak, when known),
    and after pairing: baseline_median_s, speedup (baseline median / ours).
The baseline of a case is the record whose backend is "baseline"; ``extra={"name": ...}`` says
what it ran (torch's dense op by default, or another library such as ZipNN).
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import asdict, dataclass, field

import torch

RECORDS: list[dict] = []
FACTS: list[dict] = []  # measurements that are not timings (bits per weight, error), written as "facts"

# Vendor peaks per device name pattern: memory GB/s, dense bf16 TFLOP/s, dense int8 TOP/s.
GPU_PEAKS = [
    (r"H200", {"gbps": 4800.0, "bf16_tflops": 989.0, "int8_tops": 1979.0}),
    (r"H100.*NVL", {"gbps": 3900.0, "bf16_tflops": 835.0, "int8_tops": 1670.0}),
    (r"H100.*PCIe", {"gbps": 2000.0, "bf16_tflops": 756.0, "int8_tops": 1513.0}),
    (r"H100", {"gbps": 3350.0, "bf16_tflops": 989.0, "int8_tops": 1979.0}),
    (r"A100.*80GB", {"gbps": 2039.0, "bf16_tflops": 312.0, "int8_tops": 624.0}),
    (r"A100", {"gbps": 1555.0, "bf16_tflops": 312.0, "int8_tops": 624.0}),
    (r"L40S", {"gbps": 864.0, "bf16_tflops": 362.0, "int8_tops": 733.0}),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def device_peaks(device: torch.device) -> dict:
    """Vendor peaks of a known GPU; empty for CPUs and unknown devices (pct_peak is then null)."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return dict(peaks)
    return {}


def versions() -> dict:
    import lowbit

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "lowbit": lowbit.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """What one benchmarked callable does, for the record."""

    op: str
    case: str  # identifies the problem: ours and its baseline share it
    backend: str
    shapes: dict
    dtype: str
    bytes_moved: int  # bytes the op must read and write at least
    flops: int = 0
    peak_kind: str = "gbps"  # which device peak pct_peak refers to: gbps, bf16_tflops, int8_tops
    extra: dict = field(default_factory=dict)


def measure(benchmark, case: Case, fn, device: torch.device, min_round_s: float = 2e-3,
            rounds: int = 20, warmup_rounds: int = 2) -> dict:
    """Time ``fn`` (no arguments) with pytest-benchmark and record the result."""
    import time

    fn()
    synchronize(device)
    # Enough calls per round that a round takes about min_round_s (launch overhead amortized).
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, min(1000, int(min_round_s / once)))

    def run_round():
        for _ in range(inner):
            fn()
        synchronize(device)

    benchmark.pedantic(run_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    median = benchmark.stats.stats.median / inner
    peaks = device_peaks(device)
    gbps = case.bytes_moved / median / 1e9
    tflops = case.flops / median / 1e12 if case.flops else None
    achieved = gbps if case.peak_kind == "gbps" else tflops
    peak = peaks.get(case.peak_kind)
    record = {
        **{k: v for k, v in asdict(case).items() if k != "extra"},
        **case.extra,
        "device": device_name(device),
        "median_s": median,
        "calls_per_round": inner,
        "rounds": rounds,
        "gbps": gbps,
        "tflops": tflops,
        "peak": peak,
        "pct_peak": (100.0 * achieved / peak) if (peak and achieved is not None) else None,
    }
    benchmark.extra_info.update(record)
    RECORDS.append(record)
    return record


def measure_interleaved(benchmark, entries: list[tuple[Case, object]], device: torch.device,
                        rounds: int = 15) -> list[dict]:
    """Time several callables in alternating order, one call each per round, and record each.

    For side-by-side comparisons on a machine whose load drifts (shared CPUs): every round times
    every entry, so a slow spell hits all of them alike. pytest-benchmark times the whole round.
    """
    import statistics
    import time

    times: list[list[float]] = [[] for _ in entries]

    def one_round():
        order = range(len(entries)) if len(times[0]) % 2 == 0 else reversed(range(len(entries)))
        for k in order:
            synchronize(device)
            start = time.perf_counter()
            entries[k][1]()
            synchronize(device)
            times[k].append(time.perf_counter() - start)

    for _, fn in entries:  # warm-up
        fn()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    records = []
    for (case, _), samples in zip(entries, times):
        median = statistics.median(samples)
        record = {
            **{k: v for k, v in asdict(case).items() if k != "extra"},
            **case.extra,
            "device": device_name(device),
            "median_s": median,
            "calls_per_round": 1,
            "rounds": len(samples),
            "interleaved": True,
            "gbps": case.bytes_moved / median / 1e9,
            "tflops": case.flops / median / 1e12 if case.flops else None,
            "peak": None,
            "pct_peak": None,
        }
        RECORDS.append(record)
        records.append(record)
    return records


def pair_with_baselines(records: list[dict]) -> list[dict]:
    """Add baseline_median_s and speedup (baseline / ours) to every non-baseline record."""
    baselines = {r["case"]: r for r in records if r["backend"] == "baseline"}
    for r in records:
        base = baselines.get(r["case"])
        if base is not None and r["backend"] != "baseline":
            r["baseline_median_s"] = base["median_s"]
            r["speedup"] = base["median_s"] / r["median_s"]
    return records
