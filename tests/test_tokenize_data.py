import gzip
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import shards
import tokenize_data
import tokenizer
from conftest import ROOT, SHARED_DATA
from shard_data import ShardData
from tokenize_data import main

DOCS = [
    "The first document.\nIt has two lines.",
    "naïve café — 日本語 🙂",
    "A document that mentions <|endoftext|> and <|user|> as plain text.",
    "Short.",
    "  leading spaces and trailing newline\n",
    "Numbers 12345 and punctuation!?",
]


def write_jsonl(path, records, text_field="text"):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({text_field: r, "id": 1} if isinstance(r, str) else r) + "\n")


def write_json_array(path, records, text_field="text"):
    """A JSON array of records, one line per field (as json.dumps(indent=1) writes it), plain or gzip."""
    text = json.dumps([{text_field: r, "id": 1} for r in records], indent=1, ensure_ascii=False)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


def make_corpus(folder):
    """DOCS spread over every input type, in a folder tree; returns them in the order they are read."""
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[1])
    write_jsonl(folder / "c.jsonl", DOCS[2:3])
    write_json_array(folder / "d.json", DOCS[3:4])
    write_jsonl(folder / "sub" / "e.jsonl.gz", DOCS[4:5])
    write_jsonl(folder / "sub" / "f.json.gz", DOCS[5:])  # JSON Lines in a .json file
    (folder / "logo.png").write_bytes(b"\x89PNG not an input")
    return DOCS


def run(args):
    return main([str(a) for a in args])


def read_split(out, split):
    """The documents of a split: its shards concatenated, cut at every EOT (each document ends with one)."""
    ids = np.concatenate([shards.open_shard(p) for p in shards.list_shards(out, split)])
    assert ids[-1] == tokenizer.EOT_ID
    cuts = np.flatnonzero(ids == tokenizer.EOT_ID)
    return [tokenizer.decode(ids[a:b]) for a, b in zip(np.r_[0, cuts[:-1] + 1], cuts)]


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_over_all_input_types_and_folders(tmp_path, capsys):
    docs = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    meta = run([tmp_path / "corpus", "--out", out, "--val_fraction", "0.3", "--shard_tokens", "16"])
    assert "skipped 1 file(s) of other types in the folders (.png)" in capsys.readouterr().out
    train, val = read_split(out, "train"), read_split(out, "val")
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]  # source order kept
    assert len(train) >= 1 and len(val) >= 1
    split = meta["splits"]
    assert split["train"]["documents"] == len(train) and split["val"]["documents"] == len(val)
    n_train = sum(len(tokenizer.encode(d)) + 1 for d in train)
    assert split["train"]["tokens"] == n_train
    assert [s["tokens"] for s in split["train"]["shards"]][:-1] == [16] * (len(split["train"]["shards"]) - 1)
    assert sum(shards.read_header(out / s["file"]) for s in split["train"]["shards"]) == n_train
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert [s["path"].split("corpus/")[1] for s in meta["sources"]] == \
        ["a.txt", "b.txt.gz", "c.jsonl", "d.json", "sub/e.jsonl.gz", "sub/f.json.gz"]
    for i, name in ((3, "d.json"), (4, "sub/e.jsonl.gz")):
        raw = (tmp_path / "corpus" / name).read_bytes()
        assert (meta["sources"][i]["sha256"], meta["sources"][i]["bytes"]) == \
            (hashlib.sha256(raw).hexdigest(), len(raw))


def write_bom_array(path, records, text_field):
    """A JSON array on one line after a byte order mark and blank lines."""
    path.write_bytes(b"\xef\xbb\xbf\n \r\n" + json.dumps([{text_field: r} for r in records]).encode())


