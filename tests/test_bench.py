"""bench.py's entry points on tiny inputs, so that they keep running: the figures themselves are not checked, only
that each bench completes, agrees with its reference where it checks one, and prints its table."""

import gzip
import json
import re
import subprocess
import time
import sys

import pytest
import torch

import bench
import tokenizer
from checkpoint import save_checkpoint
from config import ModelConfig
from conftest import ROOT
from model import GPT
from test_train import data_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = [f"Document {i}: the quick brown fox — naïve café {i * 7} jumps.\nSecond line." for i in range(20)]


def rates(out: str) -> list[float]:
    return [float(r.replace(",", "")) for r in re.findall(r"([\d,]+) tokens/s", out)]


def test_tokenizer_bench_counts_the_same_tokens_as_tiktoken(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    bench.bench_tokenizer([str(corpus), "--rounds", "1"])
    out = capsys.readouterr().out
    every_tenth = sum(len(tokenizer.encode(t)) for t in TEXTS[::10])
    assert f"small round 1: {every_tenth:,} tokens" in out
    assert f"large round 1: {sum(len(tokenizer.encode(t)) for t in TEXTS):,} tokens" in out
    assert re.search(r"^\| large \| 0\.0M \| [\d.]+M tok/s \| [\d.]+M tok/s \|", out, re.M)


def test_train_bench_times_ours_and_transformers(capsys):
    pytest.importorskip("transformers")
    bench.bench_train(["--preset", "tiny", "--batch_size", "1", "--rounds", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert "preset tiny: 4 layers, 128 wide, context 256, batch 1x256" in out
    assert "transformers GPT2LMHeadModel" in out and "ratio ours / transformers" in out
    assert len(rates(out)) == 3 and all(r > 0 for r in rates(out))


def test_serve_bench_compares_a_rope_model_through_a_gpt2_shaped_stand_in(tmp_path, capsys):
    """The demo's model (rope, smear) cannot be exported: bench says so and still runs to the end, conversation
    reuse (--turns) included."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, rope=True, smear=True))
    ckpt = save_checkpoint(tmp_path / "rope", model)
    bench.bench_serve(["--checkpoint", str(ckpt), "--threads", "1", "--tokens", "8", "--clients", "1,2",
                       "--turns", "3", "--conversations", "1"])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "cannot be exported" in line]) == 1
    assert "comparing with a random GPT-2-shaped model of the same size instead" in out
    assert "greedy tokens identical to transformers: True" in out
    # each level three times, at least bench.LOAD_REQUESTS requests of 8 tokens
    assert (bench.load_rounds(1), bench.load_rounds(2), bench.load_rounds(64)) == (48, 24, bench.LOAD_ROUNDS)
    assert out.count(f"  1 clients: {48 * 8} tokens") == 3
    assert out.count(f"  2 clients: {2 * 24 * 8} tokens") == 3
    assert re.search(r"^\| ours, serve\.py over HTTP, streaming \| [\d.]+ ms \| \d+ ", out, re.M)
    assert re.search(r"^\| 1 \| \d+ \| 1\.0x \| [\d.]+x \|$", out, re.M)  # aggregate vs 1 client, vs one stream
    # conversation reuse: the same greedy conversation either way, its third turn mostly cached only with reuse
    rows = {name: (int(prompt), int(cached)) for name, prompt, cached in re.findall(
        r"^\| reuse (on|off) [^|]*\| [\d.]+ ms \| [\d.]+ ms \| [\d.]+x \| (\d+) \| \d+, (\d+) \|$", out, re.M)}
    (prompt_on, cached_on), (prompt_off, cached_off) = rows["on"], rows["off"]
    assert prompt_on == prompt_off and prompt_on > 2 * bench.REPLY_TOKENS
    assert prompt_on // 2 < cached_on < prompt_on and cached_off == 0


def test_time_to_loss_interpolates_between_evaluations():
    curve = [(0.0, 10.0), (10.0, 6.0), (20.0, 4.0), (30.0, 3.0)]
    assert bench.time_to_loss(curve, 5.0) == 15.0
    assert bench.time_to_loss(curve, 3.5) == 25.0
    assert bench.time_to_loss(curve, 6.0) == 10.0
    assert bench.time_to_loss(curve, 10.0) == 0.0
    assert bench.time_to_loss(curve, 2.9) is None


def test_speedrun_trains_both_recipes_and_reads_the_ratio_off_their_curves(data_dir, tmp_path, capsys):  # noqa: F811
    """A few seconds of each recipe on a 1-layer model: both curves are written, and the ratio is parley's time to
    vanilla's final loss over vanilla's time, as time_to_loss reads it off the curves."""
    out = tmp_path / "speedrun"
    bench.bench_speedrun(["--minutes", "0.05", "--threads", "1", "--data", str(data_dir), "--out", str(out),
                          "--eval_tokens", "4096", "--parley", "--muon_lr 0.02", "--", "--n_layer", "1", "--n_head",
                          "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--eval_batches", "2",
                          "--lr", "1e-2"])
    result = json.loads((out / "speedrun.json").read_text())
    curves = result["curves"]
    assert all(len(curves[name]) >= 2 for name in ("vanilla", "parley"))
    vanilla, parley = (" ".join(result["flags"][name]) for name in ("vanilla", "parley"))
    assert "--rope false" in vanilla and "--muon_lr" not in vanilla and "--lr 1e-2 --max_time 3.0" in vanilla
    assert "--optimizer muon" in parley and "--lr 1e-2 --muon_lr 0.02 --max_time 3.0" in parley
    total, target = curves["vanilla"][-1]
    assert (result["vanilla_time"], result["target"]) == (total, target) and 2 < total < 10
    reached = bench.time_to_loss(curves["parley"], target)
    assert result["ratio"] == (reached / total if reached is not None else None)
    rows = (out / "speedrun.csv").read_text().splitlines()
    assert rows[0] == "run,seconds,val_loss" and len(rows) == 1 + len(curves["vanilla"]) + len(curves["parley"])
    assert (out / "speedrun.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert re.search(r"^\| vanilla \| \d+ \| \d+ s \| [\d.]+ \| \d+ s \|$", text, re.M)
    assert "parley reaches vanilla's final loss in" in text


def run_bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True)


def test_help_and_a_missing_input_get_a_message_not_a_traceback(tmp_path):
    shown = run_bench("tokenizer", "--help")
    assert shown.returncode == 1 and "usage: python bench.py tokenizer" in shown.stderr and not shown.stdout
    missing = run_bench("tokenizer", str(tmp_path / "nope.jsonl.gz"))
    assert missing.returncode == 1 and f"no such input file: {tmp_path / 'nope.jsonl.gz'}" in missing.stderr
    assert "Traceback" not in shown.stderr + missing.stderr
    shown = run_bench("speedrun", "--help")
    assert shown.returncode == 1 and "usage: python bench.py speedrun" in shown.stderr
    no_corpus = run_bench("speedrun", "--corpus", str(tmp_path), "--data", str(tmp_path / "shards"))
    assert no_corpus.returncode == 1 and f"no Gutenberg corpus (train_*.jsonl.gz) in {tmp_path}" in no_corpus.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus", "3", "--tokens", "8"], "unrecognized arguments: --bogus 3"),
    (["--tokens"], "argument --tokens: expected one argument"),
    (["--tokens", "1"], "argument --tokens: must be at least 2, got 1"),
    (["--clients", "1,0"], "argument --clients: must be at least 1, got 0"),
    (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
])
def test_serve_bench_refuses_bad_arguments_before_running(args, message, capsys):
    """An unknown option, a missing value or one the figures divide by is a usage error that names the option and
    lists the known ones, not a full default run or a ZeroDivisionError at the end."""
    with pytest.raises(SystemExit) as e:
        bench.bench_serve(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert all(f"[{option} " in err for option in ("--checkpoint", "--threads", "--tokens", "--clients", "--turns"))


def test_tokenizer_bench_names_a_missing_value_and_an_input_that_is_not_gzipped(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.bench_tokenizer(["--rounds"])
    assert e.value.code == 2 and "argument --rounds: expected one argument" in capsys.readouterr().err
    plain = tmp_path / "docs.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with pytest.raises(SystemExit) as e:
        bench.bench_tokenizer([str(plain), "--rounds", "1"])
    assert f"not gzip-compressed: {plain}" in str(e.value.code) and ".jsonl.gz" in str(e.value.code)


def test_train_bench_refuses_a_device_this_machine_lacks(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as e:
        bench.bench_train(["--device", "cuda"])
    assert e.value.code == 2 and "--device cuda: field 'device' is 'cuda', but this torch sees no CUDA GPU" in capsys.readouterr().err


def test_train_bench_steps_float16_through_a_gradient_scaler_as_train_py_does(monkeypatch, capsys):
    """fp16 without train.py's GradScaler would time a step training never takes: every row's optimizer steps
    through an enabled scaler."""
    pytest.importorskip("transformers")
    from config import PRESETS
    for key, value in {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}.items():
        monkeypatch.setitem(PRESETS["tiny"], key, value)
    stepped = []

    class Recording(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            stepped.append(self.is_enabled())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    bench.bench_train(["--batch_size", "1", "--rounds", "1", "--steps", "1", "--dtype", "float16"])
    assert "float16" in capsys.readouterr().out
    assert len(stepped) == 3 * 2 and all(stepped)  # three rows, a warm-up step and a timed one each


def test_decode_rate_is_timed_from_the_runs_own_first_token():
    """However long the first token takes, the rate counts only what follows it: it cannot go negative, as the
    difference of two medians taken from different runs could."""
    def run():
        time.sleep(0.2)  # prefill
        first = time.monotonic()
        time.sleep(0.01)  # the other tokens
        return first

    rate = bench.decode_rate(run, 3)
    assert 20 < rate <= 200  # 2 tokens in at least 0.01 s, not counting the 0.2 s before the first
