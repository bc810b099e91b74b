"""vLLM's quantization "lowbit" (``lowbit.integrations.vllm``) on SmolLM2-135M-Instruct, on the CPU.

These run in the venv ``scripts/setup_vllm.sh`` makes (``bash scripts/test_vllm.sh``): vLLM's CPU
build pins a torch and transformers of its own. Elsewhere they are skipped.

Each vLLM engine runs in a child process (this file run as a script, one engine per run), so that
one engine's threads and memory never reach the next; the checkpoints are made once per module.
Decoding is greedy in fp32, so that vLLM and transformers run the same products:

- int8 and codebook: vLLM's tokens equal transformers' on the same lowbit checkpoint (lowbit.load),
  prompt by prompt. The int8 checkpoint takes the decomposed product at every batch size
  (gemv_max_rows=0), as vLLM batches the decode steps of the four prompts together.
- dfloat: vLLM's tokens equal those of the dense checkpoint in vLLM, and every rank's decoded
  weights equal the dense weights' rows or columns bit for bit.
- tensor parallel: SmolLM2 with its 9 query / 3 KV heads padded to 12 / 4 with zero heads (the
  same function), one layer of each family, gives the same tokens at TP=2 as at TP=1.
- a damaged checkpoint is refused with lowbit's FormatError; the OpenAI-compatible server answers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: these tests run in the venv that "
                                   "scripts/setup_vllm.sh makes (bash scripts/test_vllm.sh)")

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.evaluation import load_dense, padded_heads  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "List three colors:"]
MAX_TOKENS = 12
# vLLM on the CPU: a small KV cache, no graph compilation, short sequences.
ENGINE = {"enforce_eager": True, "max_model_len": 256, "seed": 0}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- the child process: one engine -----------------------------------------------------------------
def _engine_main(request: dict) -> dict:
    import functools

    from vllm import LLM, SamplingParams

    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"),
              tensor_parallel_size=request.get("tp", 1), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=request.get("max_tokens", MAX_TOKENS), logprobs=2)
    outputs = llm.generate(request["prompts"], params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              # per step, the chosen token's logprob over the runner-up's (a logit difference)
              "margins": [[_margin(step) for step in o.outputs[0].logprobs] for o in outputs]}
    if request.get("weights"):
        result["weights"] = llm.apply_model(functools.partial(_rank_weights, names=request["weights"],
                                                              out=request["out"]))
    return result


def _margin(step: dict) -> float:
    top = sorted((p.logprob for p in step.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def _rank_weights(model, names: list[str], out: str) -> str:
    """Saves the named lowbit layers' weights on this rank, decoded, to ``out``/rank<r>.pt:
    {vLLM layer name: {"row_parallel": bool, "weights": [one per lowbit layer it runs]}}."""
    saved, rank = {}, 0
    for name in names:
        module = model.get_submodule(name)
        rank = module.tp_rank
        saved[name] = {"row_parallel": type(module).__name__ == "RowParallelLinear",
                       "weights": [m.dequantize() for m in module.lowbit_layers]}
    path = os.path.join(out, f"rank{rank}.pt")
    torch.save(saved, path)
    return path


def run_engine(request: dict, *, expect_failure: bool = False, timeout: int = 300) -> dict | str:
    """Run one vLLM engine in a child process -> its result (or, expecting a failure, its output)."""
    env = {**os.environ, **ENV}
    if request.get("tp", 1) > 1:
        # Two ranks on the CPUs of one NUMA node: one CPU each.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(request["tp"]))
    proc = subprocess.run([sys.executable, __file__, json.dumps(request)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if expect_failure:
        assert proc.returncode != 0, "the engine loaded a checkpoint it should have refused"
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the vLLM engine failed:\n{proc.stderr[-6000:]}"
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# -- checkpoints ------------------------------------------------------------------------------------
def _save(model, tokenizer, path: Path) -> Path:
    lowbit.save(model, path)
    tokenizer.save_pretrained(path)
    return path


def _first_layers(count: int):
    return lambda module, fqn: any(fqn.startswith(f"model.layers.{i}.") for i in range(count))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Checkpoints of SmolLM2 in fp32: dense, int8, codebook (first two layers: its encoder takes
    minutes for the whole model), dfloat."""
    root = tmp_path_factory.mktemp("vllm")
    dense_model, tokenizer = load_dense("smollm2")
    dense = root / "dense"
    dense_model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    made = {"dense": dense}
    for method, options in (("int8", {"gemv_max_rows": 0}),
                            ("codebook", {"filter_fn": _first_layers(2), "kmeans_iterations": 2, "refinements": 0}),
                            ("dfloat", {})):
        model, _ = load_dense("smollm2")
        lowbit.quantize(model, method, progress=False, **options)
        made[method] = _save(model, tokenizer, root / method)
    return made