def test_json_lines_and_json_arrays_in_json_files_give_the_shards_of_the_same_jsonl(tmp_path):
    """A .json file holds JSON Lines (Hugging Face datasets' to_json) or a JSON array of records (TinyStories'
    data00.json): both give the shards of the same records in a .jsonl file; meta.json differs only in its sources."""
    docs = DOCS + [f"Story {i}: " + "once upon a time " * i for i in range(30)]
    writers = {"ref.jsonl": write_jsonl, "lines.json": write_jsonl, "array.json": write_json_array,
               "array.json.gz": write_json_array, "lines.JSON.GZ": write_jsonl, "bom.json": write_bom_array}
    results = {}
    for name, write in writers.items():
        write(tmp_path / name, docs, text_field="story")
        out = tmp_path / f"out-{name}"
        meta = run([tmp_path / name, "--out", out, "--text_field", "story", "--val_fraction", "0.2",
                    "--shard_tokens", "256"])
        assert meta.pop("sources")[0]["documents"] == len(docs)
        files = tree(out)
        del files["meta.json"]  # the dict that run returned
        results[name] = meta, files
    reference = results.pop("ref.jsonl")
    assert len(reference[1]) > 4 and reference[0]["splits"]["val"]["documents"] > 1
    assert all(result == reference for result in results.values()), [n for n, r in results.items() if r != reference]
    assert sorted(read_split(tmp_path / "out-array.json", "train") + read_split(tmp_path / "out-array.json", "val")) \
        == sorted(docs)


def test_reruns_are_byte_identical_whatever_the_workers_and_replace_the_output(tmp_path):
    make_corpus(tmp_path / "corpus")
    common = [tmp_path / "corpus", "--val_fraction", "0.2", "--shard_tokens", "10"]
    run(common + ["--out", tmp_path / "one", "--workers", "1"])
    run(common + ["--out", tmp_path / "two", "--workers", "3"])
    first = tree(tmp_path / "one")
    assert len(first) > 4 and first == tree(tmp_path / "two")
    run(common + ["--out", tmp_path / "one", "--workers", "2"])  # replaces the existing output
    assert tree(tmp_path / "one") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "one", "two"]  # no .tmp-/.old- folders left


def test_split_follows_content_not_order_and_seed_changes_it(tmp_path):
    docs = [f"Document number {i} with some words." for i in range(400)]
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b.jsonl", docs[::-1])
    run([tmp_path / "a.jsonl", "--out", tmp_path / "a", "--val_fraction", "0.1"])
    run([tmp_path / "b.jsonl", "--out", tmp_path / "b", "--val_fraction", "0.1"])
    run([tmp_path / "a.jsonl", "--out", tmp_path / "s", "--val_fraction", "0.1", "--seed", "7"])
    val_a, val_b, val_s = (set(read_split(tmp_path / d, "val")) for d in "abs")
    assert val_a == val_b
    assert 20 <= len(val_a) <= 70  # about 10% of 400
    assert val_s != val_a


