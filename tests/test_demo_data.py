"""The built-in demo data: deterministic, nine checkable task families, a held-out split that shares no dialog,
operand pair or wording with fine-tuning, and a pretraining corpus that knows every word the suite uses."""

import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

import demo_data
from chat_data import read_file
from chat_format import render, validate
from config import PRESETS
from conftest import ROOT
from tokenizer import encode

SUMS = re.compile(r"(\d+) ([+-]) (\d+)")


@pytest.fixture(scope="module")
def train():
    return demo_data.examples("train")


@pytest.fixture(scope="module")
def tuned(train):
    return train + demo_data.examples("val")


@pytest.fixture(scope="module")
def held_out():
    return demo_data.examples("eval")


@pytest.fixture(scope="module")
def corpus():
    return demo_data.pretrain_documents()


def prompts(examples):
    """The text the model reads (system and user turns), not the answers."""
    return [m["content"] for e in examples for m in e["messages"] if m["role"] != "assistant"]


def test_deterministic_and_seeded():
    assert demo_data.examples("val") == demo_data.examples("val")
    assert demo_data.examples("val", seed=1) != demo_data.examples("val")
    assert demo_data.pretrain_documents(n_docs=50) == demo_data.pretrain_documents(n_docs=50)
    assert demo_data.pretrain_documents(seed=1, n_docs=50) != demo_data.pretrain_documents(n_docs=50)
    assert demo_data.dialogs("val") == [e["messages"] for e in demo_data.examples("val")]


