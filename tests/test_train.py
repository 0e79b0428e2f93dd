"""The training loop (train.py) and pretraining (pretrain.py) on a 2-layer, 32-wide model and synthetic shards."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import pretrain
import train
from checkpoint import export_hf, load_checkpoint, step_checkpoints
from config import ModelConfig, TrainConfig
from model import GPT, LinearCrossEntropy
from shard_data import ShardData
from shards import write_shard
from train import Meter, lr_at, micro_steps, planned_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_batches", "2", "--warmup_steps", "2", "--lr", "1e-2", "--log_every", "1", "--eval_every", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Shards of a repeating 64-token cycle: easy to learn, so the loss must fall fast."""
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", 20_000), ("val", 2_000)):
        (d / split).mkdir()
        write_shard(d / split / "000.bin", np.tile(np.arange(100, 164), n // 64))
    return d


def run(data_dir, out, *args):
    pretrain.main(["--data", str(data_dir), "--out", str(out), *TINY, *args])


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_checkpoint(step_checkpoints(out)[-1])[0].state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_close_weights(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 12-step run, checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(data_dir, out, "--max_steps", "12", "--save_every", "4")
    return out


def test_loss_falls_and_run_folder_is_complete(reference):
    log = read_log(reference)
    assert log[0]["type"] == "run" and log[0]["kind"] == "pretrain" and log[0]["config"]["model"]["n_layer"] == 2
    train = [r for r in log if r["type"] == "train"]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13)) and train[-1]["tokens"] == 12 * 4 * 32
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[0]["val_loss"] > 10 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 3
    assert train[-1]["loss"] < train[0]["loss"] - 3
    assert all(r["mfu"] is None and r["tok_per_s"] > 0 for r in train)  # no MFU on the CPU
    assert [p.name for p in step_checkpoints(reference)] == ["step_0000004", "step_0000008", "step_0000012"]
    model, config, state = load_checkpoint(reference / "best", train_state=False)
    assert config["provenance"]["step"] == 12 and config["provenance"]["val_loss"] == evals[-1]["val_loss"]
    assert config["provenance"]["data"].startswith("sha256:") and config["train"]["max_steps"] == 12
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_last_prunes_old_checkpoints_and_a_new_run_replaces_the_old(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path / "run", "--max_steps", "6", "--save_every", "1", "--keep_last", "2")
    assert [p.name for p in step_checkpoints(tmp_path / "run")] == ["step_0000005", "step_0000006"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "log.jsonl", "loss.png", "step_0000005",
                                                                   "step_0000006"]
    run(data_dir, tmp_path / "run", "--max_steps", "2", "--save_every", "0")  # not --resume: a new run
    assert "deleting the 3 checkpoints of the earlier run" in capsys.readouterr().err
    assert [p.name for p in step_checkpoints(tmp_path / "run")] == ["step_0000002"]
    assert max(r.get("step", 0) for r in read_log(tmp_path / "run")) == 2


def test_sigterm_then_resume_is_bit_for_bit(data_dir, reference, tmp_path, monkeypatch):
    """SIGTERM while step 6's batch is read (prefetched during step 5) finishes step 5 and saves its result,
    step_0000006; resuming from there gives the uninterrupted run's weights."""
    batch = ShardData.batch

    def batch_then_sigterm(self, step, micro, rank, world):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, step, micro, rank, world)

    out = tmp_path / "run"
    monkeypatch.setattr(ShardData, "batch", batch_then_sigterm)
    run(data_dir, out, "--max_steps", "12", "--save_every", "4")
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004", "step_0000006"]
    end = read_log(out)[-1]
    assert (end["type"], end["step"], end["reason"]) == ("end", 6, "interrupted")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is uninstalled afterwards

    monkeypatch.setattr(ShardData, "batch", batch)
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--resume")
    assert_same_weights(final_weights(out), final_weights(reference))
    steps = [r["step"] for r in read_log(out) if r["type"] == "train"]
    assert steps == list(range(1, 13))  # one record per step, none repeated
    assert [(r["step"], r["reason"]) for r in read_log(out) if r["type"] == "end"] == [(12, "reached max_steps (12)")]
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--resume")  # a finished run: nothing to do
    assert [r["step"] for r in read_log(out) if r["type"] == "end"] == [12]  # the interrupted run's end went too


