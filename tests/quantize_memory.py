"""Peak host memory of ``lowbit.quantize`` on an fp32 model of about 100 MB, measured in a fresh
process (``measure``), so that nothing else this process allocated blurs the figure. Shared by
tests/test_quantize.py (the bound) and bench/test_bench_quantize_memory.py (the report).

Run directly: ``python tests/quantize_memory.py int8 [--keep-originals]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

# Widths of an nn.Sequential of Linear layers: 8 layers, 103 MB in fp32, the largest 16.8 MB
# (4096 x 1024, four of them), so that the two largest layers are a third of the model.
DIMS = (1024, 4096, 1024, 4096, 1024, 2048, 2048, 1024, 512)


def measure(method: str, dims: tuple[int, ...] = DIMS, *, keep_originals: bool = False, live_bytes: bool = True,
            timeout: float = 600) -> dict:
    """Quantize the model of ``dims`` with ``method`` in a child process; returns its report (bytes):
    model_bytes, layer_bytes (largest first), baseline_rss (before the model was built),
    model_rss (after), peak_rss (the high-water mark while quantizing), after_rss, hwm_reset
    (whether the high-water mark could be reset after building the model; if not, peak_rss
    covers building it too), ru_maxrss, seconds.

    live_bytes: run the child with a fixed glibc mmap threshold, so that every large tensor is its
    own mapping, returned to the system when freed, and RSS follows the bytes alive. With glibc's
    default, the threshold rises after the first large free and later tensors land in the heap,
    where freed blocks stay resident and fragment across threads' arenas: the same run then peaks
    anywhere from 1.5x to 3x as high, which says more about malloc than about what is kept alive.
    keep_originals: hold every original layer until quantize returns (what lowbit did before).
    """
    args = [sys.executable, __file__, method, "--dims", *map(str, dims)]
    if keep_originals:
        args.append("--keep-originals")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if live_bytes else None
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    # Writing 5 to clear_refs sets VmHWM back to the current RSS (Linux >= 4.0); some sandboxes refuse it.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--keep-originals", action="store_true",
                        help="hold every original layer until quantize returns")
    args = parser.parse_args()

    import time

    import torch
    from torch import nn

    import lowbit

    # Load what the first conversion loads (kernels, tables), so the baseline already includes it.
    lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), args.method, progress=False)
    baseline = _status("VmRSS")
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(args.dims, args.dims[1:]))).requires_grad_(False)
    layer_bytes = sorted((p.numel() * p.element_size() for layer in model for p in layer.parameters()
                          if p.dim() == 2), reverse=True)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_rss = _status("VmRSS")
    hwm_reset = _reset_high_water_mark()
    originals = list(model) if args.keep_originals else []
    start = time.perf_counter()
    lowbit.quantize(model, args.method, progress=False)
    seconds = time.perf_counter() - start
    assert not any(type(m) is nn.Linear for m in model), "every layer converted"
    del originals
    print(json.dumps({
        "method": args.method, "dims": args.dims, "keep_originals": args.keep_originals,
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "model_bytes": model_bytes, "layer_bytes": layer_bytes, "baseline_rss": baseline, "model_rss": model_rss,
        "peak_rss": _status("VmHWM"), "after_rss": _status("VmRSS"), "hwm_reset": hwm_reset,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds,
        "threads": torch.get_num_threads(), "pid": os.getpid(),
    }))


if __name__ == "__main__":
    _main()
