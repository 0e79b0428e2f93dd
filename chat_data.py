"""Instruction and dialog data for fine-tuning: files -> conversations -> (ids, mask) -> batches for train.fit.

Accepted files (UTF-8, plain or .gz, a byte order mark allowed), the format detected per file from its first record:
  * chat JSONL, the OpenAI shape:  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
    (the role "developer" is read as "system", and a content may be a list of text parts, joined by newlines, as the
    server reads them)
  * ShareGPT (JSONL or a JSON array): {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}
    (a "system" field beside "conversations", as LLaMA-Factory's, is the system message)
  * Alpaca (a JSON array or JSONL):  {"instruction": "...", "input": "...", "output": "..."}  ("response" is
    accepted for "output", as in GPTeacher and Dolly, and "context" for "input", as in Dolly; self-instruct's
    "instances": [{"input", "output"}] gives one example each; LLaMA-Factory's "system" is the system message
    and its "history": [[user, assistant], ...] the exchanges before the instruction; other keys are ignored)
The messages may come in any order of roles, as the chat template takes them (chat_format): a dialog may start
with the assistant, a speaker may have two turns in a row, a system message may come later. Malformed input (bad
JSON, wrong types, unknown roles, an empty conversation, a file in no known format) is an error naming the file and
line. Two defects of real data sets are tolerated and counted instead: trailing user turns, which have no reply to
learn, are removed (a conversation left without an assistant reply is skipped), and a record with an empty message
(Alpaca has a few empty outputs) is skipped; an empty system message says nothing and is removed. A conversation
with tool calls (OpenAI's assistant "tool_calls" or "function_call" and "tool" or "function" messages,
LLaMA-Factory's ShareGPT "function_call" and "observation" turns) is skipped and counted too: the chat template
has no tool turns, and its text without the calls would teach replies that never call the tool.
A chat message's "weight": 0 (OpenAI's fine-tuning format) keeps it in the context but out of the loss; a
conversation with no reply of weight 1 has nothing to learn and is skipped like one without a reply.

Every conversation is rendered by chat_format.render, the one chat template. One longer than the context is cut
where an exchange starts (chat_format.latest_turns): the oldest messages go first, the leading system messages
stay, a reply never stays without its question; a conversation whose last exchange alone does not fit is dropped.
"""

import functools
import gzip
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chat_format import ChatFormatError, join_text_parts, latest_turns, render, validate
from config import progress_interval
from input_files import RecordError, json_array, json_line, utf8_text
from tokenizer import EOT_ID

# ShareGPT speaker names -> our roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
# Compressed files that are not read (gzip is): named in the error, which was a byte that is not UTF-8.
OTHER_COMPRESSIONS = (".bz2", ".xz", ".zst", ".lz4", ".zip", ".7z")
# Speakers and roles of tool calls and their results: the chat template has none, such conversations are skipped.
TOOL_ROLES = {"tool", "function", "function_call", "observation"}
# Batches are padded to a multiple of this many tokens: short rows (most dialogs) waste little compute.
PAD_MULTIPLE = 16
# A compiled model instead gets this many lengths at most (length_buckets): each is a graph of its own to compile.
COMPILE_LENGTHS = 4
# Length grouping: examples are sorted by length within windows of this many batches of a shuffled epoch.
BUCKET_BATCHES = 50


class ChatDataError(ValueError):
    """Input that cannot be read as conversations; the message names the file and line."""


# ---- reading ----------------------------------------------------------------------------------

