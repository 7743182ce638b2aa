import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite runs tiny models: intra-op threads only add sync overhead (badly so on a busy
    2-core machine, where OpenMP spin-waiting made single steps ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
