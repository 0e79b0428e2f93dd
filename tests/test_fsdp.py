"""Data parallel training under torchrun on the CPU (gloo, 2 processes, the 2-layer model of test_train.py): FSDP2
(--fsdp) against DDP and one process, resuming a sharded run, DDP and FSDP with the model compiled (--compile_cpu),
and the precision FSDP gathers in."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from checkpoint import load_checkpoint, step_checkpoints
from model import GPT, ModelConfig
from test_serve import free_port
from test_train import (ENV, ROOT, TINY, assert_close_weights, assert_same_weights, data_dir,  # noqa: F401
                        final_weights, read_log, run)
from train import shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 processes x 2 micro-batches of 4 x 32 tokens a step, or 1 process x 4; 6 steps, a checkpoint every 3; 3
# validation batches: one process of two evaluates one of them
STEPS = ["--max_steps", "6", "--save_every", "3", "--batch_tokens", str(4 * 4 * 32), "--eval_batches", "3"]


def torchrun(data_dir, out, *args, script="pretrain.py"):
    """A 2-process run of `script` (its stderr kept in OUT/../stderr). A run whose process was killed by a signal
    is run once more from the OUT it started from (empty, or a copy taken before a --resume): gloo has aborted a
    process at exit ("terminate called without an active exception", after the run saved its last checkpoint)
    in one full suite out of several, on a loaded 2-core machine and on a quiet one. A run that fails otherwise,
    or twice, fails the test."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
           script, "--data", str(data_dir), "--out", str(out), *TINY, *STEPS, *args]
    start = out.with_name(out.name + "-start")
    shutil.rmtree(start, ignore_errors=True)
    if out.exists():
        shutil.copytree(out, start)
    for attempt in range(2):
        if attempt:
            shutil.rmtree(out, ignore_errors=True)
            if start.exists():
                shutil.copytree(start, out)
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0 or "exitcode: -" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stderr").write_text(proc.stderr)
    return proc.stderr


def losses(out):
    return [r["loss"] for r in read_log(out) if r["type"] == "train"]


def val_losses(out):
    return [r["val_loss"] for r in read_log(out) if r["type"] == "eval"]


def without_key_biases(weights):
    """The weights less the attention's key biases. Their gradient is zero but for rounding (softmax ignores a shift
    shared by all keys); the rounding differs between runs that sum in another order, and Adam turns it into steps
    of full size."""
    return {k: torch.cat([v[:32], v[64:]]) if k.endswith("attn.c_attn.bias") else v  # queries' and values' (n_embd 32)
            for k, v in weights.items()}


