"""Reading chat/ShareGPT/Alpaca files, their errors, cutting to the context, batches, and finetune.py end to end."""

import gzip
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune
from chat_data import (ChatData, ChatDataError, Rehearsal, _digest, collate, encode_conversations, fit_context,
                       length_buckets, read_file, read_files, split)
from chat_format import ASSISTANT, END, SYSTEM, USER, render
from checkpoint import export_hf, load_checkpoint, save_checkpoint
from config import FinetuneConfig, TrainConfig
from conftest import SHARED_DATA
from shard_data import ShardData, data_vocab_ids
from shards import write_shard
from tokenizer import EOT_ID, decode, encode as tok

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def write(path, records, as_array=False, gz=False):
    text = json.dumps(records, indent=2) if as_array else "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def exchanges(n, start=0):
    return [m for i in range(start, start + n) for m in (msg(U, f"question {i}"), msg(A, f"answer {i}"))]


# ---- formats ------------------------------------------------------------------------------------

def test_chat_jsonl_plain_and_gz(tmp_path):
    convs = [[msg(S, "Be kind."), msg(U, "Hi"), msg(A, "Hello!")], [msg(U, "2+2?"), msg(A, "4")]]
    # extra keys (OpenAI's "name", an "id") are ignored
    records = [{"messages": [{**m, "name": "x"} for m in c], "id": i} for i, c in enumerate(convs)]
    assert read_file(write(tmp_path / "c.jsonl", records)) == convs
    assert read_file(write(tmp_path / "c.jsonl.gz", records, gz=True)) == convs



def test_developer_role_and_text_parts_are_read_as_the_server_reads_them(tmp_path):
    """OpenAI's newer exports: 'developer' for the system role, content as a list of text parts; ShareGPT turns
    named role/content. An image part is an error naming the line."""
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    records = [{"messages": [msg("developer", "Be kind."), msg(U, parts), msg(A, [{"type": "text", "text": "Yo"}])]},
               {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}]}]
    expected = [[msg(S, "Be kind."), msg(U, "Hi \nthere"), msg(A, "Yo")]]  # parts joined by newlines, as vLLM
    assert read_file(write(tmp_path / "c.jsonl", records[:1])) == expected
    assert read_file(write(tmp_path / "s.jsonl", records[1:])) == [[msg(U, "Q"), msg(A, "R")]]
    image = {"messages": [msg(U, [{"type": "image_url", "image_url": {"url": "x"}}]), msg(A, "A cat.")]}
    with pytest.raises(ChatDataError, match="line 2: message 0 has a content part that is not text"):
        read_file(write(tmp_path / "i.jsonl", [records[0], image]))

def test_byte_order_mark_and_upper_case_gz_suffix_are_read(tmp_path):
    convs = [[msg(U, "Hi"), msg(A, "Hello!")]]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": convs[0]}).encode() + b"\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"messages": convs[0]}]).encode())
    write(tmp_path / "upper.JSONL.GZ", [{"messages": convs[0]}], gz=True)
    for name in ("bom.jsonl", "bom.json", "upper.JSONL.GZ"):
        assert read_file(tmp_path / name) == convs, name


def test_sharegpt_jsonl_and_array(tmp_path):
    record = {"id": "a", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Yo"}, {"from": "user", "value": "Q"},
                                           {"from": "ChatGPT", "value": "R"}]}
    expected = [[msg(S, "S"), msg(U, "Hi"), msg(A, "Yo"), msg(U, "Q"), msg(A, "R")]]
    assert read_file(write(tmp_path / "s.jsonl", [record])) == expected
    assert read_file(write(tmp_path / "s.json", [record], as_array=True)) == expected


