"""The AArch64 NEON kernels (csrc/arm.c) against the reference, under qemu user-mode emulation.

Runs scripts/check_arm.sh: the C parity harness (tests/c/parity.c) cross-compiled for AArch64 and
run on an emulated CPU with dotprod (the sdot path) and one without (the smlal path), plus a native
build of the same harness. Skipped where the cross toolchain or qemu is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("gcc", "aarch64-linux-gnu-gcc", "qemu-aarch64")


def test_neon_kernels_match_reference_under_qemu():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not on PATH; to run the AArch64 emulation check install them, e.g. "
            "`apt-get install -y gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user`"
        )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_arm.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scripts/check_arm.sh failed (rc {proc.returncode}):\n{out[-6000:]}"
    assert "check_arm.sh: all parity runs passed" in out
    assert "neon path: dot" in out and "neon path: base" in out, out[-3000:]
