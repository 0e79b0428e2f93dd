"""CUDA paths that a CPU can check (shared/docs/cuda-review.md, section 4): device choice under torchrun, the MFU
peak of a GPU's name, the pace that leaves warm-up out, warmup against short runs, the TF32 switch."""

import math

import pytest
import torch

import train
from config import ConfigError, ModelConfig, TrainConfig
from model import GPT, enable_tf32


def test_torchrun_refuses_one_gpu_index_for_every_process(monkeypatch):
    """--device cuda:N under torchrun would put every rank on GPU N (NCCL: duplicate GPU); refused before any
    CUDA call, with what to give instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="field 'device' is 'cuda:0' under torchrun.*CUDA_VISIBLE_DEVICES"):
        train.setup_device(TrainConfig(device="cuda:0"))


def test_one_process_may_pick_its_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    device, rank, world = train.setup_device(TrainConfig(device="cuda:1"))
    assert (device, rank, world, calls) == (torch.device("cuda", 1), 0, 1, [torch.device("cuda", 1)])


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Tesla T4", None)])
def test_peak_flops_takes_the_most_specific_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.peak_flops(torch.device("cuda", 0), torch.bfloat16) == peak
    assert train.peak_flops(torch.device("cuda", 0), torch.float32) is None  # no fp32 peak: no MFU


def test_the_pace_leaves_the_first_step_out(monkeypatch):
    """The first step compiles (a minute on a GPU): tokens/s and MFU average the steps after it only."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    meter = train.Meter(model, torch.device("cuda", 0), torch.bfloat16, world=1)
    meter.update(1000, 60.0)  # compiling
    rate, mfu = meter.update(1000, 0.01)
    assert rate == pytest.approx(100_000) and meter.sec_per_step == pytest.approx(0.01)
    assert mfu == pytest.approx(model.flops_per_token() * 100_000 / 989e12)
    rate, _ = meter.update(1000, 0.02)
    assert rate == pytest.approx(0.9 * 100_000 + 0.1 * 50_000)


def test_warmup_never_fills_a_short_run():
    """A preset's warmup (700 steps for gpt2) takes at most a fifth of a shorter run, and the schedule still ends
    at min_lr; a long run keeps it as given."""
    cfg = TrainConfig(lr=1.0, warmup_steps=700, min_lr_ratio=0.1, schedule="cosine")
    assert train.warmup_steps(cfg, 500) == 100 and train.warmup_steps(cfg, 19000) == 700
    lrs = [train.lr_at(s, cfg, 500) for s in range(500)]
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 99
    assert lrs[-1] == pytest.approx(0.1, abs=1e-4) and all(0 < lr <= 1.0 for lr in lrs)
    assert train.lr_at(0, cfg, 3) <= 1.0 and train.lr_at(0, cfg, math.inf) == pytest.approx(1 / 700)
    text = train.describe(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)),
                          TrainConfig(warmup_steps=700, max_steps=500), "cpu", torch.float32, 1, 1, 500)
    assert "warmup 100 steps, a fifth of the run (not 700)" in text


def test_tf32_goes_through_the_fp32_precision_settings():
    """torch deprecates allow_tf32 and refuses mixing it with fp32_precision: enable_tf32 sets the new one (the
    settings exist on CPU builds too)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        enable_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