def test_sharegpt_system_field_is_the_system_message(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr"}]
    records = [{"id": "1", "system": "You are a pirate.", "conversations": turns},
               {"system": "You are a pirate.",
                "conversations": [{"from": "system", "value": "You are a pirate."}, *turns]},
               {"system": None, "conversations": turns}]
    pirate = [msg(S, "You are a pirate."), msg(U, "Hi"), msg(A, "Arr")]
    assert read_file(write(tmp_path / "s.jsonl", records)) == [pirate, pirate, [msg(U, "Hi"), msg(A, "Arr")]]
    two = {"system": "Be a pirate.", "conversations": [{"from": "system", "value": "Be a robot."}, *turns]}
    with pytest.raises(ChatDataError, match="line 1: two system prompts"):
        read_file(write(tmp_path / "two.jsonl", [two]))
    with pytest.raises(ChatDataError, match="line 1: field 'system' must be a string"):
        read_file(write(tmp_path / "bad.jsonl", [{"system": ["x"], "conversations": turns}]))


def test_alpaca_variants(tmp_path):
    records = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi"},
               {"instruction": "No input field.", "output": "ok"}]
    expected = [[msg(U, "Add.\n\n2 and 3"), msg(A, "5")], [msg(U, "Say hi."), msg(A, "Hi")],
                [msg(U, "No input field."), msg(A, "ok")]]
    assert read_file(write(tmp_path / "a.json", records, as_array=True)) == expected
    assert read_file(write(tmp_path / "a.jsonl.gz", records, gz=True)) == expected
    # GPTeacher's "response", and self-instruct's "instances" (one example per instance)
    teacher = [{"instruction": "Code.", "input": "x", "response": "print(x)"}]
    assert read_file(write(tmp_path / "g.json", teacher, as_array=True)) == [[msg(U, "Code.\n\nx"), msg(A, "print(x)")]]
    seed = [{"id": "t", "instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"},
                                                                 {"input": "", "output": "?"}]}]
    assert read_file(write(tmp_path / "seed.jsonl", seed)) == [[msg(U, "Antonym?\n\nhot"), msg(A, "cold")],
                                                               [msg(U, "Antonym?"), msg(A, "?")]]


def test_alpaca_dolly_context_and_llama_factory_system_and_history(tmp_path):
    dolly = [{"instruction": "Summarize the text.", "context": "A long text.", "response": "Short.", "category": "x"}]
    assert read_file(write(tmp_path / "d.jsonl", dolly)) == [[msg(U, "Summarize the text.\n\nA long text."),
                                                              msg(A, "Short.")]]
    factory = [{"instruction": "And 3?", "input": "", "output": "9", "system": "Square numbers.",
                "history": [["2?", "4"], ["Bigger: 5?", "25"]]},
               {"instruction": "Hi", "output": "Hello", "system": "", "history": []}]
    assert read_file(write(tmp_path / "f.json", factory, as_array=True)) == [
        [msg(S, "Square numbers."), msg(U, "2?"), msg(A, "4"), msg(U, "Bigger: 5?"), msg(A, "25"), msg(U, "And 3?"),
         msg(A, "9")],
        [msg(U, "Hi"), msg(A, "Hello")]]
    for history in (["2?", "4"], [["2?"]], "2? 4"):
        with pytest.raises(ChatDataError, match="'history' must be a list of"):
            read_file(write(tmp_path / "h.jsonl", [{"instruction": "x", "output": "y", "history": history}]))



def test_trailing_user_turns_removed_and_unusable_records_skipped_and_counted(tmp_path):
    records = [{"messages": [msg(U, "a"), msg(A, "b"), msg(U, "c")]},          # trailing user: removed
               {"messages": [msg(U, "only a question")]},                    # no reply: skipped
               {"messages": [msg(U, "a"), msg(A, "  ")]},                    # empty reply: skipped
               {"messages": [msg(S, ""), msg(U, "a"), msg(A, "b")]}]         # empty system prompt: removed
    counts = {}
    convs = read_file(write(tmp_path / "d.jsonl", records), counts)
    assert convs == [[msg(U, "a"), msg(A, "b")], [msg(U, "a"), msg(A, "b")]]
    assert (counts["records"], counts["trailing_user_removed"], counts["skipped_no_reply"], counts["skipped_empty"]) \
        == (4, 2, 1, 1)
    assert counts["skipped_where"] == [f"{tmp_path / 'd.jsonl'} line 2: skipped_no_reply",
                                       f"{tmp_path / 'd.jsonl'} line 3: skipped_empty"]
    all_convs, total = read_files([tmp_path / "d.jsonl", tmp_path / "d.jsonl"])
    assert len(all_convs) == 4 and total["records"] == 8 and total["files"] == 2 and total["conversations"] == 4


