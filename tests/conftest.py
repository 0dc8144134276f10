"""Suite-wide settings."""
import os

import pytest
import torch


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    # `-n auto` (pyproject's addopts): one worker per core, at most 4 (each imports torch and runs inductor;
    # each test runs single-threaded, below, so the workers do not oversubscribe the cores)
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # small tensors on a 2-core machine shared with other jobs: torch's thread pool oversubscribes
    # (compiler tests: 23 s with one thread, 300 s with two under load); restored after each module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def short_learned_rounding():
    # quantize(..., weight_bit_width<=4) learns each layer's rounding with 1000 Adam steps by default; tests
    # about other things (property tests, low-bit exports) take that path with 20, which exercises the same code
    # and exports the same kind of integers. tests/test_low_bit_ptq.py measures the method with its own counts.
    from quantfx import weight_rounding
    saved = weight_rounding.DEFAULT_ITERATIONS
    weight_rounding.DEFAULT_ITERATIONS = 20
    yield
    weight_rounding.DEFAULT_ITERATIONS = saved
