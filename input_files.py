"""Reading input files, the rules tokenize_data.py, finetune.py and chat_data.py share: which files of a folder are
data, and how a JSON records file is parsed.

A folder is searched recursively. Hidden files are copies or metadata, not data: macOS's ._NAME files
(binary: they stopped a run as invalid UTF-8), Jupyter's .ipynb_checkpoints (a second copy of every file), __MACOSX.
Hugging Face datasets skip them too. A file named on the command line is read whatever its name.

JSON records are JSON Lines (one value per line, json_line: read a line at a time) or one JSON array (json_array:
the whole text, each record decoded in turn). Both name a record's line, and an array's item index; their errors
are RecordError, which each reader words as its own error.
"""

import itertools
import json
from pathlib import Path


class RecordError(ValueError):
    """JSON that is not records, at `line` (1-based). For invalid JSON `column` is set and the message is json's;
    for an array that ends badly `column` is None and the message says what is wrong."""

    def __init__(self, why: str, line: int, column: int | None = None):
        super().__init__(why)
        self.why, self.line, self.column = why, line, column


def is_hidden(path: Path, folder: Path) -> bool:
    """Whether a file found in `folder` is hidden: its name or a folder's below `folder` starts with '.', or a
    folder's with '__'."""
    parts = path.relative_to(folder).parts
    return any(part.startswith(".") for part in parts) or any(part.startswith("__") for part in parts[:-1])


def json_line(line: str, lineno: int):
    """The JSON value on line `lineno` of a JSON Lines file (without its newline, so that a column is on it)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(e.msg, lineno, e.colno) from None


def json_array(text: str):
    """(line, item index, value) for each record of the JSON array that `text` holds (its first character that is
    not blank is '['), decoded one at a time while counting newlines, to know each record's line (a whole array may
    sit on one line)."""
    decoder = json.JSONDecoder()
    pos, line, counted = len(text) - len(text.lstrip()) + 1, 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, p), p
        return line

    def skip_space(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_space(pos)
    for item in itertools.count():
        if pos < len(text) and text[pos] == "]":
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordError(e.msg, e.lineno, e.colno) from None
        yield line_at(pos), item, value
        pos = skip_space(end)
        if pos < len(text) and text[pos] == "]":
            break
        if pos >= len(text) or text[pos] != ",":
            raise RecordError("expected ',' or ']' after a record of the JSON array", line_at(min(pos, len(text))))
        pos = skip_space(pos + 1)
    # Text after the array would otherwise be lost without a word: Hugging Face datasets' to_json(lines=False)
    # wrote one array per batch of 1,000 records ([...][...]), and only the first batch was read.
    pos = skip_space(pos + 1)
    if pos < len(text):
        raise RecordError("text after the closing ']' of the JSON array (a second array, as datasets' "
                          "to_json(lines=False) writes?); give one array, or JSON Lines: jq -c '.[]' FILE > FILE.jsonl",
                          line_at(pos))
