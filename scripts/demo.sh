#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run `lowbit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LOWBIT_VENV:-.venv}/bin/lowbit" demo "$@"
