import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from config import ModelConfig  # noqa: E402
from model import GPT  # noqa: E402

# Training in the tests keeps the threads each test sets (train.CpuThreads defers to OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test over ~20 s; `make test` runs it, `pytest -m 'not slow'` skips it")


@pytest.fixture
def tiny_model():
    """A 2-layer, 32-wide GPT with the full 50K vocabulary and a 64-token context, fixed seed."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (its subprocesses get OMP_NUM_THREADS=1 from the module): on a busy
    2-core machine two threads per process mostly wait for each other, making small matmuls several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
