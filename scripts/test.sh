#!/usr/bin/env bash
# Set up .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# In CI (as root, with apt), fetch the AArch64 cross compiler and qemu so the NEON kernels are
# checked against the reference under emulation (tests/test_arm_emulated.py skips without them).
if [ -n "${CI:-}" ] && ! command -v qemu-aarch64 >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  if ! apt-get install -y -qq $pkgs >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $pkgs >/dev/null 2>&1 \
      || echo "test: could not install $pkgs; the NEON emulation test will skip" >&2
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
