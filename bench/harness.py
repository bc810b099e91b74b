"""Benchmark harness: timing, device facts, and the result records written to bench/results/.

Timing on a CPU: pytest-benchmark's ``benchmark.pedantic`` runs a callable that calls the op
``inner`` times; the per-call time is the round median divided by ``inner``.

Timing on a GPU (``measure`` with a CUDA device): the case's weights (``weights=``, the tensors or
modules the op reads that a model would hold) are copied until the copies together exceed
``L2_MULTIPLE`` times the device's L2 cache, so every call reads its weight from device memory as
in a model's forward pass, not from L2. One CUDA graph calls the op once on each copy in turn; the
graph is replayed ``rounds`` times between CUDA events, and the median replay over the number of
calls is the per-call time (``median_s``, no launch overhead). The same calls run eagerly between
events give ``eager_median_s`` (launch overhead and any host synchronization included), reported
apart. An op that cannot be captured is timed eagerly only (``timing`` says which, ``graph_error``
why).

Each benchmark runs ours and the baseline (torch's dense op of the same shape and dtype, cuBLAS
``F.linear`` for products) in the same process, over the same number of copies; conftest.py pairs
them.

A record (one per benchmarked callable), as written to the results JSON:
    op, case, backend ("baseline" for torch's op), shapes, dtype, device, median_s, median_us,
    gbps (bytes moved / median), tflops (flops / median, when the op does arithmetic),
    pct_peak (of the device's memory bandwidth or matrix peak, when known),
    on a GPU: timing, eager_median_s, eager_median_us, copies, copy_bytes, rotation_bytes, l2_bytes,
    l2_defeated, calls_per_replay,
    and after pairing: baseline_median_s, speedup (baseline median / ours), eager_speedup.
The baseline of a case is the record whose backend is "baseline"; ``extra={"name": ...}`` says
what it ran (torch's dense op by default, or another library such as ZipNN).
"""

from __future__ import annotations

import copy
import functools
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

RECORDS: list[dict] = []
FACTS: list[dict] = []  # measurements that are not timings (bits per weight, error), written as "facts"

# GPU timing: the weight copies together exceed this many L2 caches (so a replay never finds a
# weight still in L2), with at most MAX_COPIES copies (tiny cases cannot defeat L2 then, and their
# records say so) and at least MIN_CALLS_PER_REPLAY calls per graph replay.
L2_MULTIPLE = 4
MAX_COPIES = 64
MIN_CALLS_PER_REPLAY = 8
DEFAULT_L2_BYTES = 50 * 2**20  # H100/H200, when the device does not say

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