def test_dialogs_in_any_order_of_roles_are_read_and_those_without_a_reply_skipped(tmp_path):
    """A support bot that greets first, two user or two assistant turns in a row, a later system message: read as
    they are, in the chat and the ShareGPT formats. Trailing user turns are still removed and a dialog left without
    a reply to learn is still skipped, each counted."""
    greeting = [msg(S, "You are Ada."), msg(A, "Hi, I'm Ada, how can I help?"), msg(U, "My order is late."),
                msg(U, "It is number 42."), msg(A, "Sorry! It ships today."), msg(A, "Anything else?")]
    later = [msg(U, "Hi"), msg(A, "Hello."), msg(S, "Summary: greeted."), msg(U, "Bye"), msg(A, "Bye!")]
    records = [{"messages": greeting}, {"messages": later + [msg(U, "Still there?")]},
               {"messages": [msg(A, "Hi, I'm Ada."), msg(U, "Hello?")]},               # the greeting to learn
               {"messages": [msg(S, "S"), {**msg(A, "Hi."), "weight": 0}, msg(U, "Hello?")]},  # nothing to learn
               {"messages": [msg(S, "S"), msg(U, "a"), msg(S, " "), msg(A, "b")]}]          # empty system: removed
    counts = {}
    convs = read_file(write(tmp_path / "c.jsonl", records), counts)
    assert convs == [greeting, later, [msg(A, "Hi, I'm Ada.")], [msg(S, "S"), msg(U, "a"), msg(A, "b")]]
    assert (counts["records"], counts["trailing_user_removed"], counts["skipped_no_reply"]) == (5, 3, 1)
    assert counts["skipped_where"] == [f"{tmp_path / 'c.jsonl'} line 4: skipped_no_reply"]
    speaker = {S: "system", U: "human", A: "gpt"}
    sharegpt = [{"system": "You are Ada.", "conversations": [{"from": speaker[m["role"]], "value": m["content"]}
                                                            for m in greeting[1:]]}]
    assert read_file(write(tmp_path / "s.jsonl", sharegpt)) == [greeting]
    ids, mask, cut = fit_context(greeting, len(render(greeting)[0]) - 1)  # the greeting goes first
    assert cut and ids == render([greeting[0]] + greeting[2:])[0] and decode(ids).count("<|user|>") == 2
    assert fit_context(greeting, len(render([greeting[0]] + greeting[2:])[0]) - 1) is None  # the last exchange


def test_openai_weight_0_replies_stay_in_the_context_untrained(tmp_path):
    # as OpenAI's fine-tuning files, and a Hugging Face export that gives every message the key (null when unset)
    records = [{"messages": [msg(U, "Hi"), {**msg(A, "Bad answer."), "weight": 0}, msg(U, "Again"),
                             {**msg(A, "Good."), "weight": None}]},
               {"messages": [msg(U, "Hi"), {**msg(A, "Not learned."), "weight": 0}]},  # nothing to learn: skipped
               {"messages": [msg(U, "Hi"), {**msg(A, "Learned."), "weight": 1}]}]
    counts = {}
    convs = read_file(write(tmp_path / "w.jsonl", records), counts)
    assert convs == [[msg(U, "Hi"), {**msg(A, "Bad answer."), "weight": 0}, msg(U, "Again"), msg(A, "Good.")],
                     [msg(U, "Hi"), msg(A, "Learned.")]]
    assert counts["skipped_no_reply"] == 1
    ids, mask, _ = fit_context(convs[0], 100)
    assert decode([int(i) for i, m in zip(ids, mask) if m]) == "Good.<|end|>"
    for weight in (2, "0", True, 0.5):
        with pytest.raises(ChatDataError, match=f"line 1: message 1 has weight {weight!r}; expected 0"):
            read_file(write(tmp_path / "bad.jsonl", [{"messages": [msg(U, "Hi"), {**msg(A, "x"), "weight": weight}]}]))


