"""The AVX-512 VNNI kernels (csrc/x86.c, "avx512vnni" and "avx512vnni_zmm") against the reference,
under Bochs.

Runs scripts/check_avx512.sh: the C parity harness (tests/c/parity.c) built as the static /init of a
Linux initramfs and booted in the Bochs emulator on its Tiger Lake CPU model (AVX-512 VNNI), which
must pick avx512vnni_zmm by CPU detection and match the reference exactly. Takes a few minutes.
Skipped, saying what is missing, where Bochs, the ISO tools or a kernel image are not available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("gcc", "bochs-bin", "xorriso", "cpio", "gzip", "timeout")
FILES = (
    "/usr/lib/ISOLINUX/isolinux.bin",
    "/usr/lib/syslinux/modules/bios/ldlinux.c32",
    "/usr/share/bochs/BIOS-bochs-latest",
    "/usr/share/bochs/VGABIOS-lgpl-latest",
)
INSTALL = "apt-get install -y gcc bochs bochsbios vgabios xorriso isolinux syslinux-common cpio"


def _kernel_obtainable() -> bool:
    if os.environ.get("ONEBIT_BOCHS_KERNEL"):
        return True
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onebit" / "bochs"
    return any(cache.glob("vmlinuz-*")) or shutil.which("apt-get") is not None


def test_avx512vnni_kernels_match_reference_under_bochs():
    missing = [t for t in TOOLS if shutil.which(t) is None] + [f for f in FILES if not Path(f).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing; to run the AVX-512 emulation check: `{INSTALL}`")
    if not _kernel_obtainable():
        pytest.skip("no x86-64 Linux kernel for Bochs: set ONEBIT_BOCHS_KERNEL=/path/to/vmlinuz "
                    "(no cached one, and no apt-get to fetch linux-image-cloud-amd64)")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_avx512.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scripts/check_avx512.sh failed (rc {proc.returncode}):\n{out[-6000:]}"
    assert "check_avx512.sh: PASS" in out, out[-3000:]
    assert "parity: auto-selected variant: avx512vnni_zmm" in out, out[-3000:]
    assert " vnni=1 " in out, out[-3000:]  # the emulated CPU reported AVX-512 VNNI
    assert "parity: OK," in out, out[-3000:]