def test_tiny_corpus_still_gets_a_val_document(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", ["one", "two"])
    meta = run([tmp_path / "t.jsonl", "--out", tmp_path / "o"])
    assert (meta["splits"]["val"]["documents"], meta["splits"]["train"]["documents"]) == (1, 1)


def test_val_is_chosen_by_content_alone_and_copies_stay_together(tmp_path, capsys):
    """No document is forced into val: with none hashed below --val_fraction, val is the one with the lowest hash
    (and its copies), whatever the order; a long first file no longer takes the val split from the rest."""
    write_jsonl(tmp_path / "dup.jsonl", ["same doc", "x", "y", "z", "same doc"])
    for seed in range(8):  # tiny shards: the documents moved to val may span shards
        run([tmp_path / "dup.jsonl", "--out", tmp_path / "o", "--seed", seed, "--shard_tokens", 2])
        train, val = read_split(tmp_path / "o", "train"), read_split(tmp_path / "o", "val")
        assert "same doc" not in train or "same doc" not in val, seed
        assert len(set(val)) == 1 and len(train) + len(val) == 5, seed
    assert "the val split is the one with the lowest hash" in capsys.readouterr().out
    vals = set()
    for name, files in (("ab", {"a.txt": "word " * 5000, "b.txt": "tiny doc"}),
                        ("ba", {"a.txt": "tiny doc", "b.txt": "word " * 5000})):
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        run([tmp_path / name, "--out", tmp_path / f"out-{name}"])
        vals.add(tuple(read_split(tmp_path / f"out-{name}", "val")))
    assert len(vals) == 1 and len(vals.pop()) == 1  # the same one document, first in one order, last in the other


def test_val_fraction_zero_is_refused(tmp_path, capsys):
    write_jsonl(tmp_path / "t.jsonl", DOCS)
    with pytest.raises(SystemExit) as e:
        run([tmp_path / "t.jsonl", "--out", tmp_path / "o", "--val_fraction", "0"])
    assert e.value.code == 2 and "--val_fraction must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_too_small_splits_say_how_to_grow_them(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [f"Document {i}: " + "some words " * 10 for i in range(60)])
    for fraction, small, fix in (("0.05", "val", "larger"), ("0.95", "train", "smaller")):
        run([tmp_path / "t.jsonl", "--out", tmp_path / "o", "--val_fraction", fraction])
        with pytest.raises(shards.ShardError) as e:
            ShardData(tmp_path / "o", 512, 1, 0, 1)
        assert f"{small}: every shard is shorter than a window of 513 tokens" in str(e.value)
        assert f"run tokenize_data.py again with more text, or a {fix} --val_fraction" in str(e.value)


def test_txt_paragraphs_makes_a_document_per_paragraph(tmp_path, capsys):
    (tmp_path / "play.txt").write_text("First speech.\nStill first.\n\nSecond speech.\n \n\nThird.\n")
    with pytest.raises(SystemExit) as e:  # one document cannot fill both splits
        run([tmp_path / "play.txt", "--out", tmp_path / "o"])
    assert e.value.code == 2 and "--txt_paragraphs" in capsys.readouterr().err
    meta = run([tmp_path / "play.txt", "--out", tmp_path / "o", "--txt_paragraphs"])
    assert sorted(read_split(tmp_path / "o", "val") + read_split(tmp_path / "o", "train")) == \
        ["First speech.\nStill first.", "Second speech.", "Third.\n"]
    assert meta["sources"][0]["documents"] == 3


def bad_cases(tmp_path):
    """(file to tokenize, text the error must contain)."""
    cases = []
    p = tmp_path / "utf8.txt"
    p.write_bytes(b"line one\nline two \xff\xfe here\n")
    cases.append((p, f"{p}:2: invalid UTF-8"))
    p = tmp_path / "utf8.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n{"text": "bad \xc3"}\n')
    cases.append((p, f"{p}:3: invalid UTF-8"))
    p = tmp_path / "windows.txt"  # a Windows "Unicode" export
    p.write_text("Some text\nfrom Windows\n", encoding="utf-16")
    cases.append((p, f"{p}:1: invalid UTF-8 at byte 0 of the file (invalid start byte): it starts with a UTF-16 byte "
                     "order mark; convert UTF-16 to UTF-8"))
    p = tmp_path / "no_bom.txt"  # valid UTF-8, but a NUL after every character: it was tokenized as that
    p.write_bytes("Some text\nwithout a byte order mark".encode("utf-16-le"))
    cases.append((p, f"{p}:1: a NUL byte at byte 1 of the file: not text, or UTF-16 without a byte order mark"))
    p = tmp_path / "nul.md"
    p.write_bytes(b"text\nand then \x00 binary")
    cases.append((p, f"{p}:2: a NUL byte at byte 14"))
    p = tmp_path / "json.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "unterminated}\n')
    cases.append((p, f"{p}:2: malformed JSON"))
    p = tmp_path / "cut.jsonl"
    write_jsonl(p, DOCS)
    p.write_text(p.read_text() + '{"text": "broken", \n')
    cases.append((p, f"{p}:7: malformed JSON at column 20:"))
    p = tmp_path / "field.jsonl.gz"
    write_jsonl(p, ["ok", {"content": "no text field"}])
    cases.append((p, f"{p}:2: missing field 'text'"))
    p = tmp_path / "type.jsonl"
    write_jsonl(p, [{"text": ["not", "a", "string"]}])
    cases.append((p, f"{p}:1: field 'text' must be a string, got list"))
    p = tmp_path / "array.jsonl"  # a .jsonl file is JSON Lines whatever it starts with; a .json file may be an array
    p.write_text('["a JSON array"]\n')
    cases.append((p, f"{p}:1: expected a JSON object"))
    p = tmp_path / "two_arrays.json"  # datasets' to_json(lines=False) writes an array per 1,000 records
    p.write_text(json.dumps([{"text": "a"}]) + "\n" + json.dumps([{"text": "b"}]) + "\n")
    cases.append((p, f"{p}:2: text after the closing ']' of the JSON array (a second array, as datasets' "))
    p = tmp_path / "broken_array.json"
    p.write_text('[\n{"text": "ok"},\n{"text": oops}\n]')
    cases.append((p, f"{p}:3: malformed JSON at column 10: Expecting value"))
    p = tmp_path / "no_comma.json.gz"
    p.write_bytes(gzip.compress(b'[{"text": "a"}\n {"text": "b"}]'))
    cases.append((p, f"{p}:2: expected ',' or ']' after a record of the JSON array"))
    p = tmp_path / "record.json"
    p.write_text(json.dumps([{"text": "ok"}, {"content": "no text field"}], indent=1))  # item 1 starts on line 5
    cases.append((p, f"{p}:5 (array item 1): missing field 'text' (the record has: content)"))
    p = tmp_path / "strings.json"
    p.write_text('[{"text": "ok"}, "a string"]')
    cases.append((p, f"{p}:1 (array item 1): expected a JSON object with a string field 'text', got str"))
    p = tmp_path / "latin1.json"
    p.write_bytes('[\n{"text": "café"}]'.encode("latin-1"))
    cases.append((p, f"{p}:2: invalid UTF-8 at byte 15 of the file"))
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    cases.append((p, "empty corpus"))
    p = tmp_path / "truncated.jsonl.gz"
    write_jsonl(p, ["x" * 1000] * 50)
    p.write_bytes(p.read_bytes()[:-30])
    cases.append((p, f"{p}:44: cannot read the file: Compressed file ended"))
    cases.append((tmp_path / "missing.jsonl", "missing.jsonl: no such file or folder"))
    for name, target in (("gone", "nowhere/book.txt"), ("loop", "book.txt")):  # was skipped without a word
        (tmp_path / name).mkdir()
        (tmp_path / name / "other.txt").write_text("A file that is there.")
        (tmp_path / name / "book.txt").symlink_to(target)
        cases.append((tmp_path / name, f"{tmp_path / name / 'book.txt'}: broken symbolic link"))
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    cases.append((p, "unsupported file type"))
    return cases


