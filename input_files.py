"""Reading input files, the rules tokenize_data.py, finetune.py and chat_data.py share: which files of a folder are
data, and how a JSON records file is parsed.

A folder is searched recursively (folder_files). Hidden files are copies or metadata, not data: macOS's ._NAME files
(binary: they stopped a run as invalid UTF-8), Jupyter's .ipynb_checkpoints (a second copy of every file), __MACOSX.
Hugging Face datasets skip them too. A file named on the command line is read whatever its name.

A text file is UTF-8 (utf8_text), a byte order mark allowed; UTF-16, which Windows tools write, gets an error that
says how to convert it.

JSON records are JSON Lines (one value per line, json_line: read a line at a time) or one JSON array (json_array:
the whole text, each record decoded in turn, with its line and item index). Their errors are RecordError, with the
line (and column), which each reader words as its own error.
"""

import itertools
import json
import os
from pathlib import Path


UTF16_HINT = "; convert UTF-16 to UTF-8, e.g. iconv -f UTF-16 -t UTF-8 (-f UTF-16LE without a byte order mark)"


class InputError(ValueError):
    """A folder that cannot be read as input; the message names it."""


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


def folder_files(folder: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], list[Path], list[Path]]:
    """(the files of `folder` and its subfolders whose names end with one of `suffixes`, in any case; the files of
    other types; the hidden files, whatever their type), each in sorted order. InputError for a broken symbolic
    link with one of the suffixes (a missing input: is_file() would skip it without a word), and for a folder with
    no such file."""
    data, others, hidden = [], [], []
    for path in sorted(folder.rglob("*")):
        if is_hidden(path, folder):
            if path.is_file():
                hidden.append(path)
        elif path.is_file():
            (data if path.name.lower().endswith(suffixes) else others).append(path)
        elif path.is_symlink() and not path.exists() and path.name.lower().endswith(suffixes):
            raise InputError(f"{path}: broken symbolic link (its target is missing, or a link loop)")
    if not data:
        raise InputError(f"{folder}: folder has no {', '.join(suffixes)} files")
    return data, others, hidden


def expand_folders(paths, suffixes: tuple[str, ...]) -> tuple[list, list[Path], list[Path]]:
    """(the input files `paths` name, in order: a folder gives its files of those suffixes (folder_files), anything
    else stands for itself, as given; the folders' files of other types; their hidden files)."""
    files, others, hidden = [], [], []
    for path in paths:
        if os.path.isdir(path):
            data, other_types, hidden_files = folder_files(Path(path), suffixes)
            files += data
            others += other_types
            hidden += hidden_files
        else:
            files.append(path)
    return files, others, hidden


def skipped_files(others: list[Path], hidden: list[Path], suffixes: tuple[str, ...]) -> list[str]:
    """The lines that report the files folder_files left out (none: no line)."""
    lines = []
    if others:
        lines.append(f"skipped {len(others)} file(s) of other types in the folders "
                     f"({', '.join(sorted({p.suffix or p.name for p in others}))}); read are {', '.join(suffixes)}")
    if hidden:
        lines.append(f"skipped {len(hidden)} hidden file(s) in the folders (a name or folder starting with '.', or "
                     f"a folder with '__'), e.g. {hidden[0]}; name a file to read it")
    return lines


def utf8_text(data: bytes) -> str:
    """A file's bytes as UTF-8 text, less a byte order mark. RecordError, with the line, for invalid UTF-8 or a NUL
    byte: UTF-16 without a byte order mark (ASCII text with a NUL after every character) is valid UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))  # its byte order mark
        hint = f": it starts with a UTF-16 byte order mark{UTF16_HINT}" if utf16 else ""
        at, why = e.start, f"invalid UTF-8 at byte {e.start} of the file ({e.reason}){hint}"
    else:
        at = data.find(b"\x00")
        if at < 0:
            return text.removeprefix("\ufeff")
        why = f"a NUL byte at byte {at} of the file: not text, or UTF-16 without a byte order mark{UTF16_HINT}"
    raise RecordError(why, data.count(b"\n", 0, at) + 1)


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
