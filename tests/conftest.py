"""Shared test setup.

Kernel tests run in Triton's interpreter on machines without a GPU: TRITON_INTERPRET must be set before triton is
first imported, so it is set here, at collection time, and only where CUDA is absent (on a GPU the same tests run the
compiled kernels). Importing torch does not import triton, so asking torch about CUDA first is safe.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from numerics import poisoned_empty  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in bench/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): their small matrices run
    faster on one thread, and far faster when the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def seed(request):
    """A fresh seed per test run (printed on failure via the test id's output), so inputs are never stale."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture
def poison_empty():
    """Every floating torch.empty comes back full of NaN, so a value a kernel fails to write shows up."""
    with poisoned_empty():
        yield