def test_bad_split_and_seed_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test': expected one of train, val, eval"):
        demo_data.examples("test")
    for seed in (-1, "3", 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            demo_data.examples("eval", seed=seed)
    run = subprocess.run([sys.executable, str(ROOT / "demo_data.py"), "--out", str(tmp_path), "--seed", "x"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "--seed must be a non-negative integer, got 'x'" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_nine_families_in_every_split_and_the_suite_holds_out_wordings_and_fillers(tuned, held_out):
    for split in ("train", "val", "eval"):
        examples = demo_data.examples(split)
        counts = {f: sum(e["family"] == f for e in examples) for f in demo_data.FAMILIES}
        weights = demo_data.TRAIN_WEIGHTS if split == "train" else dict.fromkeys(demo_data.FAMILIES, 1)
        assert counts == {f: round(demo_data.SPLIT_SIZES[split] * weights[f]) for f in demo_data.FAMILIES}
        unknown = sum(e["family"] == "unknown" for e in examples)
        assert unknown == (600 if split == "train" else 0)  # fine-tuning only
    assert set(demo_data.FAMILIES) == {"copy", "list", "arithmetic", "compare", "recall", "rules", "support",
                                       "booking", "greeting"}
    assert {e["held_out"] for e in tuned} == {None}
    for family in demo_data.FAMILIES:
        kinds = [e["held_out"] for e in held_out if e["family"] == family]
        assert kinds.count("wording") == kinds.count("filler") == demo_data.SPLIT_SIZES["eval"] // 2


def test_no_held_out_wording_occurs_in_fine_tuning(tuned, held_out, corpus):
    tuned_text = "\n".join(prompts(tuned))
    for task, words in demo_data.HELD_OUT_WORDS.items():
        for word in words:
            assert word not in tuned_text.lower(), (task, word)
            assert word in " ".join(corpus).lower(), (task, word)  # but pretraining knows it
    # every held-out core: its fixed text (between the slots) never occurs in a tuned prompt, nor in the corpus
    cores = [w[1:] for group in (list(demo_data.WORDINGS.values()) + [demo_data.ASK_SECRET, demo_data.BOOK_OPEN]
                                 + list(demo_data.RULES.values()) + list(demo_data.SUPPORT_ASK.values())
                                 + list(demo_data.GREET.values()) + list(demo_data.BOOK_SLOT.values()))
             for w in group if w.startswith("~")]
    assert len(cores) >= 50
    corpus_text = " ".join(corpus)
    for core in cores:
        pieces = [p for p in re.split(r"\{\w*\}", core) if len(p.strip()) >= 12]
        for piece in pieces:
            assert piece.lower() not in tuned_text.lower(), core
            assert piece not in corpus_text, core
    # every task is asked in at least 15 tuned wordings (cores times polite prefixes)
    for task, options in demo_data.WORDINGS.items():
        tuned_cores = [o for o in options if not o.startswith("~")]
        wordings = sum(len(demo_data.PREFIXES if o[0].islower() else demo_data.QUESTION_PREFIXES) for o in tuned_cores)
        assert wordings >= 15, task
    # the suite's "wording" half asks in held-out wordings: every task's held-out key word occurs there
    wording_text = "\n".join(prompts([e for e in held_out if e["held_out"] == "wording"])).lower()
    for task, words in demo_data.HELD_OUT_WORDS.items():
        assert any(w in wording_text for w in words), task


def test_every_word_the_suite_uses_is_in_the_pretraining_corpus(held_out, corpus):
    known = {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(corpus))}
    used = {w.lower() for text in prompts(held_out) + [e["answer"] for e in held_out]
            for w in re.findall(r"[A-Za-z]+", text)}
    assert used - known == set()
    assert all("<|" not in doc for doc in corpus)  # plain text, never the chat format


def test_the_corpus_says_other_wordings_next_to_the_answers_form_and_both_agree(corpus):
    # "The sum of 3 and 4 is 7, so 3 + 4 = 7." and the like, in either order: the held-out key words (sum, take
    # away, above, below ...) each said of the same numbers as the symbols the answers use, and never wrongly.
    text = " ".join(corpus)
    link = r"(?:, so |: |, that is, |\. In other words, )"
    sums = re.findall(r"[Tt]he sum of (\d+) and (\d+) is (\d+)" + link + r"(\d+) \+ (\d+) = (\d+)", text)
    takes = re.findall(r"(\d+) - (\d+) = (\d+)" + link + r"(\d+) take away (\d+) is (\d+)", text)
    above = re.findall(r"(\d+) is above (\d+)" + link + r"(\d+) is greater than (\d+)", text)
    costs = re.findall(r"charge (\d+) dollars for the (\w+)" + link + r"the (\w+) costs (\d+) dollars", text)
    assert min(len(sums), len(takes), len(above), len(costs)) >= 20
    assert all(a == d and b == e and int(a) + int(b) == int(c) == int(f) for a, b, c, d, e, f in sums)
    assert all(a == d and b == e and int(a) - int(b) == int(c) == int(f) for a, b, c, d, e, f in takes)
    assert all(a == c and b == d and int(a) > int(b) for a, b, c, d in above)
    assert all(p == q and item == other for p, item, other, q in costs)


def test_dialogs_are_valid_and_fit_the_tiny_context(train, held_out):
    block = PRESETS["tiny"]["block_size"]
    for e in train[::3] + held_out:
        validate(e["messages"])
        assert e["messages"][-1] == {"role": "assistant", "content": e["answer"]}
        assert len(render(e["messages"])[0]) <= block
    recall = [e for e in held_out if e["family"] == "recall"]
    assert min(len(e["messages"]) for e in recall) >= 6  # the fact is one to three exchanges back
    assert all(e["messages"][0]["role"] == "system" for e in held_out if e["family"] in ("rules", "support"))


def test_fillers_are_single_tokens():
    for word in demo_data.NOUNS + demo_data.NAMES + [str(n) for n in demo_data.RECALL_NUMBERS] + demo_data.DAYS:
        assert len(encode(" " + word)) == 1, word
    assert not set(demo_data.NOUNS) & set(demo_data.NAMES)


def test_held_out_dialogs_and_operand_pairs_never_occur_in_fine_tuning(tuned, held_out):
    train_pools, eval_pools = demo_data.pools("train"), demo_data.pools("eval")
    for key in ("sums", "pairs"):
        assert eval_pools[key] and not set(train_pools[key]) & set(eval_pools[key]), key
    # no held-out dialog was tuned on, except a few of the fixed exchanges ("Thanks!" -> "You are welcome!", the
    # first question of a booking) that the filler half can only draw again
    seen = {json.dumps(e["messages"]) for e in tuned}
    again = [e for e in held_out if json.dumps(e["messages"]) in seen]
    assert len(again) < 0.05 * len(held_out)
    assert {e["family"] for e in again} <= {"greeting", "booking"} and {e["held_out"] for e in again} <= {"filler"}
    tuned_sums = {m for t in prompts(tuned) for m in SUMS.findall(t)}
    eval_sums = {m for t in prompts(held_out) for m in SUMS.findall(t)}
    assert eval_sums and not tuned_sums & eval_sums


def test_every_answer_is_exactly_checkable(held_out):
    for family in demo_data.FAMILIES:
        examples = [e for e in held_out if e["family"] == family]
        for e in examples:
            assert demo_data.check(e, e["answer"]) and demo_data.check(e, " " + e["answer"] + "\n")
            assert not demo_data.check(e, e["answer"][:-1])
            assert not demo_data.check(e, e["answer"] + " extra")
        wrong = next(x["answer"] for x in examples if x["answer"] != examples[0]["answer"])
        assert not demo_data.check(examples[0], wrong), family


def _support_answer_is_right(e):
    system, question, answer = e["messages"][0]["content"], e["messages"][-2]["content"], e["answer"]
    phone = re.search(r"\d{3} \d{3}", system).group()  # the only three-digit numbers: hours and prices are lower
    if answer.startswith("Sorry, I do not know"):  # the fallback: the number to call, no invented fact
        assert answer == f"Sorry, I do not know that. Please call us at {phone}."
        item = re.search(r"the (\w+)\?", question)
        assert not item or not re.search(rf"\b{item.group(1)}\b", system)
    elif m := re.fullmatch(r"On (\w+) we are open from (\d+) to (\d+)\.", answer):
        assert re.search(rf"{m[1]} (from )?{m[2]} to {m[3]}\b", system) and m[1] in question
    elif m := re.fullmatch(r"On (\w+) we are closed\.", answer):
        assert m[1] in question and not re.search(rf"{m[1]} (from )?\d", system)
    elif m := re.fullmatch(r"The (\w+) costs (\d+) dollars\.", answer):
        assert re.search(rf"{m[1]} (costs |for )?{m[2]} dollars", system)
    elif m := re.fullmatch(r"We deliver on (\w+) and (\w+)\.", answer):
        assert re.search(rf"(Delivery|deliver) on {m[1]} and {m[2]}\.", system)
    else:
        assert answer == f"Our phone number is {phone}."


def test_answers_are_right(held_out):
    kinds = set()
    for e in held_out:
        family, question, answer = e["family"], e["messages"][-2]["content"], e["answer"]
        context = " ".join(m["content"] for m in e["messages"][:-2])
        if family == "arithmetic":
            a, op, b = SUMS.search(answer).groups()
            assert answer == f"{a} {op} {b} = {int(a) + int(b) if op == '+' else int(a) - int(b)}."
            assert a in question and b in question
        elif family == "compare":
            a, b = map(int, re.findall(r"\d+", question))
            asks_more = bool(re.search(r"(greater|bigger|larger|more|above|higher|over) (than )?\d", question))
            yes = a > b if asks_more else a < b
            assert answer == f"{'Yes' if yes else 'No'}, {a} is {'greater' if a > b else 'less'} than {b}."
        elif family == "recall":
            assert answer.rstrip(".").split()[-1] in context
        elif family == "support":
            _support_answer_is_right(e)
        elif family == "booking" and answer.startswith("Booked"):
            people, day, name = re.fullmatch(r"Booked: a table for (\d+) people on (\w+), name (\w+)\.", answer).groups()
            users = " ".join(m["content"] for m in e["messages"] if m["role"] == "user")
            assert all(re.search(rf"\b{v}\b", users) for v in (people, day, name))
            kinds.add("booked")
        elif family == "booking":
            assert answer in demo_data.BOOK_ASK.values()
            kinds.add("asks")
        elif family == "rules":
            system = e["messages"][0]["content"]
            if "password" in system:  # refused when asked for, other questions answered
                secret = re.search(r"password (?:is )?(\w+)|secret: (\w+)", system)
                assert secret and not any(s and f" {s}" in answer for s in secret.groups())
                asked = "password" in question.lower()
                assert (answer == demo_data.REFUSAL) == asked
                kinds.add("refuses" if asked else "answers")
            elif "yes or no" in system:
                assert answer in ("Yes.", "No.")
                kinds.add("yes/no")
            elif answer.startswith(tuple(w + "." for w in demo_data.START_WORDS)) and "word" in system:
                assert answer.split(".")[0] in system
                kinds.add("starts")
            else:
                assert answer.rsplit(" - ", 1)[1] in system
                kinds.add("signs")
        assert not (family != "rules" and answer == demo_data.REFUSAL)
    assert kinds == {"booked", "asks", "refuses", "answers", "yes/no", "starts", "signs"}


def test_requests_outside_its_world_get_the_fallback(held_out):
    outside = [e for e in held_out if e["family"] == "greeting" and e["answer"].startswith("Sorry")]
    assert outside and all(e["answer"] == f"Sorry, I cannot help with that. {demo_data.CAN_DO}" for e in outside)
    asked = {e["messages"][-2]["content"] for e in outside}
    assert any(w in " ".join(asked) for w in ("poem", "weather", "song", "joke", "picture", "fly", "drive", "dinner"))
    # a greeting introduces the name the system prompt gives, or the default one
    for e in held_out:
        if e["family"] == "greeting" and e["answer"].startswith("Hello! I am"):
            name = e["answer"].split()[3].rstrip(".")
            system = e["messages"][0]["content"] if e["messages"][0]["role"] == "system" else ""
            assert name in system or (name == demo_data.DEFAULT_NAME and not system)


def test_requests_in_words_the_corpus_never_uses_get_the_fallback_and_are_held_out_apart_from_the_suite(
        tuned, held_out, corpus, monkeypatch):
    seen = set(encode(" ".join(corpus)))
    words = [w.lstrip("~") for w in demo_data.UNKNOWN_WORDS]
    for word in words:  # pretraining never saw any of their tokens, so all keep the shared row
        assert not seen & set(encode(" " + word)), word
    probe = demo_data.unknown_requests(seed=3, n=200)
    assert probe == demo_data.unknown_requests(seed=3, n=200) != demo_data.unknown_requests(seed=4, n=200)
    asked = {split: [e["messages"][-2]["content"] for e in examples if e["family"] == "unknown"]
             for split, examples in (("tuned", tuned), ("probe", probe))}
    assert len(asked["tuned"]) == 600 and len(asked["probe"]) == 200
    assert all(e["answer"] == demo_data.OUTSIDE and len(e["messages"]) == 2
               for e in tuned + probe if e["family"] == "unknown")
    # tuned and probe requests share no word outside the corpus, and no wording (the text around the words)
    pattern = re.compile(r"\b(" + "|".join(words) + r")\b")
    used = {split: set(w for a in asks for w in pattern.findall(a)) for split, asks in asked.items()}
    frames = {split: {pattern.sub("_", a).replace("_ and _", "_") for a in asks} for split, asks in asked.items()}
    assert len(used["tuned"]) == 73 and len(used["probe"]) == 25 and not used["tuned"] & used["probe"]
    assert len(frames["probe"]) == 4 and not frames["tuned"] & frames["probe"]
    monkeypatch.setattr(demo_data, "NOISE_SHARE", 0.0)  # the tuned wordings as written, before words are edited
    unedited = [e["messages"][-2]["content"] for e in demo_data.examples("train") if e["family"] == "unknown"]
    assert len({pattern.sub("_", a).replace("_ and _", "_") for a in unedited}) == 13
    suite_words = set(re.findall(r"[A-Za-z]+", " ".join(prompts(held_out))))
    assert not suite_words & set(words)  # the suite's words are all in the corpus


def test_write_jsonl_reads_back_as_chat_files(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "SPLIT_SIZES", {"train": 3, "val": 2, "eval": 2})
    paths = demo_data.write_jsonl(tmp_path, seed=4)
    assert [p.name for p in paths] == ["train.jsonl", "val.jsonl", "eval.jsonl"]
    assert read_file(paths[2]) == demo_data.dialogs("eval", seed=4)
    first = json.loads(paths[2].read_text().splitlines()[0])
    assert (first["family"], first["held_out"]) == ("copy", "wording")


def test_fine_tuning_wordings_have_words_added_or_left_out_and_nothing_else_changes(monkeypatch):
    # every tuned wording, edited: its slots, its end (from the last slot on) and its key words stay; the words
    # added come from NOISE_ADD, the words left out from NOISE_DROP, and no held-out word is ever made
    rng = random.Random(0)
    held_words = [w for words in demo_data.HELD_OUT_WORDS.values() for w in words]
    groups = [*demo_data.WORDINGS.values(), *demo_data.RULES.values(), *demo_data.SUPPORT_ASK.values(),
              *demo_data.BOOK_SLOT.values(), *demo_data.GREET.values(), demo_data.ASK_SECRET, demo_data.BOOK_OPEN,
              demo_data.SUPPORT_SYSTEM, demo_data.UNKNOWN_ASK, demo_data.IDENTITY_SYSTEM,
              *(wordings for _, statements, questions, _ in demo_data.FACTS for wordings in (statements, questions))]
    cores = [w for group in groups for w in group if not w.startswith("~")]
    assert len(cores) > 250
    changed = 0
    for core in cores * 20:
        edited = demo_data._edit_words(rng, core)
        slots = re.findall(r"\{\w*\}", core)
        assert re.findall(r"\{\w*\}", edited) == slots
        if slots:
            assert edited.endswith(core[core.rindex(slots[-1]):]), (core, edited)
        before, after = Counter(core.lower().split()), Counter(edited.lower().split())
        assert set((after - before).elements()) <= set(demo_data.NOISE_ADD), (core, edited)
        assert set((before - after).elements()) <= demo_data.NOISE_DROP, (core, edited)
        assert 1 <= sum(((after - before) + (before - after)).values()) <= 3
        assert edited[0].isupper() == core[0].isupper() or edited[0] == "{"
        assert not any(w in edited.lower() and w not in core.lower() for w in held_words)
        changed += edited != core
    assert changed > 0.9 * len(cores) * 20
    # only the training split is edited, and its edits touch no other choice: the same dialogs, fillers and answers
    train, val, held_out = (demo_data.examples(s, seed=3, per_family=40) for s in ("train", "val", "eval"))
    monkeypatch.setattr(demo_data, "NOISE_SHARE", 0.0)
    assert demo_data.examples("val", seed=3, per_family=40) == val
    assert demo_data.examples("eval", seed=3, per_family=40) == held_out
    plain = demo_data.examples("train", seed=3, per_family=40)
    assert [(e["family"], e["answer"]) for e in plain] == [(e["family"], e["answer"]) for e in train]
    edited = sum(a["messages"] != b["messages"] for a, b in zip(plain, train))
    assert 0.5 * len(train) < edited < len(train)