def test_every_bad_input_exits_2_naming_file_and_line(tmp_path, capsys):
    for path, message in bad_cases(tmp_path):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            run([path, "--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2, path
        assert message in err, (message, err)
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # nothing half-written left behind


def test_text_of_other_systems_and_more_file_names_are_read(tmp_path, capsys):
    """CRLF and CR line ends become newlines, a byte order mark is dropped, .md is text, suffixes ignore case, and the
    files a folder holds of other types are counted in the summary."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "dos.txt").write_bytes(b"\xef\xbb\xbfOne\r\nstill one\r\n\r\nTwo\r\n")
    (tmp_path / "in" / "mac.TXT").write_bytes(b"Three\rstill three\r\rFour")
    (tmp_path / "in" / "notes.md").write_text("# Five\n\nSix")
    (tmp_path / "in" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "Seven"}).encode() + b"\n")
    write_jsonl(tmp_path / "in" / "upper.JSONL.GZ", ["Eight"])
    (tmp_path / "in" / "data.csv").write_text("a,b\n")
    (tmp_path / "in" / "Makefile").write_text("all:\n")
    run([tmp_path / "in", "--out", tmp_path / "o", "--txt_paragraphs"])
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == sorted(
        ["One\nstill one", "Two\n", "Three\nstill three", "Four", "# Five", "Six", "Seven", "Eight"])
    assert "skipped 2 file(s) of other types in the folders (.csv, Makefile)" in capsys.readouterr().out


def test_hidden_files_in_folders_are_skipped_and_counted(tmp_path, capsys):
    """macOS's ._NAME files (binary) stopped the run; Jupyter's checkpoints were a second copy of the corpus."""
    (tmp_path / "in" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "in" / "__MACOSX").mkdir()
    (tmp_path / "in" / "book.txt").write_text("The book.")
    (tmp_path / "in" / "._book.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X\xb0\xff")
    (tmp_path / "in" / "__MACOSX" / "._book.txt").write_bytes(b"\x00\x05\x16\x07\xb0\xff")
    (tmp_path / "in" / ".ipynb_checkpoints" / "book-checkpoint.txt").write_text("The book.")
    (tmp_path / "in" / "__init__.txt").write_text("A file, not a folder, may start with __.")
    (tmp_path / "in" / "__MACOSX" / "gone.txt").symlink_to("nowhere.txt")  # hidden, so no missing input
    run([tmp_path / "in", "--out", tmp_path / "o"])
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == \
        ["A file, not a folder, may start with __.", "The book."]
    assert "skipped 3 hidden file(s) in the folders" in capsys.readouterr().out
    (tmp_path / "in" / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("Notes.")
    run([tmp_path / "in" / ".ipynb_checkpoints", "--out", tmp_path / "o"])  # a hidden folder named is read
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == ["Notes.", "The book."]


def test_skip_bad_skips_and_counts(tmp_path, capsys):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"text": "good one"}\n{"text": 3}\nnot json\n{"text": "good two"}\n{"text": "good three"}\n')
    meta = run([p, "--out", tmp_path / "o", "--skip-bad"])
    assert meta["skipped_bad_records"] == 2 and meta["sources"][0]["bad_records"] == 2
    assert meta["sources"][0]["documents"] == 3
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == \
        ["good one", "good three", "good two"]
    err = capsys.readouterr().err
    assert f"{p}:2:" in err and f"{p}:3:" in err
    (tmp_path / "bad.txt").write_bytes(b"a whole book with one bad byte \xff")
    run([p, tmp_path / "bad.txt", "--out", tmp_path / "o", "--skip-bad"])
    assert "skipped 3 bad records (--skip_bad), 1 file(s) left with no document (a .txt file or JSON array that is " \
        "not UTF-8 text is skipped whole)" in capsys.readouterr().out


def test_skip_bad_skips_the_bad_records_of_a_json_array_but_not_a_broken_array(tmp_path, capsys):
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps([{"text": "good one"}, {"content": "x"}, {"text": "good two"}, 7], indent=1))
    meta = run([p, "--out", tmp_path / "o", "--skip-bad"])
    assert meta["skipped_bad_records"] == 2 and (meta["sources"][0]["documents"], meta["sources"][0]["bad_records"]) \
        == (2, 2)
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == ["good one", "good two"]
    err = capsys.readouterr().err
    assert f"skipping {p}:5 (array item 1): missing field 'text'" in err
    assert f"skipping {p}:11 (array item 3): expected a JSON object" in err
    p.write_text(json.dumps([{"text": "good one"}]) + json.dumps([{"text": "good two"}]))  # where is the next record?
    with pytest.raises(SystemExit) as e:
        run([p, "--out", tmp_path / "o", "--skip-bad"])
    assert e.value.code == 2 and f"{p}:1: text after the closing ']'" in capsys.readouterr().err


def test_a_metadata_json_in_a_corpus_folder_is_named_as_such_and_skipped_under_skip_bad(tmp_path, capsys):
    """A data set's folder often holds a pretty-printed object beside its data (dataset_info.json): neither records
    nor JSON Lines. The error says what it looks like; --skip_bad leaves it out as one bad record."""
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "train.jsonl", DOCS[:3])
    (tmp_path / "c" / "dataset_info.json").write_text(json.dumps({"features": {"text": "string"}}, indent=2))
    with pytest.raises(SystemExit) as e:
        run([tmp_path / "c", "--out", tmp_path / "o"])
    assert e.value.code == 2
    assert f"{tmp_path / 'c' / 'dataset_info.json'}:1: one JSON object over several lines" in capsys.readouterr().err
    meta = run([tmp_path / "c", "--out", tmp_path / "o", "--skip-bad"])
    assert meta["skipped_bad_records"] == 1
    assert sorted(read_split(tmp_path / "o", "train") + read_split(tmp_path / "o", "val")) == sorted(DOCS[:3])


def test_lone_surrogate_in_json_becomes_replacement_character(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "first"}\n{"text": "broken \\ud83d emoji"}\n')
    run([p, "--out", tmp_path / "o"])
    assert read_split(tmp_path / "o", "train") == ["broken \ufffd emoji"]


def test_temporaries_of_dead_runs_are_removed_and_ctrl_c_ends_quietly(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "t.jsonl", DOCS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(dead.stdout), os.getppid()):  # a process that has exited, and one that is alive
        (tmp_path / f"o.tmp-{pid}" / "train").mkdir(parents=True)
    run([tmp_path / "t.jsonl", "--out", tmp_path / "o"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", f"o.tmp-{os.getppid()}", "t.jsonl"]

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tokenize_data, "encode_batch", interrupt)
    with pytest.raises(SystemExit) as e:
        run([tmp_path / "t.jsonl", "--out", tmp_path / "p"])
    assert e.value.code == 130 and capsys.readouterr().err.strip().endswith("interrupted; nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", f"o.tmp-{os.getppid()}", "t.jsonl"]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    write_jsonl(tmp_path / "t.jsonl", ["one", "two"])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        run([tmp_path / "t.jsonl", "--out", tmp_path / "precious"])
    assert e.value.code == 2 and "not an output of tokenize_data.py" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_truncated_shard_is_detected(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", DOCS)
    meta = run([tmp_path / "t.jsonl", "--out", tmp_path / "o"])
    shard = tmp_path / "o" / meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(shards.ShardError, match="truncated"):
        shards.read_header(shard)


def test_demo_corpus_when_no_input(tmp_path):
    meta = run(["--out", tmp_path / "demo"])
    for split in ("train", "val"):
        assert meta["splits"][split]["documents"] > 0
        assert shards.open_shard(shards.list_shards(tmp_path / "demo", split)[0]).size > 0
    assert meta["sources"][0]["path"].startswith("demo_data.pretrain_documents")


def test_missing_bpe_file_stops_with_its_message_and_leaves_nothing(tmp_path, monkeypatch):
    """The BPE now loads in a worker while the input is read: its error still ends the run, with no output left."""
    def missing():
        raise tokenizer.TokenizerNotFound("GPT-2 BPE file not found")
    monkeypatch.setattr(tokenizer, "_ENCODING", None)
    monkeypatch.setattr(tokenizer, "_RANKS", None)  # the workers' copies are built from these
    monkeypatch.setattr(tokenizer, "_load_ranks", missing)
    write_jsonl(tmp_path / "t.jsonl", DOCS)
    with pytest.raises(SystemExit) as e:
        run([tmp_path / "t.jsonl", "--out", tmp_path / "o"])
    assert e.value.code == "error: GPT-2 BPE file not found"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_command_line_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "tokenize_data.py", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "nope.txt: no such file or folder" in r.stderr


@pytest.mark.skipif(not (SHARED_DATA / "pretrain/gutenberg_top100_authors/val.jsonl.gz").exists(),
                    reason="shared data not present")
def test_real_gutenberg_slice_matches_the_published_token_counts(tmp_path):
    with gzip.open(SHARED_DATA / "pretrain/gutenberg_top100_authors/val.jsonl.gz", "rt", encoding="utf-8") as f:
        books = [json.loads(next(f)) for _ in range(2)]  # two whole books, each with its published token count
    write_jsonl(tmp_path / "slice.jsonl.gz", books)
    meta = run([tmp_path / "slice.jsonl.gz", "--out", tmp_path / "o"])
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(b["n_tokens"] + 1 for b in books)
    assert sorted(read_split(tmp_path / "o", "val") + read_split(tmp_path / "o", "train")) == \
        sorted(b["text"] for b in books)


def pinned_corpus(folder):
    """Over 1M characters (several encoding batches) of seeded text in every input type, gzip in two members."""
    rng = random.Random(0)
    words = ["the", "a", "naïve", "café", "日本語", "🙂", "<|endoftext|>", "12345", "don't", "\t", "--", "Hello"]
    books = ["\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))
                         for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    folder.mkdir()
    (folder / "a.txt").write_text(books[0], encoding="utf-8")
    write_jsonl(folder / "b.jsonl", DOCS + books[1:10])
    with open(folder / "c.jsonl.gz", "wb") as f:
        for part in (books[10:25], books[25:]):
            f.write(gzip.compress("".join(json.dumps({"text": b}) + "\n" for b in part).encode(), mtime=0))
    return [books[0], *DOCS, *books[1:]]


def test_shards_are_byte_identical_to_the_pinned_output(tmp_path):
    """The shard files of a fixed corpus, pinned by hash (made by the version before the reading and encoding
    were reworked), and their tokens are tiktoken's, document after document."""
    docs = pinned_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    meta = run([tmp_path / "corpus", "--out", out, "--val_fraction", "0.1", "--shard_tokens", "100000"])
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            digest.update(shard["file"].encode() + (out / shard["file"]).read_bytes())
    assert digest.hexdigest() == "4d31643ad69fcc4d6e97a9a11907e05c05b10ab983d3c3c538c9cfa4dd770ced"
    assert [(meta["splits"][s]["tokens"], meta["splits"][s]["documents"]) for s in ("train", "val")] == \
        [(551872, 39), (71226, 7)]
    val = set(read_split(out, "val"))
    enc = tokenizer.get_encoding()
    for split, in_split in (("train", lambda d: d not in val), ("val", lambda d: d in val)):
        ids = np.concatenate([shards.open_shard(p) for p in shards.list_shards(out, split)])
        expected = [t for d in docs if in_split(d) for t in [*enc.encode_ordinary(d), tokenizer.EOT_ID]]
        assert ids.tolist() == expected, split