def device_facts(device: torch.device) -> dict:
    """What a result depends on besides the device's name: on a GPU its capability, multiprocessors,
    L2 and memory; on a CPU its vector ISA (CPU paths are chosen per ISA, so every CPU figure names it)."""
    if device.type != "cuda":
        return {"isa": cpu_isa(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": l2_bytes(device),
        "memory_bytes": props.total_memory,
    }


# The x86 flags that decide which CPU kernels can run, in /proc/cpuinfo's names.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa() -> list[str]:
    """The ISA_FLAGS this CPU has (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


@functools.lru_cache(maxsize=None)
def l2_bytes(device: torch.device) -> int:
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return int(size) if size else DEFAULT_L2_BYTES


def timing_method(device: torch.device) -> str:
    """How this device's records were timed, in a sentence for the results file."""
    if device.type == "cuda":
        return (f"CUDA graph replays over weight copies totalling >= {L2_MULTIPLE}x L2 (at most {MAX_COPIES} "
                "copies; l2_defeated per record), timed with CUDA events, median per call; eager_median_s: "
                "the same calls launched eagerly")
    return "pytest-benchmark rounds (or alternating rounds, interleaved) timed on the host clock, median per call"


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


def measure(benchmark, case: Case, fn, device: torch.device, *, weights: tuple = (), min_round_s: float = 2e-3,
            rounds: int = 20, warmup_rounds: int = 2) -> dict:
    """Time ``fn(*weights)`` and record the result.

    weights: the tensors or modules ``fn`` reads that a model holds (a weight, a compressed
    stream, a module). On a GPU they are copied so that the copies defeat L2 (module docstring)
    and ``rounds`` graph replays are timed; on a CPU ``fn`` runs on them as they are, in
    ``rounds`` rounds of about ``min_round_s`` after ``warmup_rounds``.
    """
    if device.type == "cuda":
        timing = _time_gpu(benchmark, fn, weights, device, rounds)
    else:
        timing = _time_host(benchmark, functools.partial(fn, *weights), device, min_round_s, rounds, warmup_rounds)
    median = timing["median_s"]
    peaks = device_peaks(device)
    gbps = case.bytes_moved / median / 1e9
    tflops = case.flops / median / 1e12 if case.flops else None
    achieved = gbps if case.peak_kind == "gbps" else tflops
    peak = peaks.get(case.peak_kind)
    record = {
        **{k: v for k, v in asdict(case).items() if k != "extra"},
        **case.extra,
        "device": device_name(device),
        **timing,
        "median_us": median * 1e6,
        "gbps": gbps,
        "tflops": tflops,
        "peak": peak,
        "pct_peak": (100.0 * achieved / peak) if (peak and achieved is not None) else None,
    }
    benchmark.extra_info.update(record)
    RECORDS.append(record)
    return record


def _time_host(benchmark, fn, device, min_round_s, rounds, warmup_rounds) -> dict:
    """pytest-benchmark rounds of ``inner`` calls each, then a device synchronization."""
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
    return {"median_s": benchmark.stats.stats.median / inner, "calls_per_round": inner, "rounds": rounds}


def nbytes(obj) -> int:
    """Bytes of a tensor, of a module's parameters and buffers, or of a tuple of those."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return sum(nbytes(t) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    raise TypeError(f"weights must be tensors or modules, got {type(obj).__name__}")


def _duplicate(obj):
    return obj.clone() if isinstance(obj, torch.Tensor) else copy.deepcopy(obj)


def rotating_calls(fn, weights: tuple, device: torch.device) -> tuple[list, dict]:
    """One no-argument call of ``fn`` per copy of ``weights`` (the originals are the first copy),
    in the order a replay makes them, and what the rotation achieves (for the record)."""
    one = nbytes(weights)
    l2 = l2_bytes(device)
    copies = max(1, min(MAX_COPIES, math.ceil(L2_MULTIPLE * l2 / one))) if one else 1
    sets = [tuple(weights)] + [tuple(_duplicate(w) for w in weights) for _ in range(copies - 1)]
    calls = [functools.partial(fn, *s) for s in sets]
    calls = calls * math.ceil(MIN_CALLS_PER_REPLAY / len(calls))
    facts = {"copies": copies, "copy_bytes": one, "rotation_bytes": one * copies, "l2_bytes": l2,
             "l2_defeated": one * copies >= L2_MULTIPLE * l2, "calls_per_replay": len(calls)}
    return calls, facts


def _event_time(run, calls: int) -> float:
    """Seconds per call of one ``run()`` making ``calls`` calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / calls


def _time_gpu(benchmark, fn, weights: tuple, device: torch.device, rounds: int) -> dict:
    """CUDA-graph replays over rotating weight copies (median_s) and the same calls eagerly."""
    calls, facts = rotating_calls(fn, weights, device)

    def eager():
        for call in calls:
            call()

    with torch.cuda.device(device):
        # Warm-up on a side stream, as graph capture wants: Triton compiles, cuBLAS picks its
        # kernels and workspaces, the caching allocator holds the outputs' blocks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph, graph_error = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.graph(graph):
                eager()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured is timed eagerly
            graph, graph_error = None, f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize()
        eager_median = statistics.median(_event_time(eager, len(calls)) for _ in range(rounds))
        replay = graph.replay if graph is not None else eager
        samples = []
        benchmark.pedantic(lambda: samples.append(_event_time(replay, len(calls))), rounds=rounds,
                           warmup_rounds=0, iterations=1)
        del graph
    return {
        "median_s": statistics.median(samples),
        "timing": "cuda_graph" if graph_error is None else "eager",
        "graph_error": graph_error,
        "eager_median_s": eager_median,
        "eager_median_us": eager_median * 1e6,
        "rounds": rounds,
        **facts,
    }


def measure_interleaved(benchmark, entries: list[tuple[Case, object]], device: torch.device,
                        rounds: int = 15) -> list[dict]:
    """Time several callables in alternating order, one call each per round, and record each.

    For side-by-side comparisons on a machine whose load drifts (shared CPUs): every round times
    every entry, so a slow spell hits all of them alike. pytest-benchmark times the whole round.
    """
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
            "median_us": median * 1e6,
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


def pair_fastest_dense(records: list[dict]) -> None:
    """CPU comparisons time bf16 F.linear (records[0], backend "baseline") and fp32 F.linear
    (records[1], "dense_fp32") beside ours: the faster of the two becomes the baseline ours is paired
    with (bf16 is slow without native bf16 instructions); every record gets the host's ISA."""
    bf16_rec, fp32_rec = records[0], records[1]
    if fp32_rec["median_s"] < bf16_rec["median_s"]:
        bf16_rec["backend"], fp32_rec["backend"] = "dense_bf16", "baseline"
    for r in records:
        r["cpu_isa"] = cpu_isa()


def pair_with_baselines(records: list[dict]) -> list[dict]:
    """Add baseline_median_s and speedup (baseline / ours) to every non-baseline record, and
    eager_speedup where both were also timed eagerly (GPU)."""
    baselines = {r["case"]: r for r in records if r["backend"] == "baseline"}
    for r in records:
        base = baselines.get(r["case"])
        if base is not None and r["backend"] != "baseline":
            r["baseline_median_s"] = base["median_s"]
            r["speedup"] = base["median_s"] / r["median_s"]
            if r.get("eager_median_s") and base.get("eager_median_s"):
                r["eager_speedup"] = base["eager_median_s"] / r["eager_median_s"]
    return records
