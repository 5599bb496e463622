#!/usr/bin/env bash
# Set up and run the whole test suite (includes one real-model run on SmolLM2-135M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q "$@"