@pytest.fixture(scope="module")
def one(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run(data_dir, out, *STEPS)
    return out


@pytest.fixture(scope="module")
def ddp(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(data_dir, out)
    return out


@pytest.fixture(scope="module")
def fsdp(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(data_dir, out, "--fsdp")
    return out


def test_fsdp_trains_as_ddp_and_one_process(one, ddp, fsdp):
    """The same losses, validation losses and final weights; the checkpoints have the same files and format."""
    assert (read_log(fsdp)[0]["world"], read_log(fsdp)[0]["sharded"], read_log(ddp)[0]["sharded"]) == (2, True, False)
    assert "on 2 x cpu (float32, sharded by FSDP)" in (fsdp.parent / "stderr").read_text()
    assert len(losses(fsdp)) == 6 and losses(fsdp)[-1] < losses(fsdp)[0] - 1  # it learns
    for other in (ddp, one):
        assert np.allclose(losses(fsdp), losses(other), rtol=0, atol=1e-5)
        assert np.allclose(val_losses(fsdp), val_losses(other), rtol=0, atol=1e-5)
        assert_close_weights(*(without_key_biases(final_weights(run)) for run in (fsdp, other)))
    saved = [torch.load(run / "step_0000006" / "train_state.pt", weights_only=True) for run in (fsdp, ddp)]
    assert saved[0].keys() == saved[1].keys() and saved[0]["step"] == 6
    optimizers = [s["optimizer"] for s in saved]  # numbered parameters, as optimizer.state_dict() has them
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]
    assert optimizers[0]["state"].keys() == optimizers[1]["state"].keys() == set(range(len(optimizers[0]["state"])))
    for i, state in optimizers[0]["state"].items():
        assert state.keys() == optimizers[1]["state"][i].keys()
        for name, value in state.items():
            assert value.shape == optimizers[1]["state"][i][name].shape
            assert torch.allclose(value, optimizers[1]["state"][i][name], atol=1e-6, rtol=1e-3), (i, name)
    assert sorted(p.name for p in (fsdp / "step_0000006").iterdir()) == sorted(
        p.name for p in (ddp / "step_0000006").iterdir())


def test_a_resumed_fsdp_run_ends_as_an_uninterrupted_one(data_dir, fsdp, one, tmp_path):
    """A copy of the sharded run stopped after step 3's checkpoint, resumed with --fsdp: bit for bit the
    uninterrupted run's weights; the same checkpoint resumed by one process: the one-process run's. The sharded
    resume finds step 6's checkpoint corrupted: rank 0 alone reads it, and both processes skip it together."""
    for resumer in ("fsdp", "one"):
        out = tmp_path / resumer
        shutil.copytree(fsdp, out)
        if resumer == "fsdp":
            with open(out / "step_0000006" / "model.safetensors", "r+b") as f:
                f.seek(-8, os.SEEK_END)
                f.write(b"\0" * 8)
            err = torchrun(data_dir, out, "--fsdp", "--resume")
            assert err.count("skipping checkpoint") == 2 and "sha256 does not match" in err  # one line a process
            assert "resuming from" in err and "step_0000003" in err
            assert_same_weights(final_weights(out), final_weights(fsdp))
        else:
            shutil.rmtree(out / "step_0000006")
            run(data_dir, out, *STEPS, "--resume")
            assert_close_weights(final_weights(out), final_weights(one))
        assert [r["step"] for r in read_log(out) if r["type"] == "train"] == list(range(1, 7))
        assert [p.name for p in step_checkpoints(out)] == ["step_0000003", "step_0000006"]


def test_a_sharded_resume_reads_the_checkpoint_on_rank_0_only(fsdp, monkeypatch):
    """Rank 1 of a sharded resume opens no checkpoint: it takes rank 0's counters and loads its shards from rank 0
    (load_into_shards with empty states)."""
    import train
    saved = load_checkpoint(fsdp / "step_0000006", train_state=True)[2]
    counters = {k: v for k, v in saved.items() if k != "optimizer"}
    loads = []

    def from_rank_0(objects, src):
        assert src == 0 and objects == [None, None]  # rank 1 read nothing of its own
        objects[:] = [None, counters]

    monkeypatch.setattr(train, "load_checkpoint", lambda *a, **k: pytest.fail("rank 1 read a checkpoint"))
    monkeypatch.setattr(train.dist, "broadcast_object_list", from_rank_0)
    monkeypatch.setattr(train, "load_into_shards", lambda model, opt, weights, state: loads.append((weights, state)))
    state, ckpt = train.resume(fsdp, None, None, None, master=False, sharded=True, data_fingerprint="unread",
                               tokens_per_step=0, seed=0)
    assert (state.step, ckpt.name, loads) == (6, "step_0000006", [({}, {})])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_compiled_model_trains_as_the_eager_one(data_dir, ddp, fsdp, tmp_path, parallel):
    """--compile_cpu aot_eager compiles the DDP or FSDP model on the CPU (as CUDA runs compile it, with inductor):
    the same losses, and the driver sees Dynamo's graphs."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from torch._dynamo.utils import counters\n"
        "import pretrain\n"
        "pretrain.main(sys.argv[1:])\n"
        "print(json.dumps({'graphs': counters['stats']['unique_graphs']}), file=sys.stderr)\n")
    out = tmp_path / "run"
    err = torchrun(data_dir, out, "--compile_cpu", "aot_eager", *(["--fsdp"] if parallel == "fsdp" else []),
                   script=str(driver))
    # the two processes share stderr, so their lines can run together: find the records, not lines
    graphs = [int(n) for n in re.findall(r'\{"graphs": (\d+)\}', err)]
    assert len(graphs) == 2 and all(g >= 1 for g in graphs)  # each process compiled its model
    eager = {"ddp": ddp, "fsdp": fsdp}[parallel]
    assert np.allclose(losses(out), losses(eager), rtol=0, atol=1e-5)
    assert np.allclose(val_losses(out), val_losses(eager), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "muon"], "field 'optimizer' muon does not work with fsdp"),
    (["--data_vocab"], "field 'data_vocab' does not work with fsdp"),
])
def test_fsdp_refuses_what_it_cannot_shard(data_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "run", "--fsdp", *args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_fsdp_on_one_process_trains_unsharded_and_says_so(data_dir, one, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, *STEPS, "--fsdp")
    assert "--fsdp shards across torchrun's processes; with one process it trains unsharded" in capsys.readouterr().err
    assert read_log(out)[0]["sharded"] is False
    assert losses(out) == losses(one)
    assert_same_weights(final_weights(out), final_weights(one))


def test_fsdp_with_float16_and_its_gradient_scaler_trains_as_one_process(data_dir, tmp_path):
    """float16 autocast and the gradient scaler over DTensor gradients: one process's losses and weights (to
    float16's rounding, which sums in another order)."""
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    torchrun(data_dir, sharded, "--fsdp", "--dtype", "float16")
    run(data_dir, one, *STEPS, "--dtype", "float16")
    assert np.allclose(losses(sharded), losses(one), rtol=0, atol=1e-4)
    assert_close_weights(*(without_key_biases(final_weights(out)) for out in (sharded, one)), atol=1e-4)
    scales = [torch.load(out / "step_0000006" / "train_state.pt", weights_only=True)["scaler"]["scale"]
              for out in (sharded, one)]
    assert scales == [65536.0, 65536.0]  # the scaler was on (its initial scale), and no step overflowed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fsdp_gathers_the_weights_in_the_precision_the_forward_computes_in(dtype, monkeypatch):
    """Under bf16 autocast each block's weights are gathered in bf16 (half the bytes), the shards stay fp32 for the
    optimizer; in fp32 the gathers are fp32. One in-process gloo rank: the gathers and casts are FSDP2's all the
    same."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, rope=True, smear=True))
        shard(model, dtype)
        seen = []
        model.h[0].attn.c_attn.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        idx = torch.randint(100, (2, 17))
        model(idx[:, :-1], idx[:, 1:]).backward()
        assert seen == [dtype]
        assert {(p.dtype, p.grad.dtype) for p in model.parameters()} == {(torch.float32, torch.float32)}
    finally:
        dist.destroy_process_group()