def _open_text(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(OTHER_COMPRESSIONS):  # else read as text, failing on its first byte that is not UTF-8
        raise ChatDataError(f"{path}: {Path(name).suffix} compression is not read: decompress the file, or compress "
                            "it with gzip (.gz)")
    gz = name.endswith(".gz")
    try:
        data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except FileNotFoundError:
        raise ChatDataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt gzip stream
        raise ChatDataError(f"{path}: cannot be read{' as gzip-compressed text' if gz else ''}: {e}") from None
    try:  # files saved by Windows editors start with a byte order mark, and some are UTF-16
        return utf8_text(data)
    except RecordError as e:
        raise ChatDataError(f"{path} line {e.line}: {e.why}") from None


def _records(path: Path):
    """(location, decoded JSON value) for each record of a JSON array or a JSON Lines file (input_files reads
    both); the location is 'line N', plus the item's index for an array (a whole array may sit on one line)."""
    text = _open_text(path)
    body = text.lstrip()
    if not body:
        raise ChatDataError(f"{path}: empty file (expected JSON Lines or a JSON array of records)")
    if body[0] != "[":
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                value = json_line(line, n)
            except RecordError as e:
                raise ChatDataError(f"{path} line {n} column {e.column}: invalid JSON ({e.why}); expected one JSON "
                                    "object per line (JSON Lines) or a JSON array of records") from None
            yield f"line {n}", value
        return
    try:
        for line, item, value in json_array(text):
            yield f"line {line} (array item {item})", value
    except RecordError as e:
        invalid = f" column {e.column}: invalid JSON in the array" if e.column else ""
        raise ChatDataError(f"{path} line {e.line}{invalid}: {e.why}") from None


def _detect(record, where: str) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "chat"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record:
            return "alpaca"
    got = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    raise ChatDataError(f"{where}: matches no known format: expected an object with 'messages' (chat), "
                        f"'conversations' (ShareGPT) or 'instruction'/'input'/'output' (Alpaca); got {got}")


def _string(record: dict, key: str, where: str, default=None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise ChatDataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _alpaca_context(record: dict, where: str) -> list[dict]:
    """The messages before an Alpaca record's instruction: its 'system' prompt and its 'history' exchanges."""
    system = record.get("system") or ""
    if not isinstance(system, str):
        raise ChatDataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    messages = [{"role": "system", "content": system}] if system else []
    history = record.get("history") or []
    not_pairs = ChatDataError(f"{where}: field 'history' must be a list of [user, assistant] pairs of strings")
    if not isinstance(history, list):
        raise not_pairs
    for pair in history:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise not_pairs
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _alpaca(record: dict, where: str) -> list[list[dict]]:
    instruction = _string(record, "instruction", where)
    context = _alpaca_context(record, where)
    if "instances" in record:  # self-instruct seed tasks: one example per instance
        instances = record["instances"]
        if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
            raise ChatDataError(f"{where}: field 'instances' must be a list of objects with 'input' and 'output'")
    else:
        instances = [record]
    convs = []
    for inst in instances:
        out_key = "output" if "output" in inst or "response" not in inst else "response"
        if out_key not in inst:
            raise ChatDataError(f"{where}: an Alpaca record needs 'output' (or 'response'); got keys {sorted(inst)}")
        in_key = "input" if "input" in inst or "context" not in inst else "context"
        inp = inst.get(in_key, "")
        inp = "" if inp is None else inp
        if not isinstance(inp, str):
            raise ChatDataError(f"{where}: field '{in_key}' must be a string, got {type(inp).__name__}")
        user = instruction + "\n\n" + inp if inp.strip() else instruction
        reply = _string(inst, out_key, where)
        convs.append(context + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    return convs


def _chat(record: dict, where: str) -> list | None:
    """An OpenAI record's messages with their role and content, and "weight": 0 where a message has it (OpenAI's
    fine-tuning files mark the replies not to learn so); other keys ('name', ...) are dropped. The role 'developer'
    (OpenAI's newer name) is 'system', and content given as a list of text parts is their text joined by newlines,
    as the server reads them. None for a conversation with tool calls."""
    messages = record["messages"]
    if not isinstance(messages, list):
        return messages  # validate names the error
    kept = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            kept.append(m)
            continue
        if m.get("tool_calls") or m.get("function_call") or m.get("role") in TOOL_ROLES:  # null or []: no call
            return None
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ChatDataError(f"{where}: message {i} has a content part that is not text "
                                    '({"type": "text", "text": ...}): this model reads text only')
            content = join_text_parts(p["text"] for p in content)
        kept.append({"role": "system" if m.get("role") == "developer" else m.get("role"), "content": content})
        weight = m.get("weight")  # null where a Hugging Face export gave every message the key
        if weight not in (None, 0, 1) or isinstance(weight, bool):
            raise ChatDataError(f"{where}: message {i} has weight {weight!r}; expected 0 (not trained on) or 1")
        if weight == 0:
            kept[-1]["weight"] = 0
    return kept


def _sharegpt(record: dict, where: str) -> list[dict] | None:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise ChatDataError(f"{where}: field 'conversations' must be a list of {{'from', 'value'}} objects")
    messages = []
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "from" not in t and "value" not in t:  # some exports name them role/content
            t = {"from": t.get("role"), "value": t.get("content")}
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise ChatDataError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value' "
                                "(or 'role' and 'content')")
        role = SHAREGPT_ROLES.get(t["from"].lower())
        if t["from"].lower() in TOOL_ROLES:
            return None
        if role is None:
            raise ChatDataError(f"{where}: conversations[{i}] is from {t['from']!r}; expected one of "
                                f"{', '.join(sorted(SHAREGPT_ROLES))}")
        messages.append({"role": role, "content": t["value"]})
    # LLaMA-Factory's ShareGPT (and many exports) hold the system prompt in a field beside the turns
    system = record.get("system") or ""
    if not isinstance(system, str):
        raise ChatDataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    if system and messages and messages[0]["role"] == "system" and messages[0]["content"] != system:
        raise ChatDataError(f"{where}: two system prompts, the field 'system' and the first turn's; give one")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _count(counts: dict, key: str, where: str | None = None) -> None:
    counts[key] = counts.get(key, 0) + 1
    if where is not None and len(counts.setdefault("skipped_where", [])) < 5:
        counts["skipped_where"].append(f"{where}: {key}")


def read_file(path, counts: dict | None = None) -> list[list[dict]]:
    """The conversations of one file, validated and cleaned (see the module docstring). `counts` (a dict)
    accumulates 'records', 'trailing_user_removed', 'skipped_no_reply', 'skipped_empty', 'skipped_tool_calls'
    and, in 'skipped_where', the first few skipped records' locations."""
    path = Path(path)
    counts = {} if counts is None else counts
    fmt, first, out = None, None, []
    for loc, record in _records(path):
        where = f"{path} {loc}"
        found = _detect(record, where)
        if fmt is None:
            fmt, first = found, loc
        elif found != fmt:
            raise ChatDataError(f"{where}: a record in the {found} format in a file of the {fmt} format (detected "
                                f"from {first}); every record of a file must have the same format")
        if fmt == "chat":
            convs = [_chat(record, where)]
        elif fmt == "sharegpt":
            convs = [_sharegpt(record, where)]
        else:
            convs = _alpaca(record, where)
        _count(counts, "records")
        if convs == [None]:
            _count(counts, "skipped_tool_calls", where)
            continue
        for messages in convs:
            try:
                validate(messages, where)
            except ChatFormatError as e:
                raise ChatDataError(str(e)) from None
            # an empty system prompt says nothing
            messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
            while messages and messages[-1]["role"] == "user":
                messages = messages[:-1]
                _count(counts, "trailing_user_removed")
            if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
                _count(counts, "skipped_no_reply", where)
                continue
            if any(not m["content"].strip() for m in messages):
                _count(counts, "skipped_empty", where)
                continue
            out.append(messages)
    if fmt is None:
        raise ChatDataError(f"{path}: no records (expected JSON Lines or a JSON array of records)")
    return out


def read_files(paths) -> tuple[list[list[dict]], dict]:
    """All conversations of the files, in order, and the counts of read_file."""
    counts = {"files": len(paths)}
    conversations = []
    for p in paths:
        conversations += read_file(p, counts)
    counts["conversations"] = len(conversations)
    return conversations, counts


# ---- splitting and encoding -------------------------------------------------------------------

def _digest(messages) -> bytes:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).digest()


def split(conversations, val_fraction: float) -> tuple[list, list]:
    """(train, val): the val_fraction (at least one) of conversations with the smallest content hash, a few more or
    fewer where copies of one conversation sit at the cut. Deterministic and independent of file order; identical
    conversations land on the same side."""
    if len(conversations) < 2:
        raise ChatDataError(f"need at least 2 conversations (one is held out for validation), got {len(conversations)}")
    digests = [_digest(c) for c in conversations]
    order = sorted(range(len(conversations)), key=digests.__getitem__)
    n_val = min(len(conversations) - 1, max(1, round(val_fraction * len(conversations))))
    n_val = _cut_between_runs([digests[i] for i in order], n_val)
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


def _cut_between_runs(keys: list, n: int) -> int:
    """The cut nearest after n (else before it) in the sorted `keys` that leaves both sides non-empty and splits no
    run of equal keys."""
    after = n
    while after < len(keys) and keys[after] == keys[after - 1]:
        after += 1
    if after < len(keys):
        return after
    before = n
    while before > 0 and keys[before] == keys[before - 1]:
        before -= 1
    if before == 0:
        raise ChatDataError(f"all {len(keys)} conversations are identical: none is left to hold out for validation")
    return before


def fit_context(messages, max_tokens: int, train_on_prompt: bool = False):
    """(ids, mask, cut) for a conversation (read_file removed its trailing users) in at most max_tokens tokens, the
    oldest messages cut, or None if its last exchange does not fit (chat_format.latest_turns)."""
    fitted = latest_turns(messages, max_tokens)
    if fitted is None:
        return None
    ids, mask = render(fitted[0], train_on_prompt=train_on_prompt)
    return ids, mask, fitted[1] > 0


def encode_conversations(conversations, max_tokens: int, train_on_prompt: bool = False, counts: dict | None = None):
    """Examples (ids int32 array, mask bool array) of the conversations that fit; counts 'cut' and 'dropped'."""
    counts = {} if counts is None else counts
    counts.setdefault("cut", 0)
    counts.setdefault("dropped", 0)
    examples = []
    for messages in tqdm(conversations, desc="encoding", unit="conv", leave=False, disable=len(conversations) < 5000,
                         mininterval=progress_interval()):
        fitted = fit_context(messages, max_tokens, train_on_prompt)
        if fitted is None:
            counts["dropped"] += 1
            continue
        ids, mask, cut = fitted
        counts["cut"] += int(cut)
        examples.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
    return examples


def length_buckets(block_size: int) -> list[int]:
    """The padded lengths of a compiled fine-tuning run: the context, its half, its quarter, ... (at most
    COMPILE_LENGTHS, rounded up to multiples of PAD_MULTIPLE, never past the context). torch.compile (dynamic=False)
    then builds one graph per length, not one per multiple of PAD_MULTIPLE; a row is padded to about twice its
    length at most (or to the shortest length)."""
    lengths = (-(-(block_size >> k) // PAD_MULTIPLE) * PAD_MULTIPLE for k in range(COMPILE_LENGTHS))
    return sorted({min(block_size, n) for n in lengths})


def collate(examples, block_size: int, buckets: list[int] | None = None):
    """(x, y) LongTensors (B, T): x = ids[:-1], y = ids[1:] where trained else -1; rows right-padded to a multiple of
    PAD_MULTIPLE, or with `buckets` (length_buckets) to the shortest that holds them."""
    longest = max(len(ids) - 1 for ids, _ in examples)
    T = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    if buckets:
        T = min(b for b in buckets if b >= T)
    x = np.full((len(examples), T), EOT_ID, dtype=np.int64)
    y = np.full((len(examples), T), -1, dtype=np.int64)
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], -1)
    return torch.from_numpy(x), torch.from_numpy(y)


# ---- the data source for train.fit ------------------------------------------------------------

class ChatData:
    """Fine-tuning batches for train.fit: batch(step, micro, rank, world) and val_batches().

    An epoch is a seeded shuffle of the training examples; within windows of BUCKET_BATCHES batches the
    examples are sorted by length (little padding), then the batches are shuffled. Batch number
    g = (step * micro_steps + micro) * world + rank runs through the epochs in order, so a batch is a pure
    function of (seed, step, micro, rank, world). micro_steps is the number of micro-batches per optimizer
    step; any value gives valid batches, the right one makes consecutive steps use consecutive batches. With
    `buckets` (length_buckets, for a compiled model) the training batches are padded to those lengths only.
    """

    def __init__(self, train, val, block_size: int, batch_size: int, seed: int = 0, micro_steps: int = 1,
                 eval_batches: int = 20, buckets: list[int] | None = None):
        if not train or not val:
            raise ChatDataError(f"need training and validation examples, got {len(train)} and {len(val)}")
        if any(len(ids) > block_size + 1 for ids, _ in train + val):
            raise ValueError(f"examples must have at most block_size + 1 = {block_size + 1} tokens")
        self.train, self.val = train, val
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.micro_steps, self.eval_batches, self.buckets = micro_steps, eval_batches, buckets
        h = hashlib.sha256()
        for ids, mask in train + [(np.array([-1], np.int32), np.array([True]))] + val:  # -1 marks the split
            h.update(ids.tobytes())
            h.update(np.packbits(mask).tobytes())
        self.fingerprint = "chat-" + h.hexdigest()[:16]
        self.batches_per_epoch = max(1, len(train) // batch_size)

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.train))
        lengths = np.array([len(ids) for ids, _ in self.train])
        window = self.batch_size * BUCKET_BATCHES
        for s in range(0, len(order), window):
            chunk = order[s:s + window]
            order[s:s + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        g = (step * self.micro_steps + micro) * world + rank
        rows = self._epoch(g // self.batches_per_epoch)[g % self.batches_per_epoch]
        return collate([self.train[i] for i in rows], self.block_size, self.buckets)

    @functools.lru_cache(maxsize=1)
    def val_batches(self):
        """The first eval_batches * batch_size validation examples (in hash order), sorted by length and batched."""
        held = sorted(self.val[: self.eval_batches * self.batch_size], key=lambda e: len(e[0]))
        return [collate(held[i:i + self.batch_size], self.block_size) for i in range(0, len(held), self.batch_size)]

    def stats(self) -> dict:
        tok = lambda ex: sum(len(ids) for ids, _ in ex)  # noqa: E731
        trained = lambda ex: sum(int(m[1:].sum()) for _, m in ex)  # noqa: E731
        return {"train_examples": len(self.train), "val_examples": len(self.val),
                "train_tokens": tok(self.train), "train_trained_tokens": trained(self.train),
                "val_tokens": tok(self.val), "val_trained_tokens": trained(self.val)}


class Rehearsal:
    """Chat batches with windows of pretraining text appended (finetune.py --rehearse), every token of them trained,
    as long as the batch's dialogs. `text` is a pretraining data source (shard_data.ShardData). The validation
    batches are the chat data's alone: the best checkpoint is the best at chat."""

    def __init__(self, chat: ChatData, text):
        self.chat, self.text = chat, text
        self.fingerprint = f"{chat.fingerprint}+rehearse-{text.fingerprint}"

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        x, y = self.chat.batch(step, micro, rank, world)
        xr, yr = self.text.batch(step, micro, rank, world)
        return torch.cat([x, xr[:, :x.size(1)]]), torch.cat([y, yr[:, :y.size(1)]])

    def val_batches(self):
        return self.chat.val_batches()
