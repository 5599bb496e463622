#!/usr/bin/env bash
# Create .venv and install abliterate. Torch goes first, pinned, so pip takes the CPU wheel
# where one is on disk instead of a multi-GB CUDA build pulled in by a bare requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
