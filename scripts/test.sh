#!/usr/bin/env bash
# Set up and run the whole test suite (includes one real-model run on SmolLM2-135M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
# The report test renders report.html in headless Chromium: install Debian's package when we may
# (root, or sudo without a password); otherwise that test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && as_root="sudo -n"; } || as_root="none"
  if [ "$as_root" != none ]; then
    { $as_root apt-get update -q && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
      || echo "could not install chromium; the report rendering test will skip" >&2
  fi
fi
# The search tests start their own throwaway PostgreSQL server (initdb in a temp dir): install Debian's
# package the same way when its binaries are missing (Debian keeps them in /usr/lib/postgresql/<ver>/bin).
if ! { command -v initdb && command -v pg_ctl; } >/dev/null 2>&1 \
  && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && as_root="sudo -n"; } || as_root="none"
  if [ "$as_root" != none ]; then
    { $as_root apt-get update -q && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >/dev/null \
      || echo "could not install postgresql; the shared-storage search tests will skip" >&2
  else
    echo "postgresql is not installed and we cannot install it (not root, no sudo); the shared-storage search tests will skip" >&2
  fi
fi
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