def test_conversations_with_tool_calls_are_skipped_and_counted(tmp_path):
    call = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    plain = [msg(U, "Hi"), {**msg(A, "Hello"), "tool_calls": None}]  # a Hugging Face export's null: no call
    records = [{"messages": [msg(U, "Weather?"), {"role": A, "content": None, "tool_calls": call},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, msg(A, "Sunny.")]},
               # the call is the reply to learn: trained as "Let me check." alone before
               {"messages": [msg(U, "Weather?"), {**msg(A, "Let me check."), "tool_calls": call}]},
               {"messages": [msg(U, "Weather?"), {**msg(A, ""), "function_call": {"name": "weather"}}]},
               {"messages": plain}]
    counts = {}
    assert read_file(write(tmp_path / "t.jsonl", records), counts) == [[msg(U, "Hi"), msg(A, "Hello")]]
    assert counts["skipped_tool_calls"] == 3
    assert counts["skipped_where"][1] == f"{tmp_path / 't.jsonl'} line 2: skipped_tool_calls"
    sharegpt = [{"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"},
                                   {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    counts = {}
    assert read_file(write(tmp_path / "s.jsonl", sharegpt), counts) == [[msg(U, "Hi"), msg(A, "Hello")]]
    assert counts["skipped_tool_calls"] == 1


# ---- bad input: every error names the file and the line -------------------------------------------

GOOD = {"messages": [msg(U, "hi"), msg(A, "hello")]}
BAD_CASES = [
    ("content not a string", [GOOD, {"messages": [msg(U, "hi"), {"role": A, "content": 5}]}], "line 2",
     "string 'role' and 'content'"),
    ("unknown role", [{"messages": [msg("robot", "x"), msg(A, "y")]}], "line 1", "unknown role 'robot'"),
    ("empty conversation", [GOOD, GOOD, {"messages": []}], "line 3", "non-empty list"),
    ("messages not a list", [{"messages": "hi"}], "line 1", "non-empty list"),
    ("message not an object", [GOOD, {"messages": [msg(U, "a"), "b"]}], "line 2", "message 1 must be an object"),
    ("unknown ShareGPT speaker", [{"conversations": [{"from": "alien", "value": "x"}]}], "line 1", "from 'alien'"),
    ("ShareGPT value not a string", [{"conversations": [{"from": "human", "value": 1}]}], "line 1",
     r"string 'from' and 'value'"),
    ("Alpaca without output", [{"instruction": "x", "input": ""}], "line 1", "needs 'output'"),
    ("Alpaca input not a string", [{"instruction": "x", "input": 3, "output": "y"}], "line 1",
     "'input' must be a string"),
    ("Alpaca instruction not a string", [{"instruction": None, "output": "y"}], "line 1",
     "'instruction' must be a string"),
    ("no known format", [{"prompt": "x", "completion": "y"}], "line 1", "matches no known format"),
    ("record not an object", [GOOD, ["a", "b"]], "line 2", "matches no known format"),
    ("formats mixed", [GOOD, {"instruction": "x", "output": "y"}], "line 2",
     "a record in the alpaca format in a file of the chat format \\(detected from line 1\\)"),
]


@pytest.mark.parametrize("name, records, line, expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_records_name_file_and_line(tmp_path, name, records, line, expected):
    path = write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ChatDataError, match=expected) as e:
        read_file(path)
    assert str(e.value).startswith(f"{path} {line}")


def test_bad_files_name_file_and_line(tmp_path):
    cases = {
        "malformed.jsonl": (json.dumps(GOOD) + "\n" + '{"messages": [\n', "line 2 column 15: invalid JSON"),
        "cut.jsonl": ((json.dumps(GOOD) + "\n") * 6 + '{"text": "broken", \n', "line 7 column 20: invalid JSON"),
        "empty.jsonl": ("\n  \n", "empty file"),
        "array.json": ('[\n' + json.dumps(GOOD) + ',\n{"messages": oops}\n]', "line 3 column 14: invalid JSON"),
        "missing_comma.json": ('[\n' + json.dumps(GOOD) + '\n' + json.dumps(GOOD) + ']', "line 3: expected ','"),
        "empty_array.json": ("[ ]", "no records"),
        # Hugging Face datasets' to_json(lines=False) wrote an array per batch: the second one was dropped
        "two_arrays.json": (json.dumps([GOOD]) + "\n" + json.dumps([GOOD]) + "\n", "line 2: text after the closing"),
        "trailing_text.json": ("[" + json.dumps(GOOD) + "]\n\n oops", "line 3: text after the closing"),
        "prose.txt": ("Hello, this is not JSON.\n", "line 1 column 1: invalid JSON"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ChatDataError, match=expected) as e:
            read_file(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)), name
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ChatDataError, match="cannot be read"):
        read_file(tmp_path / "bad.gz")
    corrupt = bytearray(gzip.compress((json.dumps(GOOD) + "\n").encode() * 100))
    corrupt[30:60] = bytes(b ^ 0x55 for b in corrupt[30:60])  # a corrupt deflate stream: zlib.error, a traceback
    bad_bytes = {"corrupt.jsonl.gz": (bytes(corrupt), "cannot be read as gzip-compressed text: Error -3"),
                 "latin1.jsonl": ((json.dumps(GOOD) + "\n").encode() + '{"x": "café"}\n'.encode("latin-1"),
                                  "line 2: invalid UTF-8 at byte 103 of the file"),
                 "windows.json": (json.dumps([GOOD]).encode("utf-16"), "line 1: invalid UTF-8 at byte 0 of the file "
                                  "\\(invalid start byte\\): it starts with a UTF-16 byte order mark; convert"),
                 "no_bom.jsonl": ((json.dumps(GOOD) + "\n").encode("utf-16-le"), "line 1: a NUL byte at byte 1 of "
                                  "the file: not text, or UTF-16 without a byte order mark; convert"),
                 "chats.jsonl.zst": (b"\x28\xb5\x2f\xfd", ": .zst compression is not read"),
                 "chats.JSON.XZ": (b"\xfd7zXZ\x00", ": .xz compression is not read")}
    for name, (data, expected) in bad_bytes.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ChatDataError, match=expected) as e:
            read_file(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)), name
    with pytest.raises(ChatDataError, match="not found"):
        read_file(tmp_path / "missing.jsonl")


