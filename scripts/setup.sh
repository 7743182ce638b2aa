#!/usr/bin/env bash
# Create .venv and install onebit (editable) with its test extras. Idempotent; pins torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Quiet, but fail loudly; skip the reinstall when nothing changed since the last setup.
stamp=.venv/.onebit-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import onebit, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$stamp"
fi
