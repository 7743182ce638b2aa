#!/usr/bin/env bash
# Set up .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# In CI (as root, with apt), fetch the AArch64 cross compiler and qemu so the NEON kernels are
# checked against the reference under emulation (tests/test_arm_emulated.py skips without them),
# and Bochs + ISO tools for the AVX-512 check (tests/test_avx512_emulated.py, ~4 minutes; it
# fetches a Debian kernel with apt-get download and skips without these).
if [ -n "${CI:-}" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  pkgs=""
  command -v qemu-aarch64 >/dev/null || pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  command -v bochs-bin >/dev/null && command -v xorriso >/dev/null \
    || pkgs="$pkgs bochs bochsbios vgabios xorriso isolinux syslinux-common cpio"
  # the chat page's headless-browser test (tests/test_serve.py; skips without them)
  command -v chromium >/dev/null && command -v chromedriver >/dev/null || pkgs="$pkgs chromium chromium-driver"
  if [ -n "$pkgs" ] && ! apt-get install -y -qq $pkgs >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $pkgs >/dev/null 2>&1 \
      || echo "test: could not install $pkgs; the NEON/AVX-512 emulation and browser tests will skip" >&2
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
