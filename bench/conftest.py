"""pytest-benchmark set-up for lowbit: options, and the results JSON written at the end."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

import pytest
import torch

import harness
import lowbit.files

RESULTS_DIR = Path(__file__).parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("lowbit")
    group.addoption("--lowbit-results", default=None,
                    help="path of the results JSON (default: bench/results/<date>_<device>.json)")
    group.addoption("--lowbit-quick", action="store_true", help="small shapes and few rounds (harness self-test)")
    group.addoption("--lowbit-device", default=None, help="cpu or cuda (default: cuda when available)")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--lowbit-quick")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--lowbit-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--lowbit-device cuda: no CUDA device is visible", returncode=2)
    return torch.device(name)


def pytest_sessionfinish(session, exitstatus):
    if not harness.RECORDS and not harness.FACTS:
        return
    records = harness.pair_with_baselines(harness.RECORDS)
    device = torch.device(session.config.getoption("--lowbit-device")
                          or ("cuda" if torch.cuda.is_available() else "cpu"))
    now = datetime.datetime.now(datetime.timezone.utc)
    quick = session.config.getoption("--lowbit-quick")
    out = session.config.getoption("--lowbit-results")
    if out is None:
        # Named by default: never replace an earlier run's file (a second run of the day, or a
        # subset of the cases, would lose its figures); quick runs get names of their own.
        slug = re.sub(r"[^A-Za-z0-9]+", "-", harness.device_name(device)).strip("-").lower()[:40]
        out = lowbit.files.free_name(RESULTS_DIR / f"{now:%Y-%m-%d}_{slug}{'_quick' if quick else ''}.json")
    elif quick:
        out = lowbit.files.free_name(out)  # a quick run never replaces measured results
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "device": harness.device_name(device),
        "peaks": harness.device_peaks(device),
        "device_facts": harness.device_facts(device),
        "versions": harness.versions(),
        "timing": harness.timing_method(device),
        # CPU timings are only as good as the machine was quiet: 1/5/15-minute load averages at the end.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "records": records,
        "facts": harness.FACTS,
    }
    out = lowbit.files.write_text(out, json.dumps(doc, indent=1), what="--lowbit-results")
    session.config._lowbit_results_path = str(out)
    print(f"\nlowbit results: {out}")
