import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The project's shared test material: $ONEBIT_SHARED_DATA, else shared/data beside this
    checkout (as CI lays it out), else beside the local repository this one was cloned from
    (`git clone . /tmp/x` has no shared/ next to it). Missing: the path CI would use, so a test
    that needs it fails naming it."""
    if os.environ.get("ONEBIT_SHARED_DATA"):
        return Path(os.environ["ONEBIT_SHARED_DATA"])
    beside = REPO.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    try:
        origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir() and (Path(origin).resolve().parent / "shared" / "data").is_dir():
        return Path(origin).resolve().parent / "shared" / "data"
    return beside


SHARED_DATA = _shared_data()

# The engine applies this machine's measured per-class kernel choice (onebit.kernels.wisdom),
# timing the variants once into ~/.cache/onebit if there is none. The suite runs with CPU
# detection's choice instead (no timing, nothing written to the home directory); test_wisdom.py
# exercises the measurement and mixed plans explicitly.
os.environ.setdefault("ONEBIT_TUNE", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite runs tiny models: intra-op threads only add sync overhead (badly so on a busy
    2-core machine, where OpenMP spin-waiting made single steps ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
