#!/usr/bin/env bash
# Set up the vLLM venv (scripts/setup_vllm.sh), then run the vLLM integration tests in it. Extra
# arguments go to pytest. About 5 minutes on 2 cores, plus the venv's first set-up (2-5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec "${LOWBIT_VLLM_VENV:-.venv-vllm}/bin/python" -m pytest tests/test_vllm.py -q -rs "$@"
