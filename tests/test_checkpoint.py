import json
import os
import stat
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, export_hf, load_checkpoint, load_hf, resolve, save_checkpoint
from model import GPT


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_with_train_state(tiny_model, tmp_path):
    state = {"step": 7, "rng": torch.get_rng_state(), "opt": {"lr": 0.1, "t": torch.ones(3)}}
    save_checkpoint(tmp_path / "ck", tiny_model, provenance={"step": 7, "tokens": 1000}, train_state=state)
    model, config, ts = load_checkpoint(tmp_path / "ck", train_state=True)
    assert same_weights(model, tiny_model)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert config["provenance"]["step"] == 7 and config["tokenizer"]["special_tokens"]["<|end|>"] == 50260
    assert ts["step"] == 7 and torch.equal(ts["rng"], state["rng"])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]


def test_overwrite_is_atomic_and_leaves_no_temporaries(tiny_model, tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model)
    other = GPT(tiny_model.config)
    save_checkpoint(tmp_path / "ck", other)
    assert same_weights(load_checkpoint(tmp_path / "ck")[0], other)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_weights_get_the_permissions_of_the_other_files(tiny_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        folders = [save_checkpoint(tmp_path / "ck", tiny_model, train_state={"step": 1}),
                   export_hf(tiny_model, tmp_path / "hf")]
    finally:
        os.umask(old)
    for folder in folders:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_run_folder_resolves_to_best_then_newest_step(tiny_model, tmp_path):
    for step in (100, 200):
        save_checkpoint(tmp_path / f"step_{step:07d}", tiny_model)
    (tmp_path / "step_0000300.tmp-1").mkdir()  # a half-written one is ignored
    assert resolve(tmp_path).name == "step_0000200"
    save_checkpoint(tmp_path / "best", tiny_model)
    assert resolve(tmp_path).name == "best"


def test_truncated_checkpoint_is_refused(tiny_model, tmp_path):
    ck = save_checkpoint(tmp_path / "ck", tiny_model)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ck)


def test_corrupted_checkpoint_is_refused(tiny_model, tmp_path):
    ck = save_checkpoint(tmp_path / "ck", tiny_model)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(ck)


def test_mismatched_shapes_and_tokenizer_are_refused(tiny_model, tmp_path):
    ck = save_checkpoint(tmp_path / "ck", tiny_model)
    config = json.loads((ck / "config.json").read_text())
    config["model"]["n_embd"] = 64
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_checkpoint(ck)
    config["model"]["n_embd"] = 32
    config["tokenizer"]["special_tokens"]["<|end|>"] = 50300
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_export_and_import_hf_layout_without_transformers(tiny_model, tmp_path):
    out = export_hf(tiny_model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["vocab_size"] == 50304
    back = load_hf(out)
    assert same_weights(back, tiny_model)


def snapshot(folder):
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("target", ["run", "run/best", "file", "notes", "export+notes"])
def test_export_refuses_to_replace_anything_but_an_empty_folder_or_an_export(tiny_model, tmp_path, target):
    save_checkpoint(tmp_path / "run" / "step_0000010", tiny_model, train_state={"step": 10})
    save_checkpoint(tmp_path / "run" / "best", tiny_model)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    export_hf(tiny_model, tmp_path / "export+notes")
    (tmp_path / "export+notes" / "README.md").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder" if target == "file" else "neither empty nor an earlier"):
        export_hf(tiny_model, tmp_path / target)
    assert snapshot(tmp_path) == before  # nothing written, moved or left beside it


def test_export_replaces_an_empty_folder_or_an_earlier_export(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    export_hf(tiny_model, tmp_path / "empty")
    other = GPT(tiny_model.config)
    assert export_hf(other, tmp_path / "empty") == (tmp_path / "empty").resolve()  # over the earlier export
    assert same_weights(load_hf(tmp_path / "empty"), other)
    monkeypatch.chdir(tmp_path / "empty")
    assert export_hf(tiny_model, ".") == (tmp_path / "empty").resolve()  # the current folder, by its resolved name
    assert same_weights(load_hf(tmp_path / "empty"), tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_hf_gpt2_vocab_is_padded(tmp_path):
    """An original GPT-2 directory has 50257 tokens; we pad to 50304 and keep its rows."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    ours = load_checkpoint(tmp_path / "gpt2")[0].eval()
    assert ours.config.vocab_size == 50304
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(x)[..., :50257], hf(x).logits, atol=1e-4)


def test_export_matches_transformers_logits(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    import subprocess
    import sys
    ck = save_checkpoint(tmp_path / "ck", tiny_model)
    subprocess.run([sys.executable, "export_hf.py", str(ck), str(tmp_path / "hf")], check=True,
                   cwd=__import__("conftest").ROOT)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50261, (2, 30))
    with torch.no_grad():
        assert torch.allclose(tiny_model(x), hf(x).logits, atol=1e-4)


def test_a_folder_replaced_while_a_reader_looks_is_the_old_or_the_new_one_whole(tmp_path):
    """atomic.replace_dir: the old folder stays whole until the new one is in place, and leaves nothing behind."""
    from atomic import replace_dir, write_text
    out = tmp_path / "out"
    for version in ("one", "two"):
        tmp = tmp_path / f"out.tmp-{version}"
        tmp.mkdir()
        write_text(tmp / "meta.json", version)
        replace_dir(tmp, out)
        assert (out / "meta.json").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_replaced_folder_is_on_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """atomic.replace_dir flushes every file and folder of the new one (fsync) before it takes the real name, and
    the parent folder's entries after; write_text the same for a file. Without it a crash soon after a save can
    leave an empty file under its real name."""
    import atomic
    events = []
    sync = atomic.sync
    monkeypatch.setattr(atomic, "sync", lambda path: (events.append(("sync", Path(path).name)), sync(path)))
    replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), replace(a, b)))
    tmp = tmp_path / "out.tmp-1"
    (tmp / "train").mkdir(parents=True)
    (tmp / "train" / "shard.bin").write_bytes(b"1")
    (tmp / "meta.json").write_text("{}")
    atomic.replace_dir(tmp, tmp_path / "out")
    assert events[-2:] == [("rename", "out"), ("sync", tmp_path.name)]
    assert sorted(events[:-2]) == [("sync", "meta.json"), ("sync", "out.tmp-1"), ("sync", "shard.bin"),
                                   ("sync", "train")]
    assert events[-3] == ("sync", "out.tmp-1")  # the folder itself last, after its entries' files
    events.clear()
    atomic.write_text(tmp_path / "eval.md", "x")
    assert events == [("sync", f"eval.md.tmp-{os.getpid()}"), ("rename", "eval.md"), ("sync", tmp_path.name)]
    assert (tmp_path / "eval.md").read_text() == "x"


def test_step_checkpoints_are_ordered_by_their_number_past_the_padding(tmp_path):
    from checkpoint import step_checkpoints
    for name in ("step_9999999", "step_10000000", "step_0000400", "step_0000800.tmp-12", "step_best", "step_\u00b2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_0000400", "step_9999999", "step_10000000"]
