"""The built-in demo data: deterministic, six checkable task families, and a held-out split that shares no filler
with the fine-tuning split."""

import json
import re

import pytest

import demo_data
from chat_data import read_file
from chat_format import render, validate
from config import PRESETS
from tokenizer import encode

SUMS = re.compile(r"(\d+) ([+-]) (\d+)")
COMPARISONS = re.compile(r"Is (\d+) (?:greater|bigger|less|smaller) than (\d+)\?")


@pytest.fixture(scope="module")
def train():
    return demo_data.examples("train")


@pytest.fixture(scope="module")
def held_out():
    return demo_data.examples("eval")


def texts(examples):
    return [m["content"] for e in examples for m in e["messages"]]


def test_deterministic_and_seeded():
    assert demo_data.examples("val") == demo_data.examples("val")
    assert demo_data.examples("val", seed=1) != demo_data.examples("val")
    assert demo_data.pretrain_documents(n_docs=50) == demo_data.pretrain_documents(n_docs=50)
    assert demo_data.pretrain_documents(seed=1, n_docs=50) != demo_data.pretrain_documents(n_docs=50)
    assert demo_data.dialogs("val") == [e["messages"] for e in demo_data.examples("val")]


def test_six_families_in_every_split(train, held_out):
    for split, examples in (("train", train), ("val", demo_data.examples("val")), ("eval", held_out)):
        counts = {f: sum(e["family"] == f for e in examples) for f in demo_data.FAMILIES}
        assert counts == {f: demo_data.SPLIT_SIZES[split] for f in demo_data.FAMILIES}
    assert len(demo_data.FAMILIES) == 6
    assert {"copy", "recall", "list", "arithmetic", "compare", "system"} == set(demo_data.FAMILIES)


