"""Which files of an input folder are data: the rule tokenize_data.py and finetune.py share when they search a
folder recursively. Hidden files are copies or metadata, not data: macOS's ._NAME files (binary: they stopped a run
as invalid UTF-8), Jupyter's .ipynb_checkpoints (a second copy of every file), __MACOSX. Hugging Face datasets skip
them too. A file named on the command line is read whatever its name."""

from pathlib import Path


def is_hidden(path: Path, folder: Path) -> bool:
    """Whether a file found in `folder` is hidden: its name or a folder's below `folder` starts with '.', or a
    folder's with '__'."""
    parts = path.relative_to(folder).parts
    return any(part.startswith(".") for part in parts) or any(part.startswith("__") for part in parts[:-1])
