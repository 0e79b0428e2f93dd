"""evaluate.py: exact-match scoring per family with failures, losses on shards and chat files, the report files,
and a short fine-tune on demo dialogs that raises the suite's accuracy."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import demo_data
import evaluate
from chat_data import ChatData, encode_conversations
from chat_format import END, render
from checkpoint import save_checkpoint
from config import ModelConfig, TrainConfig
from model import GPT
from shards import write_shard
from tokenizer import encode as encode_text
from train import fit


def tiny_model(block_size=256, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size)).eval()


class Oracle:
    """A stand-in model: answers right for the families in `good`, says 'wrong' otherwise."""

    def __init__(self, examples, good):
        self.config = ModelConfig(block_size=256)
        self.answers = {tuple(render(e["messages"][:-1], add_generation_prompt=True)[0]): e for e in examples}
        self.good = good

    def generate(self, prompts, max_new_tokens, temperature=1.0, stop_tokens=(), **_):
        assert temperature == 0.0 and stop_tokens == (END,)
        out = []
        for p in prompts:
            e = self.answers[tuple(p)]
            out.append(encode_text(e["answer"] if e["family"] in self.good else "wrong") + [END])
        return out


def test_suite_scores_exact_match_per_family_and_lists_failures():
    examples = demo_data.examples("eval", per_family=4)
    good = {"copy", "recall", "list"}
    result = evaluate.run_suite(Oracle(examples, good=good), examples, batch_size=4)
    assert {k: v["accuracy"] for k, v in result["families"].items()} == \
        {f: 1.0 if f in good else 0.0 for f in demo_data.FAMILIES}
    assert result["overall"] == 3 / 9 and (result["correct"], result["total"]) == (12, 36)
    assert len(result["failures"]) == 24
    assert {f["family"] for f in result["failures"]} == set(demo_data.FAMILIES) - good
    # each family's accuracy also on held-out wordings and on held-out fillers (2 examples of each here)
    copy = result["families"]["copy"]
    assert copy["wording"] == {"correct": 2, "total": 2, "accuracy": 1.0} and copy["filler"]["total"] == 2
    assert {f["held_out"] for f in result["failures"]} == {"wording", "filler"}
    failure = result["failures"][0]
    assert failure["got"] == "wrong"
    assert failure["expected"] == next(e["answer"] for e in examples if e["family"] == failure["family"])


def test_reply_decodes_up_to_end_in_any_batch_order():
    examples = demo_data.examples("eval", per_family=2)
    oracle = Oracle(examples, good=set(demo_data.FAMILIES))
    for batch_size in (1, 5, 64):
        assert evaluate.reply(oracle, [e["messages"][:-1] for e in examples], batch_size=batch_size) == \
            [e["answer"] for e in examples]


def test_loss_on_token_shards(tmp_path):
    (tmp_path / "val").mkdir()
    tokens = np.random.default_rng(0).integers(0, 50000, 100)
    write_shard(tmp_path / "val" / "val_000000.bin", tokens)
    model = tiny_model(block_size=16)
    got = evaluate.loss_report(model, str(tmp_path), evaluate.EvalConfig(batch_size=2), "cpu")
    t = torch.from_numpy(tokens)
    windows = [t[s:s + 17] for s in range(0, 100 - 16, 16)]  # 6 non-overlapping windows of 16 targets
    with torch.no_grad():
        expected = torch.stack([model(w[None, :-1], w[None, 1:]) for w in windows]).mean().item()
    assert got["tokens"] == 6 * 16
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_loss_on_a_chat_file_counts_assistant_tokens_only(tmp_path):
    conversations = demo_data.dialogs("eval")[:5]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    model = tiny_model()
    got = evaluate.loss_report(model, str(path), evaluate.EvalConfig(batch_size=2), "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for c in conversations:
            ids, mask = render(c)
            logits = model(torch.tensor([ids[:-1]]))[0]
            keep = torch.tensor(mask[1:])
            total += F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum").item()
            count += int(keep.sum())
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-4)


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def exchange(question, answer="Fine."):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_conversations_cut_or_left_out_to_fit_the_context_are_counted(tmp_path):
    long = "story " * 80  # one exchange of these is longer than the context
    path = write_chats(tmp_path / "chats.jsonl", [exchange("Hi"), exchange(long) + exchange("And now?"),
                                                  exchange(long), exchange("Hello")])
    model = tiny_model(block_size=64)
    got = evaluate.loss_report(model, str(path), evaluate.EvalConfig(), "cpu")
    assert (got["conversations"], got["cut"], got["dropped"]) == (4, 1, 1)
    kept = [exchange("Hi"), exchange("And now?"), exchange("Hello")]
    assert got["tokens"] == sum(sum(render(c)[1][1:]) for c in kept)
    line = evaluate.table({"losses": [got]})
    assert line.endswith("longer than the context: 1 of 4 conversations cut to their last exchanges, 1 left out)")


def test_a_chat_file_with_nothing_to_score_is_an_error_that_says_why(tmp_path, capsys):
    path = write_chats(tmp_path / "long.jsonl", [exchange("story " * 80)] * 3)
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model(block_size=64))
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(ckpt), "--data", str(path), "--suite", "false"])
    assert exit.value.code == 2 and (f"error: {path}: no assistant token to score: 3 of 3 conversations are longer "
                                     "than the context of 64 tokens") in capsys.readouterr().err
    assert not (ckpt / "eval.json").exists()


@pytest.mark.parametrize("field", ["per_family", "batch_size", "max_new_tokens", "max_loss_tokens"])
def test_counts_below_one_are_refused_naming_the_field(field, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "ckpt"), f"--{field}", "0"])
    assert exit.value.code == 2 and f"field '{field}' expects a value >= 1, got 0" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    ckpt = save_checkpoint(tmp_path / "ckpt", GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)))
    for device, says in (("cuda", "this torch sees no CUDA GPU"), ("gpu", "expects auto, cpu, cuda, cuda:N or mps")):
        with pytest.raises(SystemExit) as exit:
            evaluate.main([str(ckpt), "--device", device])
        assert exit.value.code == 2 and "field 'device'" in (err := capsys.readouterr().err) and says in err


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_the_loss_is_scored_in_slices_of_max_tokens_with_the_whole_batchs_value(monkeypatch):
    """The loss as CUDA computes it (full-shape logits): max_tokens at a time, so that no tensor is larger than
    their logits, and the mean is the one of a single forward pass over the whole batch."""
    import model as model_module
    monkeypatch.setattr(model_module, "cpu_speedups", lambda x: False)
    model = tiny_model(block_size=64)
    x, y = torch.randint(0, 50257, (10, 64)), torch.randint(0, 50257, (10, 64))
    y[:, :20], y[3] = -1, -1  # prompts, and a row without targets
    with torch.no_grad():
        whole = model(x, y).item()
    cap = 3 * 64 * 50304  # the logits of 3 rows: 4 slices, the last of one row
    with LargestTensor() as sliced:
        loss, tokens = evaluate._mean_loss(model, [(x, y)], max_tokens=3 * 64)
    assert tokens == 9 * 44 and loss == pytest.approx(whole, rel=1e-5) and loss > 10
    assert 50304 * 64 < sliced.numel <= cap
    with LargestTensor() as unsliced:
        assert evaluate._mean_loss(model, [(x, y)], max_tokens=10 * 64)[0] == pytest.approx(whole, rel=1e-5)
    assert unsliced.numel == 10 * 64 * 50304


def test_cli_writes_reports_into_the_checkpoint_folder(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model())
    evaluate.main([str(ckpt), "--per_family", "2", "--max_new_tokens", "4"])
    report = json.loads((ckpt / "eval.json").read_text())
    assert report["suite"]["total"] == 18 and set(report["suite"]["families"]) == set(demo_data.FAMILIES)
    assert len(report["suite"]["failures"]) == 18 - report["suite"]["correct"]
    unknown = report["unknown"]  # requests in words outside the corpus, as many as a family, apart from the suite
    assert unknown["total"] == 2 and set(unknown["families"]) == {"unknown"} and unknown["correct"] == 0
    assert [f["prompt"] for f in unknown["failures"]] == \
        [e["messages"][-2]["content"] for e in demo_data.unknown_requests(0, 2)]  # 4 tokens: never the fallback
    assert report["losses"][0]["kind"].startswith("demo eval dialogs") and report["losses"][0]["tokens"] > 1000
    assert len(report["samples"]) == len(evaluate.SAMPLE_PROMPTS)
    md = (ckpt / "eval.md").read_text()
    assert "| **overall** |" in md and "## Sample conversations" in md
    assert "## Requests in words outside the corpus (not in the suite)" in md
    assert "| family | accuracy | correct | held-out wordings | held-out fillers |" in md
    assert "Rosa's Cafe" in md and "book a table" in md  # the samples: a support bot and a booking
    out = capsys.readouterr().out
    assert "overall" in out and "new wordings" in out and "How much is the pizza?" in out
    assert "requests in words outside the corpus answered with the fallback, 0.0% (0/2)" in out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "nope")])
    assert exit.value.code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_a_short_fine_tune_raises_accuracy_on_held_out_wordings(tmp_path):
    # The yes/no rule: a system prompt says to answer only yes or no, the user asks comparisons. Tuned on the
    # training wordings, tested on held-out ones (a system prompt and the words above / below never tuned on) and
    # held-out number pairs: a tiny model that never saw a dialog gets none right; after a short fine-tune it
    # answers "Yes." or "No." every time, right well above 0 (the training pairs are disjoint from these).
    def yes_no(split, n, held_out=None):
        return [e for e in demo_data.examples(split, per_family=n) if e["family"] == "rules"
                and e["answer"] in ("Yes.", "No.") and e["held_out"] == held_out]

    held_out = yes_no("eval", 400, "wording")
    assert len(held_out) >= 20
    assert all(any(w in e["messages"][0]["content"] + e["messages"][-2]["content"]
                   for w in ("above", "below", "Do not explain")) for e in held_out)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    before = evaluate.run_suite(model, held_out, max_new_tokens=4)
    train = encode_conversations([e["messages"] for e in yes_no("train", 2500)], 65)
    val = encode_conversations([e["messages"] for e in yes_no("val", 30)], 65)
    cfg = TrainConfig(out=str(tmp_path / "run"), device="cpu", max_steps=60, batch_size=32, lr=3e-3,
                      warmup_steps=10, weight_decay=0.0, eval_every=0, save_every=0, eval_batches=1, log_every=50)
    fit(model, cfg, ChatData(train, val, 64, 32, seed=0, eval_batches=1), {"kind": "finetune"})
    after = evaluate.run_suite(model, held_out, max_new_tokens=4)
    print(f"yes/no accuracy on held-out wordings: {before['overall']:.2f} -> {after['overall']:.2f}")
    assert before["overall"] == 0.0
    assert after["overall"] >= 0.25
    # every reply is now a yes or no answer (this tiny model sometimes ends it before the full stop)
    assert all(f["got"].removesuffix(".") in ("Yes", "No") for f in after["failures"])
