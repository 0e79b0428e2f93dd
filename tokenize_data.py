"""Tokenize text into GPT-2 token shards for pretraining, with a held-out validation split.

usage: python tokenize_data.py [INPUT ...] [--out DIR] [--field value ...]

INPUT is a .txt, .md, .txt.gz or .md.gz file (the whole file is one document, or with --txt_paragraphs each
paragraph, i.e. text between blank lines; CRLF and CR line ends are read as newlines), a .jsonl or .jsonl.gz file
(JSON Lines: one record per line, its field --text_field the document), a .json or .json.gz file (JSON Lines as in
a .jsonl file, as Hugging Face datasets' to_json writes them, or one JSON array of such records, as TinyStories'
[{"story": ...}, ...]: a file whose first character that is not blank is '['), or a folder searched recursively for
such files, in sorted order (the files of other types are skipped and counted in the summary, as are hidden files:
names starting with '.' and folders with '.' or '__', such as macOS's ._NAME and __MACOSX). Suffixes may be in any
case, and a file may start with a UTF-8 byte order mark.
With no INPUT the built-in demo corpus (demo_data.pretrain_documents) is tokenized into data/demo.

DIR receives train/train_000000.bin ... and val/val_000000.bin ... (the shards.py format, --shard_tokens tokens
each, the last one shorter) and meta.json (tokenizer, token and document counts per split, the shard list, and
the size and sha256 of every source file). Every document is followed by <|endoftext|> (id 50256); empty
documents are skipped. Everything is written into DIR.tmp-PID and renamed to DIR at the end, so a DIR that
exists is complete; a DIR.tmp-PID left by a killed run (no process PID alive) is deleted by the next run, and
Ctrl-C leaves nothing. The same input gives byte-identical output, whatever the number of workers.

Validation split: a document goes to val when a hash of its tokens (keyed by --seed) falls below --val_fraction,
so the split does not depend on file order or batching, and exact duplicates never straddle it. When no hash falls
below it (a small corpus), val is the document with the lowest hash and its copies, so that even a tiny corpus
has a validation split.

Bad input (a missing file, invalid UTF-8, a malformed JSON line, a record that is not an object with a string text
field, an empty corpus) stops with an error naming the file and line (and a JSON array's item), exit code 2.
--skip_bad skips bad records and counts them (a .txt file or a JSON array that is not UTF-8 text is one bad record:
the whole file is skipped). A JSON array that is malformed or followed by more text (the second array of datasets'
to_json(lines=False), say) stops the run even with --skip_bad: where the records after the fault start is unknown.

Memory stays flat whatever the corpus size: files are streamed and encoded in batches of about 1 MB of text,
with at most two batches per worker in flight. What it does grow with is the shard buffer (2 bytes per token,
up to --shard_tokens per split, allocated as it fills), the largest single document, and the largest JSON array
file: an array is read whole (its bytes and its text), where JSON Lines, in a .json file too, are read a line at a
time (BENCHMARKS.md, Tokenizer).
"""

import ctypes
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import config
import shards
import tokenizer
from atomic import replace_dir
from input_files import InputError, RecordError, expand_folders, json_array, json_line, skipped_files, utf8_text

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".md.gz")  # compared in lower case, as are the others
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")  # JSON Lines, or a JSON array of records
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES
DEMO_OUT = "data/demo"
BATCH_CHARS = 1 << 20  # text per encoding task: large enough to amortize the task, small enough to keep memory flat
MAX_SHOWN_BAD = 10  # skipped records printed one by one under --skip_bad; the rest are only counted


@dataclass
class TokenizeConfig:
    out: str = ""  # output folder; required with INPUT, data/demo for the demo corpus
    text_field: str = "text"  # the field of a JSON record (.jsonl, .json) that holds the document
    txt_paragraphs: bool = False  # a .txt file gives one document per paragraph (blank-line separated), not one
    val_fraction: float = 0.005  # share of documents held out for validation (above 0; at least one document)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB)
    workers: int = 0  # encoding threads; 0 = one per CPU core
    skip_bad: bool = False  # skip bad records (and count them) instead of stopping at the first one
    seed: int = 0  # keys the train/val hash; also the seed of the demo corpus


class BadInput(Exception):
    """Input that cannot be tokenized; the message names the file and line. Exit code 2."""