def test_resume_skips_a_corrupted_checkpoint(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--keep_last", "5")
    newest = step_checkpoints(out)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: the size recorded in config.json no longer matches
    capsys.readouterr()
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--resume")
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_0000012" in err and "resuming from" in err and "step_0000008" in err
    assert_same_weights(final_weights(out), final_weights(reference))


def test_kill_9_while_saving_then_resume_is_bit_for_bit(data_dir, reference, tmp_path):
    """A real SIGKILL in the middle of writing step 8's checkpoint; resume ignores the half-written directory."""
    out = tmp_path / "run"
    driver = (
        "import os, signal, sys\n"
        "import checkpoint, pretrain\n"
        "save_file = checkpoint.save_file\n"
        "def save_then_die(state, path, *a, **k):\n"
        "    save_file(state, path, *a, **k)\n"
        "    if 'step_0000008' in str(path): os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.save_file = save_then_die\n"
        "pretrain.main(sys.argv[1:])\n")
    args = ["--data", str(data_dir), "--out", str(out), *TINY, "--max_steps", "12", "--save_every", "4"]
    proc = subprocess.run([sys.executable, "-c", driver, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in out.glob("step_0000008.tmp-*")], "the kill should leave a half-written checkpoint"
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004"]

    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--resume")
    assert not list(out.glob("*.tmp-*"))
    assert_same_weights(final_weights(out), final_weights(reference))


def test_kill_9_while_replacing_best_keeps_a_best(data_dir, tmp_path):
    """A checkpoint that replaces another (RUN/best at each better validation loss) takes two renames: the old one
    aside, the new one in. A SIGKILL between them leaves no RUN/best; the next run in the folder finishes the
    replacement instead of deleting both as leftovers."""
    out = tmp_path / "run"
    driver = (
        "import os, signal, sys\n"
        "import pretrain\n"
        "replace = os.replace\n"
        "def replace_then_die(src, dst):\n"
        "    replace(src, dst)\n"
        "    if os.path.basename(dst).startswith('best.old-'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace_then_die\n"
        "pretrain.main(sys.argv[1:])\n")
    args = ["--data", str(data_dir), "--out", str(out), *TINY, "--max_steps", "8", "--save_every", "2",
            "--eval_every", "4"]
    proc = subprocess.run([sys.executable, "-c", driver, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "best").exists() and [p.name for p in step_checkpoints(out)] == ["step_0000002"]

    run(data_dir, out, "--max_steps", "2", "--save_every", "2", "--resume")  # nothing left to train
    assert load_checkpoint(out / "best")[1]["provenance"]["step"] == 4  # the new best, written whole before the kill
    assert not list(out.glob("best.*"))


def test_a_checkpoint_is_written_while_training_goes_on(data_dir, reference, tmp_path, monkeypatch):
    """A save copies the state, and a background thread writes it: step 4's checkpoint, held back until the loop
    reads step 6's batch (the weights have changed since), still holds step 4's state, and resuming from it ends as
    the uninterrupted run. (A save that wrote in the loop would wait for itself until the timeout.)"""
    later, writers = threading.Event(), []
    batch, write = ShardData.batch, train.write_checkpoint

    def batch_and_note(self, step, micro, rank, world):
        if step == 6:
            later.set()
        return batch(self, step, micro, rank, world)

    def write_later(path, *args, **kwargs):
        if path.name == "step_0000004":
            writers.append((threading.current_thread().name, later.wait(timeout=30)))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(ShardData, "batch", batch_and_note)
    monkeypatch.setattr(train, "write_checkpoint", write_later)
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "12", "--save_every", "4")
    assert len(writers) == 1 and writers[0][0].startswith("checkpoint") and writers[0][1]
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004", "step_0000008", "step_0000012"]
    for newer in ("step_0000008", "step_0000012"):
        shutil.rmtree(out / newer)
    run(data_dir, out, "--max_steps", "12", "--save_every", "4", "--resume")
    assert_same_weights(final_weights(out), final_weights(reference))


def test_sigterm_subprocess_saves_and_exits_0(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--data", str(data_dir), "--out", str(out), *TINY,
                             "--max_steps", "100000", "--save_every", "0"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not ((out / "log.jsonl").exists() and '"train"' in (out / "log.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    end = read_log(out)[-1]
    assert end["type"] == "end" and end["reason"] == "interrupted" and 1 <= end["step"] < 100000
    assert [p.name for p in step_checkpoints(out)] == [f"step_{end['step']:07d}"]
    assert "SIGTERM" in err and "--resume" in err


def test_a_run_folder_in_use_by_another_run_is_refused(data_dir, tmp_path, capsys):
    """Two runs in one folder would interleave their logs and overwrite each other's checkpoints (a torchrun killed
    with SIGKILL leaves its workers training; a second --resume then runs beside them): a run that finds the folder
    locked stops with exit code 2 and touches nothing; once the other ends, it resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--data", str(data_dir), "--out", str(out), *TINY,
                             "--max_steps", "100000", "--save_every", "2"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while not step_checkpoints(out):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        for args in (["--resume"], []):
            with pytest.raises(SystemExit) as e:
                run(data_dir, out, "--max_steps", "2", *args)
            assert e.value.code == 2 and "is in use by another run" in capsys.readouterr().err
        assert not [r for r in read_log(out) if r["type"] in ("resume", "end")] and step_checkpoints(out)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    stopped = read_log(out)[-1]["step"]
    run(data_dir, out, "--max_steps", str(stopped + 1), "--resume")
    assert read_log(out)[-1] == {**read_log(out)[-1], "type": "end", "step": stopped + 1}



def test_a_system_without_flock_trains_unguarded_with_a_warning(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "fcntl", None)  # as on Windows
    run(data_dir, tmp_path / "run", "--max_steps", "1")
    assert "cannot be locked on this system" in capsys.readouterr().err
    assert read_log(tmp_path / "run")[-1]["type"] == "end"

class Poison:
    """Makes the training loss NaN for optimizer steps first..last (0-based; one micro-batch per step): a forward
    hook on the final LayerNorm that counts the training-mode forward passes."""

    def __init__(self, first, last):
        self.first, self.last, self.calls = first, last, 0

    def hook(self, module, inputs, out):
        if not module.training:
            return out
        self.calls += 1
        return out * float("nan") if self.first <= self.calls - 1 <= self.last else out

    def install(self, monkeypatch):
        init, poison = pretrain.GPT.__init__, self

        def init_with_hook(self, cfg):
            init(self, cfg)
            self.ln_f.register_forward_hook(poison.hook)

        monkeypatch.setattr(pretrain.GPT, "__init__", init_with_hook)


def test_a_non_finite_step_is_skipped(data_dir, tmp_path, monkeypatch, capsys):
    Poison(3, 4).install(monkeypatch)
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "8", "--save_every", "0")
    log = read_log(out)
    losses = {r["step"]: r["loss"] for r in log if r["type"] == "train"}
    # a skipped step's loss is logged as null (NaN is not JSON: jq and other readers refuse it)
    assert losses[4] is None and losses[5] is None and all(math.isfinite(losses[s]) for s in (1, 2, 3, 6, 7, 8))
    assert "NaN" not in (out / "log.jsonl").read_text()
    assert log[-1]["skipped_steps"] == 2 and log[-1]["step"] == 8
    assert "step 4: non-finite loss" in capsys.readouterr().err


def test_too_many_non_finite_steps_stop_the_run(data_dir, tmp_path, monkeypatch):
    Poison(5, 10**9).install(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, "--max_steps", "50", "--save_every", "4", "--max_bad_steps", "3")
    assert "3 steps in a row" in str(e.value) and "max_bad_steps=3" in str(e.value) and "step_0000004" in str(e.value)
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004"]
    model, _, state = load_checkpoint(out / "step_0000004", train_state=True)  # intact and loadable
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    assert read_log(out)[-1]["type"] == "stopped"


def test_torchrun_two_processes_match_one_process_with_accumulation(data_dir, tmp_path):
    """2 processes x 2 micro-batches (DDP, gradients averaged on the second) == 1 process x 4 micro-batches."""
    steps = ["--max_steps", "4", "--save_every", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(data_dir, one, *steps, "--batch_tokens", str(4 * 4 * 32))  # 4 accumulation steps
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                           "--nproc_per_node", "2", "pretrain.py", "--data", str(data_dir), "--out", str(two), *TINY,
                           *steps, "--batch_tokens", str(4 * 4 * 32)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_log(one), read_log(two)]
    assert runs[0][0]["grad_accum"] == 4 and runs[1][0]["grad_accum"] == 2 and runs[1][0]["world"] == 2
    curves = [[(r["step"], r["tokens"], r["loss"]) for r in log if r["type"] == "train"] for log in runs]
    assert [c[:2] for c in curves[0]] == [c[:2] for c in curves[1]] and len(curves[0]) == 4
    assert np.allclose([c[2] for c in curves[0]], [c[2] for c in curves[1]], rtol=1e-4)
    vals = [[r["val_loss"] for r in log if r["type"] == "eval"] for log in runs]
    assert np.allclose(vals[0], vals[1], rtol=1e-4)


def test_data_batches_are_pure_functions_of_step_micro_rank(data_dir, tmp_path):
    d = tmp_path / "two_shards"
    (d / "train").mkdir(parents=True)
    (d / "val").mkdir()
    write_shard(d / "train" / "a.bin", np.full(100, 7))
    write_shard(d / "train" / "b.bin", np.full(100, 9))
    write_shard(d / "val" / "a.bin", np.arange(50))
    data = ShardData(d, block_size=16, batch_size=64, seed=1, eval_batches=3)
    x, y = data.batch(5, 1, 0, 1)
    assert torch.equal(x, data.batch(5, 1, 0, 1)[0]) and not torch.equal(x, data.batch(6, 1, 0, 1)[0])
    assert torch.equal(x, data.batch(5, 0, 1, 2)[0])  # micro 1 on one process == micro 0 of rank 1 on two
    assert x.shape == (64, 16) and x.dtype == torch.long
    assert set(x[:, 0].tolist()) == {7, 9} and all(len(set(row.tolist())) == 1 for row in x)  # no window spans shards
    val = data.val_batches()
    assert len(val) == 3 and torch.equal(val[0][1][:, :-1], val[0][0][:, 1:])  # y is x shifted by one
    assert data.fingerprint == ShardData(d, 16, 64, 2, 1).fingerprint


@pytest.mark.parametrize("args, message", [([], "no token shards in"),
                                           (["--schedule", "linear"], "field 'schedule' expects one of cosine"),
                                           (["--batch_size", "0"], "field 'batch_size' expects a value >= 1"),
                                           (["--min_lr_ratio", "-2"], "field 'min_lr_ratio' expects a value in [0, 1]"),
                                           (["--n_head", "3"], "field 'n_head': n_embd 32 must split into 3 heads"),
                                           (["--rope", "--n_head", "32"], "even (rope rotates pairs)"),
                                           (["--block_size", "0"], "field 'block_size' expects a value >= 1"),
                                           (["--dropout", "1.5"], "field 'dropout' expects a value in [0, 1)"),
                                           (["--device", "gpu"], "field 'device' expects auto, cpu, cuda")]
                         + ([] if torch.cuda.is_available() else
                            [(["--device", "cuda"], "this torch sees no CUDA GPU")]))
def test_pretrain_reports_bad_input_with_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *TINY, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_other_data_or_options_and_keeps_it(data_dir, tmp_path, capsys):
    """Torch loads an optimizer's moments without checking their shapes, and a fused step then writes past the end
    of ones too small (a crash, or silently wrong training): a checkpoint that does not fit is refused."""
    other = tmp_path / "other"  # other shards: another cycle
    for split, n in (("train", 20_000), ("val", 2_000)):
        (other / split).mkdir(parents=True)
        write_shard(other / split / "000.bin", np.tile(np.arange(200, 232), n // 32))
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "4", "--save_every", "4", "--data_vocab")
    for data, args, message in ((other, ["--data_vocab"], "was trained on other data"),
                                (data_dir, [], "do not fit this run's"),  # without --data_vocab: other shapes
                                (data_dir, ["--data_vocab", "--optimizer", "muon"], "optimizer state")):
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--data", str(data), "--out", str(out), *TINY, "--max_steps", "8", "--resume", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err, args
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004"] and (out / "best").is_dir()
    run(data_dir, out, "--max_steps", "8", "--save_every", "4", "--data_vocab", "--resume")  # the right options
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004", "step_0000008"]


def test_resume_refuses_another_batch_per_step_or_seed_and_takes_another_split_of_it(data_dir, tmp_path, capsys):
    """A step is a number of tokens (batch_size x block_size x micro-batches x processes): with another, a resumed
    run's steps would read other data (a fine-tuning run repeats or skips part of its epoch) and a max_tokens
    schedule would be sized for steps it does not take. The same tokens per step split otherwise resume."""
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "4", "--save_every", "4", "--batch_tokens", "256")  # 2 x 4 x 32
    for args in (["--batch_tokens", "128"], ["--batch_tokens", "256", "--batch_size", "16"]):
        with pytest.raises(SystemExit) as e:
            run(data_dir, out, "--max_steps", "8", "--resume", *args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "field 'batch_tokens'" in err and "256 tokens per step" in err, args
        assert "--batch_tokens 256" in err
    with pytest.raises(SystemExit) as e:  # the data order is the seed's too
        run(data_dir, out, "--max_steps", "8", "--resume", "--batch_tokens", "256", "--seed", "7")
    assert e.value.code == 2 and "field 'seed'" in capsys.readouterr().err
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004"]
    run(data_dir, out, "--max_steps", "8", "--save_every", "4", "--resume", "--batch_tokens", "256",
        "--batch_size", "2")  # 4 x 2 x 32
    assert [p.name for p in step_checkpoints(out)] == ["step_0000004", "step_0000008"]


def test_resume_leaves_a_run_none_of_whose_checkpoints_loads(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "8", "--save_every", "4")
    for ckpt in step_checkpoints(out):  # as a full disk might leave them
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, "--max_steps", "8", "--save_every", "4", "--resume")
    assert e.value.code == 2 and "no checkpoint in" in capsys.readouterr().err
    assert len(step_checkpoints(out)) == 2 and (out / "best").is_dir() and (out / "log.jsonl").exists()


def test_the_last_step_is_logged_and_the_stop_names_its_limit(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "7", "--log_every", "5", "--save_every", "0")
    assert "reached max_steps (7) at step 7, validation loss " in capsys.readouterr().err
    log = read_log(out)
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 5, 7]  # the curve reaches the end
    assert log[-1]["reason"] == "reached max_steps (7)"
    run(data_dir, out, "--max_steps", "0", "--max_tokens", "500", "--save_every", "0")  # 4 steps of 128 tokens
    assert read_log(out)[-1] == {**read_log(out)[-1], "step": 4, "reason": "reached max_tokens (500)"}


def test_batch_tokens_are_reached_not_rounded_down():
    cfg = TrainConfig(batch_size=4, batch_tokens=500)  # 128 tokens a micro-batch of 32-token windows
    assert [micro_steps(cfg, 32, world) for world in (1, 2, 8)] == [4, 2, 1]
    assert micro_steps(TrainConfig(batch_size=4, batch_tokens=512), 32, 1) == 4


def test_learning_rate_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "wsd"
    cfg.decay_fraction = 0.2
    assert lr_at(50, cfg, 110) == 1.0 and lr_at(88, cfg, 110) == 1.0
    assert lr_at(99, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "constant"
    assert lr_at(5, cfg, 110) == pytest.approx(0.6) and lr_at(100, cfg, 110) == 1.0


def test_the_schedule_fits_a_time_limit():
    """With max_time, the schedule's length is the steps that fit at the current pace, so the decay ends in time."""
    cfg = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, max_time=100.0)
    assert planned_steps(10, cfg, 1000, elapsed=10.0, sec_per_step=1.0) == 100  # 90 s left at 1 s a step
    assert planned_steps(10, cfg, 50, elapsed=10.0, sec_per_step=1.0) == 50  # the step limit comes first: exact
    assert planned_steps(10, cfg, math.inf, elapsed=10.0, sec_per_step=None) == math.inf  # no pace yet
    assert lr_at(99, cfg, planned_steps(99, cfg, 1000, elapsed=99.9, sec_per_step=1.0)) == pytest.approx(0.1, abs=1e-3)
    cfg.schedule = "wsd"
    assert lr_at(5, cfg, math.inf) == 1.0


def test_a_few_slow_steps_barely_move_a_time_limited_schedule_and_a_slower_machine_does():
    """The steps after a checkpoint run slower (its writer shares the cores): the plan, and so the learning rate,
    must hardly move. A machine that stays slower must shorten the plan, so that the decay still ends in time."""
    meter = Meter(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)), torch.device("cpu"),
                  torch.float32, world=1)
    cfg = TrainConfig(max_time=1000.0)
    step, elapsed = 0, 0.0

    def run(steps: int, dt: float) -> float:
        nonlocal step, elapsed
        for _ in range(steps):
            meter.update(100, 1e6, dt)
            step, elapsed = step + 1, elapsed + dt
        return planned_steps(step, cfg, math.inf, elapsed, meter.sec_per_step)

    run(1, 30.0)  # warm-up: left out of the pace
    steady = run(3000, 0.1)
    assert steady == pytest.approx(3001 + 670 / 0.1)
    assert run(10, 0.2) == pytest.approx(steady, rel=0.05)  # a moving average of recent steps dropped it 27%
    slower = run(300, 0.2)
    assert slower == pytest.approx(step + (1000 - elapsed) / 0.2)


def test_a_resumed_time_limited_run_keeps_its_schedule(data_dir, tmp_path, monkeypatch):
    """With --max_time the schedule is sized to the pace, which a new process measures only from its second step: a
    resumed run takes the pace its checkpoint saved until then, not a schedule without an end (the peak learning
    rate, in the middle of the decay). A clock that takes 1 s a step makes a stopped and resumed run the
    uninterrupted one."""
    clock = iter(np.arange(0, 1e6, 0.5))  # read three times a step: its start, the time limit, its end
    monkeypatch.setattr(train.time, "perf_counter", lambda: float(next(clock)))
    limit = ["--max_steps", "0", "--max_time", "12", "--save_every", "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(data_dir, whole, *limit)
    batch = ShardData.batch

    def batch_then_sigterm(self, step, micro, rank, world):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, step, micro, rank, world)

    monkeypatch.setattr(ShardData, "batch", batch_then_sigterm)
    run(data_dir, part, *limit)
    monkeypatch.setattr(ShardData, "batch", batch)
    run(data_dir, part, *limit, "--resume")
    rates = [[(r["step"], r["lr"]) for r in read_log(out) if r["type"] == "train"] for out in (whole, part)]
    assert len(rates[0]) == 13 and rates[1] == rates[0]
    assert_same_weights(final_weights(part), final_weights(whole))


def test_cpu_training_loss_matches_plain_cross_entropy(monkeypatch):
    """model.forward's chunked output layer + loss on the CPU (LinearCrossEntropy): the same loss and gradients."""
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK_ELEMENTS", 50304 * 10)  # 10 rows per chunk: 6 chunks and a part
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    x = torch.randint(0, 50257, (2, 32))
    y = torch.randint(0, 50257, (2, 32))
    y[0, :5] = -1  # masked positions take the x[keep] path
    for targets in (y, x):
        model.zero_grad()
        loss = model(x, targets)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        logits = model.lm_head(model.hidden_states(x))
        expected = torch.nn.functional.cross_entropy(logits.view(-1, 50304), targets.view(-1), ignore_index=-1)
        expected.backward()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        for k, p in model.named_parameters():
            assert torch.allclose(grads[k], p.grad, atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("source", ["ours", "huggingface"])
def test_init_from_continues_from_the_checkpoints_weights(data_dir, reference, tmp_path, source, capsys):
    init = reference  # a run folder: its best checkpoint
    if source == "huggingface":
        init = export_hf(load_checkpoint(reference)[0], tmp_path / "hf")
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "2", "--save_every", "0", "--init-from", str(init))
    assert "not used" not in capsys.readouterr().err  # the model fields given are the checkpoint's
    run(data_dir, tmp_path / "other", "--max_steps", "1", "--init-from", str(init), "--n_layer", "3", "--dropout", "0.5")
    assert "--init-from gives the model; not used: n_layer 3 (the checkpoint's: 2), dropout 0.5 (the checkpoint's: " \
           "0.0)" in capsys.readouterr().err
    log = read_log(out)
    assert log[0]["init_from"] == str(init)
    reference_val = [r["val_loss"] for r in read_log(reference) if r["type"] == "eval"][-1]
    assert log[1]["type"] == "eval" and log[1]["val_loss"] == pytest.approx(reference_val, abs=1e-4)


def test_data_vocab_trains_on_the_ids_in_the_shards_with_the_full_vocabulary_loss(data_dir, tmp_path):
    out = tmp_path / "run"
    run(data_dir, out, "--max_steps", "80", "--save_every", "0", "--data_vocab")
    model = load_checkpoint(out)[0]  # an ordinary model: the ids the shards never use share one embedding row
    others = torch.cat([torch.arange(0, 100), torch.arange(164, 50257), torch.arange(50261, 50304)])
    weight = model.wte.weight
    assert torch.equal(weight[others], weight[others[:1]].expand(len(others), -1))
    assert not torch.equal(weight[100], weight[101])
    chat = weight[50257:50261]  # the chat tokens keep rows of their own, for fine-tuning
    assert not torch.equal(chat[0], weight[0]) and not torch.equal(chat[0], chat[1])
    x, y = ShardData(data_dir, 32, 4, 0, 1).val_batches()[0]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert loss < 1.0  # the cycle was learned, and the other ids' logits are low
    logged = [r["val_loss"] for r in read_log(out) if r["type"] == "eval"][-1]  # the restricted loss, in training
    with torch.no_grad():
        full = [model(*batch).item() for batch in ShardData(data_dir, 32, 4, 1337, 2).val_batches()]
    assert logged == pytest.approx(sum(full) / len(full), abs=1e-4)


def test_data_vocab_trains_only_the_rows_it_uses_and_resumes_bit_for_bit(data_dir, tmp_path):
    """--data_vocab gives the optimizer one embedding row per used id and one shared row (not 50K), and a run
    stopped at step 4 and resumed ends with the weights of an uninterrupted one."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    same_lr = ["--schedule", "constant", "--warmup_steps", "0"]  # whatever max_steps says
    run(data_dir, whole, "--max_steps", "8", "--save_every", "4", "--data_vocab", *same_lr)
    saved = torch.load(whole / "step_0000008" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    rows = {v["exp_avg"].shape[0] for v in saved.values() if v["exp_avg"].dim() == 2}
    assert 64 + 4 + 1 in rows and max(rows) < 50304  # 64 ids in the shards, 4 chat tokens, the shared row
    run(data_dir, part, "--max_steps", "4", "--save_every", "4", "--data_vocab", *same_lr)
    run(data_dir, part, "--max_steps", "8", "--save_every", "4", "--data_vocab", "--resume", *same_lr)
    assert_same_weights(final_weights(part), final_weights(whole))


def test_running_train_py_says_which_script_to_run():
    proc = subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pretrain.py" in proc.stderr and "finetune.py" in proc.stderr


def test_training_on_the_cpu_takes_one_thread_per_free_core_before_and_during_the_run(monkeypatch):
    # /proc/stat ticks [user, nice, system, idle, iowait, irq, softirq, steal]: cpu1 busy with other work throughout
    start = {"cpu0": [500, 0, 100, 9000, 10, 0, 0, 0], "cpu1": [700, 0, 100, 8000, 0, 0, 0, 0]}
    busy = {"cpu0": [502, 0, 100, 9028, 10, 0, 0, 0], "cpu1": [729, 0, 101, 8000, 0, 0, 0, 0]}
    quiet = {"cpu0": [501, 0, 100, 9029, 10, 0, 0, 0], "cpu1": [701, 0, 100, 8029, 0, 0, 0, 0]}
    assert train.idle_cores(start, busy) == pytest.approx(28 / 30)
    assert train.idle_cores(start, quiet) == pytest.approx(2 * 29 / 30)

    def later(reading, busy0, busy1):  # 30 more ticks on each core, of which busy0 and busy1 busy, the rest idle
        return {cpu: [t[0] + b] + t[1:3] + [t[3] + 30 - b] + t[4:] for (cpu, t), b in zip(reading.items(), (busy0, busy1))}

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    try:
        clock = {"wall": 0.0, "own": 0.0}  # time.monotonic and this process's CPU time
        monkeypatch.setattr(train.time, "monotonic", lambda: clock["wall"])
        monkeypatch.setattr(train.time, "process_time", lambda: clock["own"])
        # Before training, this process is idle: the idle cores decide.
        for after, expect_threads, expect_note in ((quiet, 2, ""), (busy, 1, "not 2: other work leaves 0.9 of the 2 cores free")):
            readings = iter([start, after])
            monkeypatch.setattr(train, "cpu_times", lambda cpus: next(readings))
            torch.set_num_threads(2)
            note = train.CpuThreads().start(seconds=0)
            assert torch.get_num_threads() == expect_threads and expect_note in note and bool(note) == bool(expect_note)

        # During training, the cores this process keeps busy count as free; the threads follow other work both
        # ways, and nothing is read before `every` seconds have passed.
        both_busy = later(start, 30, 30)
        readings = iter([start, both_busy, later(both_busy, 30, 30), later(later(both_busy, 30, 30), 1, 30)])
        monkeypatch.setattr(train, "cpu_times", lambda cpus: next(readings))
        torch.set_num_threads(2)
        cpu = train.CpuThreads(every=10)
        clock.update(wall=9.0, own=18.0)
        assert cpu.adjust() == "" and torch.get_num_threads() == 2  # too soon: no reading taken
        clock.update(wall=10.0, own=20.0)  # both cores busy, all of it this process: nothing else runs
        assert cpu.adjust() == "" and torch.get_num_threads() == 2
        clock.update(wall=20.0, own=32.0)  # both cores busy, 1.2 of them this process: another job started
        assert "1 torch thread(s), not 2" in cpu.adjust() and torch.get_num_threads() == 1
        clock.update(wall=30.0, own=42.0)  # cpu0 idle 29 of 30 ticks, one core's worth of this process: it ended
        assert "2 torch thread(s), not 1" in cpu.adjust() and torch.get_num_threads() == 2

        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands, and nothing is read
        monkeypatch.setattr(train, "cpu_times", lambda cpus: pytest.fail("read /proc/stat"))
        cpu = train.CpuThreads(every=0)
        assert cpu.start(seconds=0) == "" and cpu.adjust() == "" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