def test_array_items_get_their_line_and_index(tmp_path):
    records = [GOOD, GOOD, {"messages": [msg(U, "a"), msg("robot", "b")]}]
    path = write(tmp_path / "a.json", records, as_array=True)  # indented: one object spans many lines
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    assert len(starts) == 3 and starts[2] > 3
    with pytest.raises(ChatDataError) as e:
        read_file(path)
    assert str(e.value).startswith(f"{path} line {starts[2]} (array item 2): ")


# ---- cutting to the context ---------------------------------------------------------------------

def test_long_conversation_cut_at_turn_boundaries_keeping_the_system_message():
    conv = [msg(S, "Be brief.")] + exchanges(6)
    full, _ = render(conv)
    last_two = render([conv[0]] + conv[-4:])[0]
    ids, mask, cut = fit_context(conv, len(last_two) + 3)  # room for two exchanges, not three
    assert cut and ids == last_two
    assert ids[0] == SYSTEM and ids.count(USER) == 2 and ids.count(ASSISTANT) == 2
    assert "question 4" in decode(ids) and "question 3" not in decode(ids)
    assert [int(m) for m in mask] == [int(m) for m in render([conv[0]] + conv[-4:])[1]]
    assert fit_context(conv, len(full)) == (full, render(conv)[1], False)  # fits exactly: untouched


def test_conversation_dropped_when_its_last_exchange_does_not_fit():
    long_answer = [msg(U, "short"), msg(A, "word " * 100)]
    assert fit_context(long_answer, 50) is None
    counts = {}
    examples = encode_conversations([exchanges(1), long_answer, exchanges(8)], 40, counts=counts)
    assert counts == {"cut": 1, "dropped": 1}
    assert [len(ids) for ids, _ in examples] == [len(render(exchanges(1))[0]),
                                                 len(render(exchanges(5, start=3))[0])]
    assert len(examples[1][0]) == 40


# ---- split, batches, loss ------------------------------------------------------------------------

def test_split_is_deterministic_order_free_and_keeps_one_val():
    convs = [exchanges(1, start=i) for i in range(40)]
    train, val = split(convs, 0.1)
    assert len(val) == 4 and len(train) == 36
    train2, val2 = split(list(reversed(convs)), 0.1)
    assert val2 == val and sorted(map(str, train2)) == sorted(map(str, train))
    assert len(split(convs[:3], 0.0)[1]) == 1  # at least one held out
    with pytest.raises(ChatDataError, match="at least 2"):
        split(convs[:1], 0.1)


def test_split_keeps_identical_conversations_on_one_side():
    convs = [exchanges(1, start=i) for i in range(40)]
    lowest = min(convs, key=_digest)
    train, val = split(convs + [list(lowest)] * 3, 0.05)  # the cut falls among the copies: all go to val
    assert (len(train), len(val), val.count(lowest)) == (39, 4, 4)
    low, high = sorted(convs[:2], key=_digest)
    train, val = split([high, low, high, high], 0.5)  # the copies to val would leave no train: all stay in train
    assert (train, val) == ([high] * 3, [low])
    with pytest.raises(ChatDataError, match="all 3 conversations are identical"):
        split([low] * 3, 0.5)


def test_collate_masks_prompt_and_padding():
    conv = [msg(U, "Hi"), msg(A, "Hello there")]
    ids, mask = render(conv)
    x, y = collate(encode_conversations([conv, exchanges(1)], 65), block_size=64)
    n = len(ids) - 1
    assert n < 16 and x.shape == y.shape == (2, 16)  # padded to the next multiple of 16
    assert x[0, :n].tolist() == ids[:-1] and (x[0, n:] == EOT_ID).all()
    assert y[0, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert (y[0, n:] == -1).all()
    trained = [t for t in y[0].tolist() if t != -1]
    assert trained == tok("Hello there") + [END]  # only the assistant's reply and its <|end|>
    x, y = collate(encode_conversations([conv], 65, train_on_prompt=True), block_size=64)
    assert y[0, :n].tolist() == ids[1:]  # --train-on-prompt: every token
    x, y = collate([(np.arange(20), np.ones(20, dtype=bool))], block_size=19)
    assert x.shape == (1, 19) and x[0].tolist() == list(range(19))  # never wider than the context


def test_loss_ignores_masked_targets(tiny_model):
    convs = [[msg(S, "Be brief.")] + exchanges(2), exchanges(1, start=7)]
    examples = encode_conversations(convs, 65)
    x, y = collate(examples, block_size=64)
    loss = tiny_model(x, y)
    with torch.no_grad():
        logits = tiny_model(x)
    keep = y != -1
    assert keep.sum() < keep.numel() / 2
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))
    # the prompt's and the padding's would-be targets do not count: filling them in changes the loss
    filled = torch.where(keep, y, torch.cat([x[:, 1:], x[:, -1:]], dim=1))
    assert abs(tiny_model(x, filled).item() - loss.item()) > 1e-3
    # whatever stands in the padding of x does not change the loss (causal attention, masked targets)
    x2 = x.clone()
    short = len(examples[1][0]) - 1
    assert short < x.shape[1] - 5
    x2[1, short:] = 123
    torch.testing.assert_close(tiny_model(x2, y), loss)


