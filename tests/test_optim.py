"""optim.py: the parameter split, Muon's update, its checkpoint/resume and DDP, on a 2-layer, 32-wide model."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pretrain
from checkpoint import load_checkpoint, step_checkpoints
from config import ModelConfig, TrainConfig
from model import GPT
from optim import Muon, MuonAdamW, make_optimizer, orthogonalize
from test_train import TINY as TINY_ADAMW
from test_train import (ENV, ROOT, assert_close_weights, assert_same_weights, data_dir,  # noqa: F401 (a fixture)
                        final_weights, read_log)

TINY = [*TINY_ADAMW, "--optimizer", "muon", "--muon_lr", "0.05"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(data_dir, out, *args):
    pretrain.main(["--data", str(data_dir), "--out", str(out), *TINY, *args])


def weights(ckpt):
    return load_checkpoint(ckpt)[0].state_dict()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, smear=True))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(f"h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.adamw.param_groups)
    assert sorted(decayed) == ["wpe.weight", "wte.weight"]  # wte is also the output layer (tied)
    assert "smear" in plain and "ln_f.weight" in plain and "h.0.attn.c_attn.bias" in plain
    assert len(muon) + len(decayed) + len(plain) == len(names)  # every parameter once
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.1, 0.0]
    assert opt.muon.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 6e-4)
    adamw = make_optimizer(model, TrainConfig(), torch.device("cpu"))  # the default: AdamW on everything
    assert isinstance(adamw, torch.optim.AdamW) and sum(len(g["params"]) for g in adamw.param_groups) == len(names)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 0.1 to 10
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == shape and s.min() > 0.5 and s.max() < 1.5
    # the same singular vectors, to rounding (which the Gram form amplifies along the smallest singular values)
    assert torch.allclose(u.T @ o @ v, torch.diag(torch.diagonal(u.T @ o @ v)), atol=5e-4)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_orthogonalize_on_the_gram_matrix_is_the_textbook_iteration(shape):
    """What orthogonalize computes on a CPU from the Gram matrix alone is the textbook iteration's result (float64),
    and CUDA's textbook iteration in bf16 (run here on the CPU) is near it."""
    from optim import newton_schulz
    torch.manual_seed(1)
    g = torch.randn(shape)
    wide = g.T if shape[0] > shape[1] else g
    expected = newton_schulz(wide.double() / wide.double().norm(), 5).float()
    assert torch.allclose(orthogonalize(g), expected.T if shape[0] > shape[1] else expected, atol=1e-5)
    in_bf16 = newton_schulz((wide / wide.norm()).bfloat16(), 5).float()
    assert (in_bf16 - expected).abs().max() < 0.05 and not torch.equal(in_bf16, expected)


def test_muon_step_follows_the_schedule_through_lr_scale():
    """The loop writes the schedule's rate into every group; a Muon step moves a matrix by lr * lr_scale times
    an update of spectral norm ~1 (scaled by sqrt(rows / cols) for a tall one), whatever the gradient's size."""
    steps = []
    for grad_scale in (1e-3, 1e3):
        p = torch.nn.Parameter(torch.zeros(64, 16))
        opt = Muon([p], lr=0.1, lr_scale=0.5, momentum=0.0)
        opt.param_groups[0]["lr"] = 0.01  # as the loop sets it
        p.grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * grad_scale
        opt.step()
        steps.append(torch.linalg.svdvals(p.detach()).max().item())
    assert steps[0] == pytest.approx(steps[1], rel=1e-4)
    assert 0.5 < steps[0] / (0.01 * 0.5 * 2) < 1.5  # sqrt(64 / 16) = 2


def test_muon_checkpoint_resume_is_bit_for_bit(data_dir, tmp_path):
    """A 12-step Muon run; its step-8 checkpoint resumed to step 12 gives the same weights: the momentum buffers
    and AdamW's moments round-trip through train_state.pt (loaded with weights_only=True)."""
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--keep_last", "5")
    log = read_log(out)
    train = [r for r in log if r["type"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 3  # Muon trains
    reference = weights(out / "step_0000012")
    _, _, state = load_checkpoint(out / "step_0000008", train_state=True)
    assert set(state["optimizer"]) == {"adamw", "muon"} and len(state["optimizer"]["muon"]["state"]) == 8
    for d in step_checkpoints(out)[-1:]:
        os.replace(d, tmp_path / d.name)  # the run "stopped" after its step-8 checkpoint
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--keep_last", "5", "--resume")
    assert_same_weights(weights(out / "step_0000012"), reference)


def test_resuming_with_another_optimizer_is_a_clear_error(tiny_model):
    adamw = make_optimizer(tiny_model, TrainConfig(), torch.device("cpu"))
    muon = make_optimizer(tiny_model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    with pytest.raises(ValueError, match="resume with the --optimizer the run was started with"):
        muon.load_state_dict(adamw.state_dict())


def test_torchrun_two_processes_match_one_process_with_accumulation(data_dir, tmp_path):
    """Muon under DDP: 2 processes x 2 micro-batches == 1 process x 4 micro-batches (the gradients are averaged
    before the step, so both processes orthogonalize the same momentum)."""
    steps = ["--max_steps", "4", "--save_every", "0", "--batch_tokens", str(4 * 4 * 32)]
    one, two = tmp_path / "one", tmp_path / "two"
    run(data_dir, one, *steps)
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                           "--nproc_per_node", "2", "pretrain.py", "--data", str(data_dir), "--out", str(two), *TINY,
                           *steps], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_log(one), read_log(two)]
    assert runs[0][0]["grad_accum"] == 4 and runs[1][0]["grad_accum"] == 2 and runs[1][0]["world"] == 2
    assert runs[1][0]["config"]["optimizer"] == "muon"
    curves = [[(r["step"], r["loss"]) for r in log if r["type"] == "train"] for log in runs]
    assert [c[0] for c in curves[0]] == [c[0] for c in curves[1]] == [1, 2, 3, 4]
    assert np.allclose([c[1] for c in curves[0]], [c[1] for c in curves[1]], rtol=1e-4)
    assert curves[0][-1][1] < curves[0][0][1] - 1
    # The two sum their gradients in another order; Muon's Gram-form iteration (optim.gram_iteration) amplifies that
    # rounding along the update's smallest singular values: equal to 1e-4, where a wrong average is off by a step
    assert_close_weights(final_weights(one), final_weights(two), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("args, message", [(["--optimizer", "sgd"], "field 'optimizer' expects one of adamw, muon"),
                                           (["--muon_momentum", "1"], "field 'muon_momentum' expects a value in"),
                                           (["--lr", "0"], "field 'lr' expects a value > 0 with optimizer muon")])
def test_bad_optimizer_settings_exit_2(data_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "run", *args)
    assert e.value.code == 2 and message in capsys.readouterr().err
