"""bench.py's entry points on tiny inputs, so that they keep running: the figures themselves are not checked, only
that each bench completes, agrees with its reference where it checks one, and prints its table."""

import gzip
import json
import re
import subprocess
import sys

import pytest
import torch

import bench
import tokenizer
from checkpoint import save_checkpoint
from config import ModelConfig
from conftest import ROOT
from model import GPT

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
    assert "  1 clients: 24 tokens" in out and "  2 clients: 48 tokens" in out  # 3 requests each, 8 tokens
    assert re.search(r"^\| ours, serve\.py over HTTP, streaming \| [\d.]+ ms \| \d+ ", out, re.M)
    # conversation reuse: the same greedy conversation either way, its third turn mostly cached only with reuse
    rows = {name: (int(prompt), int(cached)) for name, prompt, cached in re.findall(
        r"^\| reuse (on|off) [^|]*\| [\d.]+ ms \| [\d.]+ ms \| [\d.]+x \| (\d+) \| \d+, (\d+) \|$", out, re.M)}
    (prompt_on, cached_on), (prompt_off, cached_off) = rows["on"], rows["off"]
    assert prompt_on == prompt_off and prompt_on > 2 * bench.REPLY_TOKENS
    assert prompt_on // 2 < cached_on < prompt_on and cached_off == 0


def run_bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True)


def test_help_and_a_missing_input_get_a_message_not_a_traceback(tmp_path):
    shown = run_bench("tokenizer", "--help")
    assert shown.returncode == 1 and "usage: python bench.py tokenizer" in shown.stderr and not shown.stdout
    missing = run_bench("tokenizer", str(tmp_path / "nope.jsonl.gz"))
    assert missing.returncode == 1 and f"no such input file: {tmp_path / 'nope.jsonl.gz'}" in missing.stderr
    assert "Traceback" not in shown.stderr + missing.stderr