def make_data(n=50, **kw):
    convs = [exchanges(1 + i % 4, start=i) for i in range(n)]
    train, val = split(convs, 0.1)
    return ChatData(encode_conversations(train, 65), encode_conversations(val, 65), block_size=64, batch_size=4, **kw)


def test_batches_are_a_pure_function_of_seed_step_micro_rank():
    a, b = make_data(seed=3), make_data(seed=3)
    for args in [(0, 0, 0, 1), (5, 0, 0, 1), (7, 1, 1, 2), (100, 0, 0, 1)]:
        assert all(torch.equal(p, q) for p, q in zip(a.batch(*args), b.batch(*args)))
    b.batch(50, 0, 0, 1)  # consulting other batches first changes nothing
    assert torch.equal(a.batch(3, 0, 0, 1)[0], b.batch(3, 0, 0, 1)[0])
    assert not torch.equal(a.batch(1, 0, 0, 2)[0], a.batch(1, 0, 1, 2)[0])  # ranks get different rows
    assert not torch.equal(a.batch(0, 0, 0, 1)[0], make_data(seed=4).batch(0, 0, 0, 1)[0])
    assert a.fingerprint == b.fingerprint != make_data(n=51).fingerprint
    val = a.val_batches()
    assert len(val) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(val, b.val_batches()))


def test_a_compiled_run_gets_batches_of_a_few_lengths(tmp_path):
    """With length_buckets (finetune.py passes them when fit compiles) every training batch is padded to one of a
    few lengths, instead of a multiple of 16; the rows themselves and their targets are unchanged."""
    assert length_buckets(64) == [16, 32, 64] and length_buckets(1024) == [128, 256, 512, 1024]
    assert length_buckets(100) == [16, 32, 64, 100]  # never past the context
    convs = [exchanges(1 + i % 8, start=i) for i in range(200)]  # 8 to 64 tokens
    plain, bucketed = (ChatData(encode_conversations(convs, 65), encode_conversations(convs[:4], 65), 64, 4, seed=1,
                                buckets=buckets)
                       for buckets in (None, length_buckets(64)))
    widths = {"plain": set(), "bucketed": set()}
    for step in range(plain.batches_per_epoch):
        (x, y), (bx, by) = plain.batch(step), bucketed.batch(step)
        widths["plain"].add(x.size(1))
        widths["bucketed"].add(bx.size(1))
        assert bx.size(1) >= x.size(1) and torch.equal(bx[:, :x.size(1)], x) and torch.equal(by[:, :y.size(1)], y)
        assert (by[:, y.size(1):] == -1).all()
    assert widths["bucketed"] == {16, 32, 64}
    assert widths["plain"] == {16, 32, 48, 64}
    records = write(tmp_path / "chat.jsonl", [{"messages": exchanges(1 + i % 4, start=i)} for i in range(20)])
    ft = FinetuneConfig(data=[str(records)])
    assert finetune.load_data(ft, TrainConfig(device="cpu"), 64, 1)[0].buckets is None  # not compiled: no buckets
    compiled = TrainConfig(device="cpu", compile_cpu="aot_eager")
    assert finetune.load_data(ft, compiled, 64, 1)[0].buckets == [16, 32, 64]


def test_an_epoch_visits_every_example_once():
    data = make_data(n=60)
    rows = set()
    for step in range(data.batches_per_epoch):
        x, _ = data.batch(step, 0, 0, 1)
        rows |= {tuple(r.tolist()) for r in x}
    assert len(rows) == data.batches_per_epoch * data.batch_size  # no repeats within an epoch
    assert data.batches_per_epoch == len(data.train) // 4


# ---- the shared data sets -----------------------------------------------------------------------

SHARED_FILES = sorted(p for d in ("dialog", "instruct") for p in (SHARED_DATA / d).glob("*/*")
                      if p.name.endswith((".json", ".jsonl", ".jsonl.gz")))


