"""Suite-wide settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # small tensors on a 2-core machine shared with other jobs: torch's thread pool oversubscribes
    # (compiler tests: 23 s with one thread, 300 s with two under load); restored after each module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
