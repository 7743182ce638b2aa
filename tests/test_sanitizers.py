"""The C kernels under AddressSanitizer + UndefinedBehaviorSanitizer (scripts/check_sanitizers.sh).

The script builds a sanitized copy of the kernel library and the C parity harness into
build/sanitizers/, runs the harness, then the kernel and engine tests with Python loading that
library (ONEBIT_KERNELS_LIB, the sanitizer runtimes preloaded); any report fails it.
- the clean run: every variant this CPU runs, no report (a few minutes; here ~2 min on 2 busy cores);
- the planted run: a copy of the sources with a signed overflow planted in the harness' process and
  a heap overflow in Python's must fail, printing both reports -- so a run that stops noticing
  reports (as one did while pytest's output capture swallowed them) cannot pass silently.
Skipped, saying what is missing, where gcc or its libasan/libubsan runtimes are not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from onebit import kernels as K

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/check_sanitizers.sh"
# The default test files of the script, less the tests that hardly reach C (torch-only, subprocess
# import checks, the 200-token torch comparison, the benchmark CLI): ~1 minute of the run.
DESELECT = ("not greedy_200_tokens and not bench_model and not does_not_import_torch and not "
            "torch_free and not fake_kv_gradient")


def _runtimes_missing() -> str | None:
    if shutil.which("gcc") is None:
        return "gcc is not on PATH (apt-get install -y gcc)"
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return (f"gcc has no {lib} (the sanitizer runtimes); install them, e.g. `apt-get install -y "
                    f"gcc` (Debian/Ubuntu ship them in libgcc-<ver>-dev)")
    return None


def _run(cwd: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEBIT_KERNELS", "ONEBIT_KERNELS_LIB")}
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_kernels_lib_env_must_name_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEBIT_KERNELS_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(ImportError, match="ONEBIT_KERNELS_LIB=.*nope.so.* is not a file"):
        K._find_library()
    monkeypatch.setenv("ONEBIT_KERNELS_LIB", str(tmp_path))
    with pytest.raises(ImportError, match="is not a file"):
        K._find_library()
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("ONEBIT_KERNELS_LIB", str(lib))
    assert K._find_library() == lib
    monkeypatch.delenv("ONEBIT_KERNELS_LIB")
    assert K._find_library().parent == Path(K.__file__).parent


@pytest.mark.slow
def test_kernels_and_engine_tests_run_clean_under_asan_ubsan():
    missing = _runtimes_missing()
    if missing:
        pytest.skip(missing)
    rc, out = _run(ROOT, "-k", DESELECT)
    assert rc == 0, f"{SCRIPT} failed (rc {rc}):\n{out[-8000:]}"
    assert "check_sanitizers.sh: no sanitizer reports; all checks passed" in out, out[-3000:]
    assert "parity: OK," in out, out[-3000:]
    harness = next(line for line in out.splitlines() if line.startswith("parity: seed"))
    for variant in K.available_isas():  # the harness checked every variant this CPU runs
        assert f" {variant}" in harness.split("variants:")[1], (variant, harness)
    assert "-- pytest: OK" in out, out[-3000:]
    summary = re.findall(r"^=* ?(\d+ passed.*)$", out, re.M)  # pytest's last line
    assert summary and not re.search(r"\d+ (failed|error)", summary[-1]), out[-3000:]


PLANT = r"""
/* planted by tests/test_sanitizers.py: the script must report both and fail */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
__attribute__((constructor)) static void ob_planted_bugs(void) {
    char cmd[4096] = {0};
    FILE *f = fopen("/proc/self/cmdline", "rb");
    size_t len = f ? fread(cmd, 1, sizeof cmd - 1, f) : 0;
    if (f) fclose(f);
    int pytest = 0;
    for (size_t i = 0; i < len; i += strlen(cmd + i) + 1) pytest |= strstr(cmd + i, "pytest") != NULL;
    if (!getenv("ONEBIT_KERNELS_LIB")) { /* the C harness */
        volatile int big = INT_MAX;
        big = big + 1; /* signed overflow: UBSan */
    } else if (pytest) { /* the tests (not the script's check that Python loads the library) */
        volatile size_t n = 16; /* a size the compiler cannot see, so UBSan's object-size check */
        char *p = malloc(n);    /* leaves the overflow to ASan */
        ((volatile char *)p)[n] = 1; /* heap-buffer-overflow */
        free(p);
    }
}
"""


@pytest.mark.slow
def test_sanitizer_reports_fail_the_run(tmp_path):
    missing = _runtimes_missing()
    if missing:
        pytest.skip(missing)
    for rel in ("setup.py", "pyproject.toml", SCRIPT, "src/onebit/kernels/csrc", "tests/c",
                "tests/conftest.py", "tests/test_kernels.py"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    with open(tmp_path / "src/onebit/kernels/csrc/dispatch.c", "a") as f:
        f.write(PLANT)
    rc, out = _run(tmp_path, "tests/test_kernels.py", "-k", "test_c_pack_matches_numpy")
    assert rc != 0, out[-6000:]
    assert "check_sanitizers.sh: FAILED" in out, out[-6000:]
    assert "runtime error: signed integer overflow" in out and "ob_planted_bugs" in out, out[-6000:]
    assert "-- parity: FAILED" in out, out[-6000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in out, out[-6000:]
    assert "-- pytest: FAILED" in out, out[-6000:]