@pytest.mark.skipif(not SHARED_FILES, reason="shared data sets not present")
def test_every_shared_dialog_and_instruction_file_loads():
    t = time.perf_counter()
    for path in SHARED_FILES:
        counts = {}
        convs = read_file(path, counts)
        assert len(convs) > 0.99 * counts["records"] - counts.get("trailing_user_removed", 0), path
        assert all(c[-1]["role"] == A for c in convs[:200]), path
        examples = encode_conversations(convs[:20], 1025)
        assert len(examples) >= 15, path
    assert time.perf_counter() - t < 30


# ---- finetune.py end to end -----------------------------------------------------------------------

def test_finetune_end_to_end_from_a_hugging_face_gpt2_dir(tiny_model, tmp_path, capsys):
    init = export_hf(tiny_model, tmp_path / "hf")
    records = [{"messages": [msg(S, "Be brief.")] + exchanges(1 + i % 3, start=i)} for i in range(30)]
    data = write(tmp_path / "chat.jsonl", records)
    alpaca = write(tmp_path / "alpaca.json", [{"instruction": f"Echo {i}", "input": "", "output": f"{i}"}
                                              for i in range(10)], as_array=True)
    out = tmp_path / "chat"
    finetune.main(["--init", str(init), "--data", str(data), str(alpaca), "--out", str(out), "--max-steps", "3",
                   "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--val-fraction", "0.1",
                   "--dropout", "0.1"])
    printed = capsys.readouterr().out
    assert "2 file(s), 40 conversations" in printed and "36 examples" in printed and "4 examples" in printed
    model, config, _ = load_checkpoint(out)
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert config["finetune"]["counts"]["train_examples"] == 36
    assert config["finetune"]["files"] == [str(data), str(alpaca)]
    assert config["provenance"]["kind"] == "finetune" and config["provenance"]["init_from"] == str(init)
    assert config["provenance"]["init_provenance"] == {"source": "huggingface"}
    assert model.config.dropout == 0.1 and model.config.n_embd == tiny_model.config.n_embd
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "finetune" and first["config"]["lr"] == finetune.FINETUNE_DEFAULTS["lr"]
    assert not torch.equal(model.wte.weight, tiny_model.wte.weight)  # it trained


def test_finetune_reads_a_folder_of_data_files_and_reports_the_files_it_leaves_out(tmp_path, capsys):
    folder = tmp_path / "sets"
    (folder / "b").mkdir(parents=True)
    first = write(folder / "a.jsonl", [{"messages": exchanges(1, start=i)} for i in range(3)])
    second = write(folder / "b" / "c.json", [{"instruction": f"Echo {i}", "input": "", "output": f"{i}"}
                                             for i in range(2)], as_array=True)
    (folder / "notes.txt").write_text("not a data file")
    (folder / ".ipynb_checkpoints").mkdir()  # hidden: a copy of a.jsonl, and macOS's binary ._ file
    write(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [{"messages": exchanges(1, start=i)} for i in range(3)])
    (folder / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X\xb0\xff")
    ft, cfg = FinetuneConfig(data=[str(folder)], val_fraction=0), TrainConfig(batch_size=2, eval_batches=1)
    train, val, summary = finetune.conversations(ft)
    assert summary["files"] == [str(first), str(second)] and (len(train), len(val)) == (4, 1)  # val: at least one
    data, summary = finetune.load_data(ft, cfg, 64, 1)
    finetune.report(summary, cfg, data, 1)  # the files left out are said, as tokenize_data says them
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:3] == [
        "  skipped 1 file(s) of other types in the folders (.txt); read are .json, .jsonl, .json.gz, .jsonl.gz",
        "  skipped 2 hidden file(s) in the folders (a name or folder starting with '.', or a folder with '__'), "
        f"e.g. {folder / '._a.jsonl'}; name a file to read it"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatDataError, match="empty: folder has no .json, .jsonl, .json.gz, .jsonl.gz files"):
        finetune.conversations(FinetuneConfig(data=[str(tmp_path / "empty")]))
    (folder / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # a missing file, no longer left out unsaid
    with pytest.raises(ChatDataError, match="gone.jsonl: broken symbolic link"):
        finetune.conversations(ft)


def test_finetune_restricts_the_loss_after_data_vocab_pretraining_and_rehearses_text(tiny_model, tmp_path, capsys):
    text = tmp_path / "text"  # pretraining shards: a cycle of ids 100..163
    for part in ("train", "val"):
        (text / part).mkdir(parents=True)
        write_shard(text / part / "000.bin", np.tile(np.arange(100, 164), 40))
    tiny_model.restrict_output(data_vocab_ids(text))  # as pretrain.py --data_vocab leaves the model
    init = save_checkpoint(tmp_path / "init", tiny_model)
    records = [{"messages": exchanges(1 + i % 2, start=i)} for i in range(20)]
    data = write(tmp_path / "chat.jsonl", records)
    args = ["--init", str(init), "--data", str(data), "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
            "--val-fraction", "0.2", "--lr", "1e-2", "--max-steps", "2"]
    finetune.main(args + ["--out", str(tmp_path / "chat"), "--rehearse", str(text), "--rehearse-rows", "3"])
    printed = capsys.readouterr().out
    assert "plus one logit for the" in printed and "rehearsal: 3 windows" in printed
    model, config, _ = load_checkpoint(tmp_path / "chat" / "step_0000002")
    assert config["finetune"]["rehearse"] == str(text) and config["finetune"]["rehearse_rows"] == 3
    # An id the answers train on gets a row of its own; one only the prompts use keeps the shared row.
    (question,), (answer,) = tok("question"), tok("answer")  # each turn starts a line
    shared = set(model.shared_rows().tolist())
    assert question in shared and answer not in shared and 100 not in shared
    # The restricted loss is the full-vocabulary loss: the logged validation loss is what the saved model computes.
    logged = [json.loads(r) for r in (tmp_path / "chat" / "log.jsonl").read_text().splitlines()]
    logged = [r["val_loss"] for r in logged if r["type"] == "eval"][-1]
    ft, cfg = FinetuneConfig(data=[str(data)], val_fraction=0.2), TrainConfig(batch_size=4, eval_batches=1)
    chat, _ = finetune.load_data(ft, cfg, 64, 1)
    x, y = chat.val_batches()[0]
    with torch.no_grad():
        full = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1).item()
    assert logged == pytest.approx(full, abs=1e-4)
    # A rehearsal batch: the chat rows, then 3 windows of the text cut to their length, every token trained.
    batch_x, batch_y = Rehearsal(chat, ShardData(text, 64, 3, 0, 0)).batch(0)
    cx, cy = chat.batch(0)
    assert batch_x.shape == (4 + 3, cx.size(1)) and torch.equal(batch_x[:4], cx) and torch.equal(batch_y[:4], cy)
    window_x, window_y = batch_x[4:], batch_y[4:]
    assert torch.equal(window_y, (window_x - 100 + 1) % 64 + 100)  # the next token of the cycle, none masked