def test_recall_asks_one_to_three_exchanges_later_and_fine_tuning_also_right_away(train, held_out):
    def gaps(examples):  # exchanges between the fact (and its acknowledgement) and the question
        return {(len(e["messages"]) - 4) // 2 for e in examples if e["family"] == "recall"}
    assert gaps(held_out) == {1, 2, 3}
    assert gaps(train) == {0, 1, 2, 3}


def test_dialogs_are_valid_and_fit_the_tiny_context(train, held_out):
    block = PRESETS["tiny"]["block_size"]
    for e in train[:3000] + held_out:
        validate(e["messages"])
        assert e["messages"][-1] == {"role": "assistant", "content": e["answer"]}
        assert len(render(e["messages"])[0]) <= block
    # recall is multi-turn: the fact is several turns before the question
    recall = [e for e in held_out if e["family"] == "recall"]
    assert max(len(e["messages"]) for e in recall) >= 8
    assert all(e["messages"][0]["role"] == "system" for e in held_out if e["family"] == "system")


def test_fillers_are_single_tokens():
    for word in demo_data.NOUNS + demo_data.NAMES + [str(n) for n in demo_data.RECALL_NUMBERS]:
        assert len(encode(" " + word)) == 1, word
    assert not set(demo_data.NOUNS) & set(demo_data.NAMES)


def test_held_out_dialogs_and_operand_pairs_never_occur_in_the_training_split(train, held_out):
    train_pools, eval_pools = demo_data.pools("train"), demo_data.pools("eval")
    for key in ("sums", "pairs"):
        assert eval_pools[key] and not set(train_pools[key]) & set(eval_pools[key]), key
    assert len(eval_pools["sums"]) + len(train_pools["sums"]) == len(demo_data.SUMS)
    tuned = train + demo_data.examples("val")
    # no held-out dialog was tuned on: the copied sentences, lists and facts are fresh draws
    seen = {json.dumps(e["messages"]) for e in tuned}
    assert not any(json.dumps(e["messages"]) in seen for e in held_out)
    sentences = {m["content"].split("\n")[-1] for e in tuned if e["family"] == "copy" for m in e["messages"][:1]}
    assert not any(e["answer"] in sentences for e in held_out if e["family"] == "copy")
    # arithmetic and comparison: no operand pair of the held-out split occurs in a tuned dialog
    train_text = texts(tuned)
    train_sums = {m for t in train_text for m in SUMS.findall(t)}
    eval_sums = {m for t in texts(held_out) for m in SUMS.findall(t)}
    assert eval_sums and not train_sums & eval_sums
    train_pairs = {m for t in train_text for m in COMPARISONS.findall(t)}
    eval_pairs = {m for t in texts(held_out) for m in COMPARISONS.findall(t)}
    assert eval_pairs and not train_pairs & eval_pairs


def test_pretraining_corpus_knows_every_sum_and_number_but_not_the_chat_format():
    docs = demo_data.pretrain_documents(n_docs=1500)
    numbers = {int(n) for doc in docs for n in re.findall(r"\d+", doc)}
    assert set(demo_data.RECALL_NUMBERS) <= numbers
    sums = {m for doc in docs for m in re.findall(r"(\d+ [+-] \d+ = \d+)\.", doc)}
    for a, b, op in demo_data.SUMS[:5] + demo_data.pools("eval")["sums"][:5]:  # written correctly, both parts
        assert f"{a} {op} {b} = {a + b if op == '+' else a - b}" in sums
    assert len(sums) == len({s.split(" = ")[0] for s in sums})  # one answer per question
    # sums also follow their own expression, as a dialog's answer follows its question
    assert sum(bool(re.search(r"(\d+ [+-] \d+)[.:] \1 = \d+\.", doc)) for doc in docs) > len(docs) // 4
    # repeated phrases hold numbers too: copying a number is practised, not only copying a word
    repeated = r"the words ([a-z ]*\d{3}[a-z0-9 ]*)\. Then \w+ wrote the same words: \1\."
    assert any(re.search(repeated, doc) for doc in docs)
    # most documents say a fact again within a training window, as a dialog asks about it a few turns later
    gaps = [len(encode(m.group(3))) for doc in docs
            if (m := re.search(r'(\w+) said: "([^"]+)"(.*?)Later \1 said it again: "\2"', doc))]
    assert len(gaps) > 0.6 * len(docs) and max(gaps) < PRESETS["tiny"]["block_size"]
    for doc in docs:
        for c, relation, d in re.findall(r"(\d+) is (\w+) than (\d+)", doc):
            assert (int(c) > int(d)) == (relation in ("greater", "bigger", "more")), (c, relation, d)
        assert "<|" not in doc  # plain text, never the chat format


def test_every_answer_is_exactly_checkable(held_out):
    by_family = {}
    for e in held_out:
        by_family.setdefault(e["family"], []).append(e)
    for family, examples in by_family.items():
        for e in examples:
            assert demo_data.check(e, e["answer"])
            assert demo_data.check(e, " " + e["answer"] + "\n")
            assert not demo_data.check(e, e["answer"][:-1])
            assert not demo_data.check(e, e["answer"] + " extra")
            assert not demo_data.check(e, "")
        wrong = next(x["answer"] for x in examples if x["answer"] != examples[0]["answer"])
        assert not demo_data.check(examples[0], wrong), family


def test_answers_are_right(held_out):
    for e in held_out:
        question = e["messages"][-2]["content"]
        if e["family"] == "arithmetic":
            a, op, b = SUMS.search(question).groups()
            assert e["answer"] == f"{a} {op} {b} = {int(a) + int(b) if op == '+' else int(a) - int(b)}."
        elif e["family"] == "compare":
            a, b = map(int, re.search(r"(\d+) \w+ than (\d+)", question).groups())
            greater = "greater" in question or "bigger" in question
            assert e["answer"] == ("Yes." if (a > b if greater else a < b) else "No.")
        elif e["family"] == "system":
            name = e["messages"][0]["content"].rstrip(".").split()[-1]
            assert e["answer"].endswith(f" - {name}")
        elif e["family"] == "recall":
            value = e["answer"].rstrip(".").split()[-1]
            assert value in " ".join(m["content"] for m in e["messages"][:-2])


def test_write_jsonl_reads_back_as_chat_files(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "SPLIT_SIZES", {"train": 3, "val": 2, "eval": 2})
    paths = demo_data.write_jsonl(tmp_path)
    assert [p.name for p in paths] == ["train.jsonl", "val.jsonl", "eval.jsonl"]
    assert read_file(paths[2]) == demo_data.dialogs("eval")
    assert json.loads(paths[0].read_text().splitlines()[0])["family"] == "copy"
