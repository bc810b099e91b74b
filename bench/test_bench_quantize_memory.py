"""Peak host memory of ``lowbit.quantize`` on an fp32 model of 103 MB (8 Linear layers, the largest
16.8 MB), each measured in a fresh process (tests/quantize_memory.py), against the target: the
model plus its two largest layers. ``keep_originals`` holds every original layer until quantize
returns, as lowbit did before it freed each one as it went: the figure that the target improves on.

Recorded as facts (bytes): peak_over_baseline (high-water RSS minus RSS before the model was
built), peak_over_model (minus RSS after it was built), the target, the model and its two largest
layers, and after_over_baseline (what stays resident). ``live_bytes`` runs use a fixed glibc mmap
threshold so that RSS follows the bytes alive; the others use glibc's defaults, as users get them.
"""

from __future__ import annotations

import os
import sys

import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import quantize_memory  # noqa: E402


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
@pytest.mark.parametrize("live_bytes", [True, False], ids=["live-bytes", "glibc-default"])
@pytest.mark.parametrize("keep_originals", [False, True], ids=["freed", "kept"])
@pytest.mark.parametrize("method", ["dfloat", "int8"])
def test_quantize_peak_memory(method, keep_originals, live_bytes, quick):
    if quick and (keep_originals or not live_bytes):
        pytest.skip("--lowbit-quick: the live-bytes figure of the current code only")
    r = quantize_memory.measure(method, keep_originals=keep_originals, live_bytes=live_bytes)
    top2 = sum(r["layer_bytes"][:2])
    target = r["model_bytes"] + top2
    fact = {
        "fact": "quantize_peak_rss", "method": method, "model": f"fp32 nn.Sequential of Linear {r['dims']}",
        "keep_originals": keep_originals, "live_bytes": live_bytes, "model_bytes": r["model_bytes"],
        "two_largest_layers_bytes": top2, "target_bytes": target,
        "peak_over_baseline": r["peak_rss"] - r["baseline_rss"],
        "peak_over_model": r["peak_rss"] - r["model_rss"] if r["hwm_reset"] else None,
        "after_over_baseline": r["after_rss"] - r["baseline_rss"], "ru_maxrss": r["ru_maxrss"],
        "seconds": r["seconds"], "threads": r["threads"],
    }
    fact["within_target"] = fact["peak_over_baseline"] <= target
    harness.FACTS.append(fact)
    print(f"\n{method} keep_originals={keep_originals} live_bytes={live_bytes}: peak "
          f"{fact['peak_over_baseline'] / 1e6:.1f} MB over the baseline, target {target / 1e6:.1f} MB "
          f"(model {r['model_bytes'] / 1e6:.1f} + two largest layers {top2 / 1e6:.1f})")