class BadRecord(Exception):
    """One bad document; becomes BadInput, or is counted under --skip_bad."""


# ----------------------------------------------------------------------------- reading

def find_sources(inputs: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """(the input files in order: arguments as given, folders expanded recursively in sorted order; the files of
    other types found in the folders, and their hidden files, which are both skipped: input_files.expand_folders)."""
    paths = [Path(arg) for arg in inputs]
    for path in paths:
        if path.is_file() and not is_input(path):
            raise BadInput(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
        if not (path.is_file() or path.is_dir()):
            raise BadInput(f"{path}: no such file or folder")
    try:
        files, others, hidden = expand_folders(paths, SUFFIXES)
    except InputError as e:
        raise BadInput(str(e)) from None
    # a file named twice (directly and through its folder) is read once
    return list(dict.fromkeys(files)), others, hidden


def is_input(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


class HashingReader(io.RawIOBase):
    """A binary file that keeps the sha256 and size of the bytes read from it, so each input is read once."""

    def __init__(self, path: Path):
        super().__init__()
        self.file = open(path, "rb", buffering=0)
        self.sha256, self.size = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.file.readinto(buf)
        self.sha256.update(memoryview(buf)[:n])
        self.size += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def parse_jsonl_line(line: bytes, lineno: int, text_field: str) -> str:
    try:  # without its newline, so that an error's column is on this line; a byte order mark is no JSON: dropped
        text = line.rstrip(b"\n").decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None
    try:
        return document(json_line(text, lineno), text_field)
    except RecordError as e:
        raise BadRecord(f"malformed JSON at column {e.column}: {e.why}") from None


def document(record, text_field: str) -> str:
    """The document of a JSON record: its string field `text_field`."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object with a string field '{text_field}', got {type(record).__name__}")
    if text_field not in record:
        raise BadRecord(f"missing field '{text_field}' (the record has: {', '.join(list(record)[:10]) or 'no fields'}); "
                        "choose the field with --text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecord(f"field '{text_field}' must be a string, got {type(text).__name__}")
    return text


def decode_file(path: Path, data: bytes, bad) -> str | None:
    """A whole file's bytes as UTF-8 text, less a byte order mark (input_files.utf8_text); for invalid UTF-8 or a NUL
    byte, `bad` (the file is one bad record) and None."""
    try:
        return utf8_text(data)
    except RecordError as e:
        bad(f"{path}:{e.line}", e.why)
        return None


def json_head(stream) -> tuple[list[bytes], bool]:
    """The lines of a .json file up to its first that is not blank, and whether that one starts a JSON array."""
    head = []
    for line in stream:
        head.append(line)
        start = line.removeprefix(b"\xef\xbb\xbf").lstrip()  # after a byte order mark
        if start:
            return head, start.startswith(b"[")
    return head, False


def array_documents(path: Path, head: list[bytes], stream, text_field: str, bad):
    """The documents of a .json file that holds a JSON array of records, read whole: `head` (json_head's lines) and
    the rest of `stream`. A bad record is named by its line and item; JSON that is not one array stops the run even
    with --skip_bad (where the records after it start is not known)."""
    text = decode_file(path, b"".join(head) + stream.read(), bad)
    if text is None:
        return
    try:
        for line, item, record in json_array(text):
            try:
                doc = document(record, text_field)
            except BadRecord as e:
                bad(f"{path}:{line} (array item {item})", str(e))
                continue
            yield doc
    except RecordError as e:
        why = f"malformed JSON at column {e.column}: {e.why}" if e.column else e.why
        raise BadInput(f"{path}:{e.line}: {why}") from None


def read_file(path: Path, text_field: str, txt_paragraphs: bool, source: dict, bad):
    """Yield the documents of one input file; `bad(where, why)` raises or counts. Fills `source` (size, sha256)."""
    try:
        raw = HashingReader(path)
    except OSError as e:
        raise BadInput(f"{path}: cannot open the file: {e.strerror}") from None
    name = path.name.lower()
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else io.BufferedReader(raw, 1 << 20)
    lineno = 0
    try:
        if name.endswith(TEXT_SUFFIXES):
            text = decode_file(path, stream.read(), bad)
            if text is not None:  # Windows (CRLF) and old Mac (CR) line ends become newlines
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield from re.split(r"\n(?:[ \t]*\n)+", text) if txt_paragraphs else [text]
        else:  # JSON Lines, streamed; a .json file may hold a JSON array instead
            head, array = json_head(stream) if name.endswith(JSON_SUFFIXES) else ([], False)
            if array:
                yield from array_documents(path, head, stream, text_field, bad)
            else:
                for lineno, line in enumerate(itertools.chain(head, stream), 1):
                    if not line.strip():  # blank lines between records are allowed
                        continue
                    if line.strip() == b"{" and name.endswith(JSON_SUFFIXES):  # json.dump(..., indent=N) of one object
                        bad(f"{path}:{lineno}", "one JSON object over several lines, not records (JSON Lines or an "
                                                "array): a data set's metadata, such as dataset_info.json? Name the "
                                                "data files instead of their folder, or move it out")
                        break
                    try:
                        text = parse_jsonl_line(line, lineno, text_field)
                    except BadRecord as e:
                        bad(f"{path}:{lineno}", str(e))
                        continue
                    yield text
        while raw.read(1 << 20):  # hash whatever the decompressor did not need (padding, trailing bytes)
            pass
    except (OSError, EOFError, zlib.error) as e:
        where = f"{path}:{lineno + 1}" if lineno else str(path)
        raise BadInput(f"{where}: cannot read the file: {e}") from None
    finally:
        stream.close()
        raw.close()
    source.update(bytes=raw.size, sha256=raw.sha256.hexdigest())


def demo_documents(seed: int):
    from demo_data import pretrain_documents  # imported only when used: start-up time counts on small inputs
    return pretrain_documents(seed=seed)


def batches(documents, max_chars: int = BATCH_CHARS):
    """Group documents into lists of about `max_chars` characters (a longer document is a batch of its own)."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- encoding

EOT = np.array([tokenizer.EOT_ID], dtype=np.uint32)
NO_TOKENS = np.zeros(0, dtype=np.uint16)


HASHES = 2**64  # doc_hash's range: a document goes to val when its hash is below val_fraction * HASHES


def doc_hash(ids: np.ndarray, key: bytes) -> int:
    """The first 8 bytes of sha256(key, tokens) as a number in [0, HASHES)."""
    digest = hashlib.sha256(key)
    digest.update(np.ascontiguousarray(ids, dtype="<u4"))
    return int.from_bytes(digest.digest()[:8], "little")


def encode_batch(docs: list[str], key: bytes, val_fraction: float):
    """Tokens of a batch of documents, each followed by EOT, split into (train, val) uint16 arrays, plus the counts of
    documents and the lowest hash in train (HASHES if none). Each worker encodes with its own copy of the tokenizer
    (threads sharing one are slower).

    Runs in a worker thread: tiktoken releases the GIL while it encodes, so threads use every core without
    pickling text to other processes. encode_to_numpy also skips the Python list of ints that encode_ordinary
    builds under the GIL, which is what keeps encode_ordinary_batch from scaling with threads (BENCHMARKS.md).
    """
    enc = tokenizer.thread_encoding()
    pieces = ([], [])  # train, val
    lowest = HASHES
    for doc in docs:
        try:
            ids = enc.encode_to_numpy(doc, disallowed_special=())  # special-token text stays plain text
        except UnicodeEncodeError:  # a lone surrogate from JSON ("\ud800") becomes U+FFFD, as in tiktoken's encode()
            ids = enc.encode_to_numpy(doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
                                      disallowed_special=())
        h = doc_hash(ids, key)
        to_val = h < val_fraction * HASHES
        pieces[to_val].extend((ids, EOT))
        if not to_val:
            lowest = min(lowest, h)
    train, val = (np.concatenate(p, dtype=np.uint16, casting="unsafe") if p else NO_TOKENS for p in pieces)
    return train, val, len(pieces[0]) // 2, len(pieces[1]) // 2, lowest


def encode_in_order(batches, workers: int, key: bytes, val_fraction: float):
    """encode_batch over `batches` in `workers` threads. Results come back in submission order, so the output does
    not depend on which thread finishes first; at most 2 batches per worker are in flight, so memory stays flat.
    The BPE file loads in the worker that takes the first batch, while this thread reads the next ones (a missing
    BPE file raises from the first result)."""
    with ThreadPoolExecutor(workers) as pool:
        in_flight = deque()
        for batch in batches:
            in_flight.append(pool.submit(encode_batch, batch, key, val_fraction))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


class ShardWriter:
    """Collects a split's tokens into a fixed-size buffer and writes it out as a shard each time it is full."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split = folder / split, split
        self.folder.mkdir(parents=True)
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # pages are only allocated as they are written
        self.n = 0
        self.shards = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += tokens.size
        while tokens.size:
            k = min(tokens.size, self.buf.size - self.n)
            self.buf[self.n:self.n + k] = tokens[:k]
            self.n += k
            tokens = tokens[k:]
            if self.n == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.n:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            shards.write_shard(self.folder / name, self.buf[:self.n])
            self.shards.append({"file": f"{self.split}/{name}", "tokens": self.n})
            self.n = 0

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def shard_documents(paths: list[Path]):
    """The documents of a split's shards in order, each an array of its tokens and EOT; one may span shards."""
    head = []  # the start of a document that began in an earlier shard
    for path in paths:
        ids = shards.open_shard(path)
        start = 0
        for end in np.flatnonzero(ids == tokenizer.EOT_ID) + 1:
            yield np.concatenate(head + [ids[start:end]])
            head, start = [], end
        head.append(ids[start:])


def hold_out_lowest(tmp: Path, lowest: int, key: bytes, shard_tokens: int):
    """(train, val) ShardWriters with the documents whose hash is `lowest` moved from tmp/train to tmp/val (all copies
    of one document: they share its hash). The fallback when no hash fell below val_fraction, which happens to small
    corpora: the train split is read back and written again."""
    everything = tmp / "train.all"
    os.rename(tmp / "train", everything)
    shutil.rmtree(tmp / "val")
    train, val = (ShardWriter(tmp, split, shard_tokens) for split in ("train", "val"))
    for doc in shard_documents(sorted(everything.glob("*.bin"))):
        (val if doc_hash(doc[:-1], key) == lowest else train).add(doc, 1)
    train.flush()
    val.flush()
    shutil.rmtree(everything)
    return train, val


# ----------------------------------------------------------------------------- the whole run

def tokenize(inputs: list[str], cfg: TokenizeConfig) -> dict:
    """Tokenize `inputs` (or the demo corpus) into cfg.out; returns meta.json's content."""
    if not 0 < cfg.val_fraction < 1:  # pretrain.py evaluates on the val split: it must not be empty
        raise BadInput(f"--val_fraction must be above 0 and below 1 (pretraining needs a val split), "
                       f"got {cfg.val_fraction}")
    if cfg.shard_tokens < 1 or cfg.workers < 0:
        raise BadInput("--shard_tokens must be >= 1 and --workers >= 0")
    if inputs and not cfg.out:
        raise BadInput("--out DIR is required when INPUT files are given")
    out = Path(cfg.out or DEMO_OUT)
    if out.exists() and not (out.is_dir() and ((out / "meta.json").is_file() or not any(out.iterdir()))):
        raise BadInput(f"--out {out}: exists and is not an output of tokenize_data.py (no meta.json); "
                       "refusing to replace it, choose another folder")
    files, others, hidden = find_sources(inputs)
    workers = cfg.workers or config.usable_cores()

    sources, skipped = [], []  # one entry per input file (for meta.json); the bad records skipped

    def bad(where: str, why: str) -> None:
        if not cfg.skip_bad:
            raise BadInput(f"{where}: {why}")
        if len(skipped) < MAX_SHOWN_BAD:
            print(f"skipping {where}: {why}", file=sys.stderr)
        skipped.append(where)
        sources[-1]["bad_records"] += 1

    def documents():
        for path in files or [None]:  # None: the demo corpus
            sources.append({"path": str(path) if path else f"demo_data.pretrain_documents(seed={cfg.seed})",
                            "documents": 0, "bad_records": 0})
            texts = read_file(path, cfg.text_field, cfg.txt_paragraphs, sources[-1], bad) if path \
                else demo_documents(cfg.seed)
            for text in texts:
                if text:  # an empty document would only add an EOT
                    sources[-1]["documents"] += 1
                    yield text

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.time()
    try:
        train, val = (ShardWriter(tmp, split, cfg.shard_tokens) for split in ("train", "val"))
        key = cfg.seed.to_bytes(8, "little", signed=True)
        lowest = HASHES  # the lowest hash in train
        with tqdm(unit="tok", unit_scale=True, desc=f"tokenize -> {out}",
                  mininterval=config.progress_interval()) as progress:
            for train_ids, val_ids, n_train, n_val, low in encode_in_order(batches(documents()), workers, key,
                                                                           cfg.val_fraction):
                train.add(train_ids, n_train)
                val.add(val_ids, n_val)
                lowest = min(lowest, low)
                progress.update(train_ids.size + val_ids.size)
        train.flush()
        val.flush()
        fallback = val.documents == 0 and train.documents > 0
        if fallback:
            train, val = hold_out_lowest(tmp, lowest, key, cfg.shard_tokens)

        n_docs = train.documents + val.documents
        where = ", ".join(inputs) or "the demo corpus"
        if n_docs == 0:
            raise BadInput(f"{where}: empty corpus, no documents to tokenize" +
                           (f" ({len(skipped)} bad records skipped)" if skipped else ""))
        if train.documents == 0:
            raise BadInput(f"{where}: all {n_docs} document(s) went to the val split, none is left to train on: add "
                           "(different) documents, lower --val_fraction, or for .txt files use --txt_paragraphs")
        meta = meta_json(cfg, train, val, len(skipped), sources)
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    elapsed = time.time() - start
    total = train.tokens + val.tokens
    print(f"tokenize_data: {total:,} tokens from {n_docs:,} documents in {elapsed:.1f} s ({total / elapsed / 1e6:.2f}M tok/s): "
          f"train {train.tokens:,} tokens / {train.documents:,} docs / {len(train.shards)} shards, "
          f"val {val.tokens:,} / {val.documents:,} / {len(val.shards)} -> {out}")
    if fallback:
        print("tokenize_data: no document's hash fell below --val_fraction, so the val split is the one with the "
              "lowest hash (and its copies); more documents or a larger --val_fraction give a larger one")
    for line in skipped_files(others, hidden, SUFFIXES):
        print(f"tokenize_data: {line}")
    if skipped:
        emptied = sum(1 for s in sources if s["bad_records"] and not s["documents"])
        print(f"tokenize_data: skipped {len(skipped)} bad records (--skip_bad)" +
              (f", {emptied} file(s) left with no document (a .txt file or JSON array that is not UTF-8 text is "
               "skipped whole)" if emptied else "") +
              f"; per file counts in {out}/meta.json")
    return meta


def meta_json(cfg: TokenizeConfig, train: ShardWriter, val: ShardWriter, skipped: int, sources: list) -> dict:
    """meta.json: how the shards were made (tokenizer, format, options), the splits and the source files."""
    return {
        "tokenizer": tokenizer.TOKENIZER_NAME,
        "eot_id": tokenizer.EOT_ID,
        "dtype": "uint16",
        "shard_format_version": shards.VERSION,
        "shard_tokens": cfg.shard_tokens,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "txt_paragraphs": cfg.txt_paragraphs,
        "splits": {"train": train.summary(), "val": val.summary()},
        "skipped_bad_records": skipped,
        "sources": sources,
    }


def remove_dead_temporaries(out: Path) -> None:
    """Delete the OUT.tmp-PID folders of runs that were killed (no process PID is alive): nothing else would."""
    for tmp in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists and sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def fixed_mmap_threshold() -> None:
    """On glibc, give every allocation over 1 MB (a document's text and tokens) its own mmap, returned to the OS
    when freed. By default glibc raises that threshold after each large free, after which multi-MB documents
    fragment the threads' heaps and RSS creeps up with the corpus; with the fixed threshold it stays nearly flat, for
    a little more system time (BENCHMARKS.md, Tokenizer)."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


def main(argv: list[str]) -> dict:
    cfg = TokenizeConfig()
    inputs = config.cli(argv, [cfg], max_positional=None, usage=__doc__)
    try:
        return tokenize(inputs, cfg)
    except BadInput as e:
        config.fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C: tokenize removed its temporary folder
        print("interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
    except tokenizer.TokenizerNotFound as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    fixed_mmap_threshold()  # process-wide, so here rather than in main(), which tests call in-process
    main(sys.argv[1:])
