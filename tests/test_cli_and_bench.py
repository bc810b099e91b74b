"""`lowbit demo`, `lowbit info` and `lowbit bench` as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from lowbit import cli

from conftest import skip_unless_available


def _lowbit(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_checks_every_backend_and_runs_the_real_model(tmp_path):
    plot = tmp_path / "demo.png"
    result = _lowbit("demo", "--quick", "--quiet", "--plot", str(plot))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all backends agree with the reference" in result.stdout
    assert "reference" in result.stdout and "triton" in result.stdout  # conftest sets TRITON_INTERPRET
    assert result.stdout.strip().splitlines()[-1] in ("demo: every check passed", "all backends agree with the reference")
    if "model: skipped" in result.stdout:
        pytest.skip("SmolLM2 is not installed here")
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("none", "dfloat", "int8")}
    assert set(rows) == {"none", "dfloat", "int8"}
    assert rows["dfloat"][3] == rows["none"][3]  # lossless: the same perplexity, to every printed digit
    assert float(rows["int8"][2]) < 0.45 * float(rows["none"][2])  # MB
    assert "dfloat: kept its promise" in result.stdout and "int8: kept its promise" in result.stdout
    assert "codebook: kept its promise (at most the perplexity of round-to-nearest 3-bit" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_writes_a_checkpoint_that_loads_and_evaluates(tmp_path):
    """`lowbit quantize` (calibrated) then `lowbit eval` on the folder it wrote; int8 for speed: the
    command is the same for every family."""
    pytest.importorskip("gguf")
    out = tmp_path / "q"
    result = _lowbit("quantize", "smollm2", "--method", "int8", "--out", str(out), "--calibration-tokens", "256",
                     "--quiet")
    if "neither" in result.stderr or "cannot be loaded" in result.stderr:
        pytest.skip("SmolLM2 is not installed here")
    assert result.returncode == 0, result.stderr
    assert "int8 in" in result.stdout and "bits per linear weight" in result.stdout
    assert (out / "lowbit.json").exists() and (out / "tokenizer.json").exists()
    evaluated = _lowbit("eval", str(out), "--tokens", "200", "--window", "100", "--new-tokens", "2", "--no-reload",
                        "--quiet", "--json", "-")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["results"][0]["perplexity"] < 100
    bad = _lowbit("quantize", "smollm2", "--method", "dfloat", "--out", str(tmp_path / "x"),
                  "--calibration-tokens", "8")
    assert bad.returncode != 0 and "takes no calibration" in bad.stderr


def test_eval_compares_methods_in_one_process_and_writes_json(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "eval.json"
    result = _lowbit("eval", "smollm2", "--compare", "none,int8", "--tokens", "300", "--window", "150",
                     "--new-tokens", "4", "--json", str(out), "--quiet")
    if "SmolLM2 is not installed" in result.stderr:
        pytest.skip("SmolLM2 is not installed here")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert [r["method"] for r in doc["results"]] == ["none", "int8"] and doc["tokens"] == 300
    none, int8 = doc["results"]
    assert none["bits_per_weight"] == 32.0 and 8.0 < int8["bits_per_weight"] < 8.5
    assert 1 < none["perplexity"] < 100 and abs(int8["perplexity"] / none["perplexity"] - 1) < 0.1
    for r in (none, int8):
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_mb"] > r["model_mb"] > 0 and r["sample"]
    assert doc["cpu"]["isa"] is not None and "Δppl" in result.stdout
    bad = _lowbit("eval", "smollm2", "--method", "int4")
    assert bad.returncode == 1 and "--method / --compare must name" in bad.stderr


def test_info_lists_every_backend():
    result = _lowbit("info")
    assert result.returncode == 0, result.stderr
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"  {name}" in result.stdout
    if "extension lowbit._C: loaded" in result.stdout and "backends for cpu" in result.stdout:
        path = result.stdout.split("CPU int8 GEMM: ")[1].split()[0]
        assert path in ("amx", "onednn", "avx2", "int_mm")
        forced = _lowbit("info", env={"LOWBIT_CPU_INT8_GEMM": "int_mm"})
        assert "CPU int8 GEMM: int_mm" in forced.stdout


def test_bench_writes_paired_results(tmp_path):
    skip_unless_available("cpu", "cpu")
    measured = tmp_path / "results.json"
    measured.write_text('{"quick": false}')  # a day's real results: a quick run must keep them
    result = _lowbit("bench", "--quick", "--out", str(measured), "-k", "bits4 and not unpack")
    assert result.returncode == 0, result.stdout + result.stderr
    assert measured.read_text() == '{"quick": false}'
    out = tmp_path / "results-2.json"
    assert f"results: {out}" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    assert doc["versions"]["torch"] and doc["device"] and doc["date"]
    by_backend = {r["backend"]: r for r in doc["records"]}
    assert {"baseline", "reference", "cpu"} <= set(by_backend)
    for name in ("reference", "cpu"):
        r = by_backend[name]
        assert r["op"] == "pack_bits" and r["dtype"] == "uint8" and r["shapes"]["values"] == [64, 512]
        assert r["median_s"] > 0 and r["gbps"] > 0
        assert r["speedup"] == pytest.approx(by_backend["baseline"]["median_s"] / r["median_s"])
    assert "vs base" in result.stdout and "pack_bits bits=4 64x512" in result.stdout


def test_bench_without_a_benchmark_folder_says_so(tmp_path):
    result = _lowbit("bench", "--path", str(tmp_path))
    assert result.returncode != 0
    assert "no benchmark folder found" in result.stderr


def test_format_results_marks_missing_figures():
    doc = {"device": "dev", "date": "d", "versions": {"torch": "t"}, "records": [
        {"case": "c", "backend": "baseline", "median_s": 2e-6, "gbps": 1.0, "tflops": None, "pct_peak": None},
        {"case": "c", "backend": "cpu", "median_s": 1e-6, "gbps": 2.0, "tflops": None, "pct_peak": 50.0,
         "speedup": 2.0},
    ]}
    table = cli.format_results(doc).splitlines()
    assert table[3].split()[:2] == ["c", "baseline"]  # baseline first within a case
    assert table[4].split()[-2:] == ["50.0", "2.00x"]


def test_compress_inspect_decompress_round_trip(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    original = {"a.weight": (torch.randn(64, 48) * 0.02).to(torch.bfloat16), "a.bias": torch.zeros(64),
                "ids": torch.arange(5)}
    save_file(original, str(tmp_path / "in.safetensors"))
    assert _lowbit("compress", str(tmp_path / "in.safetensors"), str(tmp_path / "c.safetensors"),
                   "--quiet").returncode == 0
    inspect = _lowbit("inspect", str(tmp_path / "c.safetensors"))
    assert inspect.returncode == 0 and "a.weight" in inspect.stdout and "1 dfloat tensors" in inspect.stdout
    assert _lowbit("decompress", str(tmp_path / "c.safetensors"), str(tmp_path / "out.safetensors")).returncode == 0
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k


def test_eval_kv_bits_compares_the_quantized_cache_with_the_dense_one():
    pytest.importorskip("gguf")
    result = _lowbit("eval", "smollm2", "--kv-bits", "8", "--kv-prompt-tokens", "96", "--kv-decode-tokens", "24",
                     "--kv-group", "32", "--kv-residual", "16", "--quiet", "--json", "-")
    if "SmolLM2 is not installed" in result.stderr:
        pytest.skip("SmolLM2 is not installed here")
    assert result.returncode == 0, result.stdout + result.stderr
    kv = json.loads(result.stdout)["kv"]
    dense, quantized = kv["dense"], kv["quantized"]
    assert kv["bits"] == 8 and kv["decoded_tokens"] == 24
    assert abs(quantized["perplexity_change"]) < 0.01 and quantized["agreement"] > 0.9
    assert quantized["bytes_per_token"] < 0.6 * dense["bytes_per_token"]  # fp32 model: 8-bit codes + scales
    bad = _lowbit("eval", "smollm2", "--kv-bits", "4", "--compare", "none,int8")
    assert bad.returncode == 1 and "--kv-bits evaluates one model" in bad.stderr
