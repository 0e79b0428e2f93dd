import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from config import ModelConfig  # noqa: E402
from model import GPT  # noqa: E402


@pytest.fixture
def tiny_model():
    """A 2-layer, 32-wide GPT with the full 50K vocabulary and a 64-token context, fixed seed."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