def _transformers_greedy(folder: Path) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding of the lowbit checkpoint in transformers, one prompt at a time: per prompt
    (tokens, the margin of each chosen token's logit over the runner-up)."""
    import transformers

    model = lowbit.load(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    runs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        top = torch.stack([s[0].topk(2).values for s in out.scores])
        runs.append((out.sequences[0, ids.shape[1]:].tolist(), (top[:, 0] - top[:, 1]).tolist()))
    return runs


# Two fp32 engines (vLLM's CPU attention and norms, transformers' SDPA) differ by rounding; int8
# rounds the activations, which can carry such a difference to a logit. A step whose runner-up was
# within this many logits of the chosen token may go either way; the comparison stops there.
NEAR_TIE = 0.25


def assert_same_greedy(got: list[list[int]], want: list[tuple[list[int], list[float]]]) -> None:
    compared = 0
    for prompt, tokens, (expected, margins) in zip(PROMPTS, got, want):
        for step, (a, b, margin) in enumerate(zip(tokens, expected, margins)):
            if a != b:
                assert margin < NEAR_TIE and step > 0, (f"{prompt!r}: token {step} is {a}, transformers chose {b} "
                                                        f"by a margin of {margin:.3f} logits")
                break
            compared += 1
    assert compared >= 0.75 * len(PROMPTS) * MAX_TOKENS, f"only {compared} tokens agree before a near tie"


# -- tests ------------------------------------------------------------------------------------------
def test_plugin_registers_through_the_entry_point():
    code = ("import sys, lowbit; assert 'vllm' not in sys.modules, 'import lowbit imported vllm'; "
            "from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config; "
            "assert 'lowbit' in QUANTIZATION_METHODS, 'the entry point did not register lowbit'; "
            "import lowbit.integrations.vllm as plugin; plugin.register(); plugin.register(); "
            "assert QUANTIZATION_METHODS.count('lowbit') == 1, QUANTIZATION_METHODS; "
            "assert get_quantization_config('lowbit') is plugin.LowbitVllmConfig")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("method", ["int8", "codebook"])
def test_tokens_equal_transformers(folders, method):
    got = run_engine({"model": str(folders[method]), "prompts": PROMPTS})
    assert_same_greedy(got["tokens"], _transformers_greedy(folders[method]))


def test_dfloat_equals_dense(folders, tmp_path):
    dense = run_engine({"model": str(folders["dense"]), "prompts": PROMPTS})
    names = ["model.layers.3.self_attn.qkv_proj", "model.layers.3.mlp.down_proj"]
    got = run_engine({"model": str(folders["dfloat"]), "prompts": PROMPTS, "weights": names,
                      "out": str(tmp_path)})
    assert got["tokens"] == dense["tokens"]
    from safetensors.torch import load_file

    tensors = load_file(folders["dense"] / "model.safetensors")
    (path,) = got["weights"]
    rank = torch.load(path)
    (merged,) = rank[names[0]]["weights"]  # one stream for the fused layer
    want = torch.cat([tensors[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(merged.view(torch.int32), want.view(torch.int32))
    (down,) = rank[names[1]]["weights"]
    assert torch.equal(down.view(torch.int32), tensors["model.layers.3.mlp.down_proj.weight"].view(torch.int32))


def _padded_smollm2(path: Path) -> Path:
    """SmolLM2 with 12 query / 4 KV heads (3 zero query heads reading a zero KV head, whose
    attention output meets zero columns of o_proj): the same function, heads divisible by 2."""
    model, tokenizer = load_dense("smollm2")
    padded = padded_heads(model, 12, 4)
    # One layer of each family, the rest dense: every family shards, fused and row-parallel.
    lowbit.quantize(padded, "codebook", filter_fn=_first_layers(1), kmeans_iterations=2, refinements=0,
                    progress=False)
    lowbit.quantize(padded, "dfloat", filter_fn=lambda m, fqn: fqn.startswith("model.layers.1."), progress=False)
    lowbit.quantize(padded, "int8", filter_fn=lambda m, fqn: fqn.startswith("model.layers.2."), progress=False)
    return _save(padded, tokenizer, path)


def test_tensor_parallel_2_equals_1(tmp_path_factory):
    folder = _padded_smollm2(tmp_path_factory.mktemp("padded") / "smollm2-12-heads")
    config = json.loads((folder / "lowbit.json").read_text())
    assert config["methods"] == ["codebook", "dfloat", "int8"]
    one = run_engine({"model": str(folder), "prompts": PROMPTS})
    layers = {"model.layers.0.self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
              "model.layers.1.mlp.gate_up_proj": ("gate_proj", "up_proj"),
              "model.layers.2.self_attn.o_proj": ("o_proj",),
              "model.layers.0.mlp.down_proj": ("down_proj",)}
    out = tmp_path_factory.mktemp("ranks")
    two = run_engine({"model": str(folder), "prompts": PROMPTS, "tp": 2, "weights": list(layers), "out": str(out)},
                     timeout=420)
    assert sorted(Path(p).name for p in two["weights"]) == ["rank0.pt", "rank1.pt"]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    model = lowbit.load(folder)
    for name, fused in layers.items():
        prefix = name.rpartition(".")[0]
        whole = [model.get_submodule(f"{prefix}.{part}").dequantize() for part in fused]
        for rank, shard in enumerate(ranks):
            got = torch.cat(shard[name]["weights"])
            if shard[name]["row_parallel"]:
                want = whole[0].chunk(2, dim=1)[rank]
            else:
                want = torch.cat([w.chunk(2)[rank] for w in whole])
            assert torch.equal(got, want), (name, rank)
    # Each rank's int8 row-parallel layer rounds its activations over its own columns, and the
    # ranks' sum is another order of additions: the tokens agree up to near ties.
    assert_same_greedy(two["tokens"], list(zip(one["tokens"], one["margins"])))


def _flip_byte(file: Path, tensor: str) -> None:
    """Change one byte in the data of ``tensor`` in a safetensors file."""
    with open(file, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        start = 8 + size + header[tensor]["data_offsets"][0] + 100
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0x40]))


def test_damaged_checkpoint_is_refused(folders, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["int8"], damaged)
    _flip_byte(damaged / "model.safetensors", "model.layers.5.self_attn.k_proj.weight")
    output = run_engine({"model": str(damaged), "prompts": PROMPTS[:1]}, expect_failure=True)
    assert "FormatError" in output
    assert "layer 'model.layers.5.self_attn.k_proj'" in output and "checksum mismatch" in output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_chat(folders, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folders["int8"]),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--served-model-name", "smollm2-int8"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 240 s"
            time.sleep(2)
        body = json.dumps({"model": "smollm2-int8", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] == 8
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    print("RESULT " + json.dumps(_engine_main(json.loads(sys.argv[1]))), flush=True)
