#!/usr/bin/env bash
# Create .venv and install onebit (editable) with its test extras. Idempotent; pins torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Quiet, but fail loudly; skip the reinstall (and C kernel rebuild) when neither the package
# metadata nor the C sources changed since the last setup.
pip_install() {  # quiet (drops the index's "is ignored" noise), but a failure stops the script
  local out
  if ! out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1); then
    echo "$out" | grep -v "is ignored" >&2
    echo "setup: 'pip install $*' failed" >&2
    exit 1
  fi
  echo "$out" | grep -v "is ignored" || true
}
stamp=.venv/.onebit-setup
changed=""
if [ -f "$stamp" ]; then
  changed=$(find pyproject.toml setup.py src/onebit/kernels/csrc -newer "$stamp" | head -1)
fi
if [ ! -f "$stamp" ] || [ -n "$changed" ]; then
  pip_install "torch==2.13.0"
  pip_install -e ".[dev]"
  .venv/bin/python -c "import onebit, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$stamp"
fi