def test_finetune_reports_bad_data_options_and_init_with_exit_2(tiny_model, tmp_path, capsys):
    init = save_checkpoint(tmp_path / "init", tiny_model)
    bad = write(tmp_path / "bad.jsonl", [GOOD, {"messages": [msg(U, "a"), msg("robot", "b")]}])
    good = write(tmp_path / "good.jsonl", [GOOD, {"messages": exchanges(1)}])
    too_long = [msg(U, "word " * 100), msg(A, "word " * 100)]  # longer than the tiny model's context
    long = write(tmp_path / "long.jsonl", [GOOD, {"messages": too_long}])
    out = ["--out", str(tmp_path / "o")]
    cases = [(["--init", str(init), "--data", str(bad), *out], f"{bad} line 2"),
             (["--data", str(bad), *out], "--init"),
             (["--init", str(init), "--data", str(good), "--rehearse", str(tmp_path / "missing"), *out],
              f"no token shards in {tmp_path / 'missing'}"),
             (["--init", str(init), "--data", str(good), "--rehearse", "x", "--rehearse_rows", "0", *out],
              "'rehearse_rows' expects a value >= 1"),
             (["--init", str(init), "--data", str(good), "--val_fraction", "1.5", *out], "'val_fraction' expects"),
             (["--init", str(init), "--data", str(good), "--batch_size", "0", *out], "'batch_size' expects a value >= 1"),
             (["--init", str(init), "--data", str(good), "--lr", "-1", *out], "'lr' expects a value >= 0"),
             (["--init", str(init), "--data", str(good), "--dropout", "1.5", *out], "'dropout' expects a value in"),
             (["--init", str(init), "--data", str(long), *out], "no validation example is left: 1 of 2"),
             (["--init", str(init), "--data", str(good), "--n_layer", "2", *out], "field 'n_layer': the model's shape"),
             (["--init", str(init), "--data", str(good), "--data_vocab", *out], "field 'data_vocab' is pretraining's"),
             (["--init", str(init), "--init_from", str(tmp_path), "--data", str(good), *out], "disagree: give one"),
             # a new run in --out deletes the checkpoints there: never those of the model it fine-tunes
             (["--init", str(init), "--data", str(good), "--out", str(init)], "holds --init"),
             (["--init", str(init / "best"), "--data", str(good), "--out", str(init)], "holds --init")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            finetune.main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err, args
    assert (init / "model.safetensors").exists()
