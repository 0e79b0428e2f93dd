"""Writes that never leave a half-written file or folder under its real name: each is written under a temporary
name (NAME.tmp-PID) and renamed into place, so that a reader sees the old one or the new one, whole."""

import os
import shutil
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """`text` into the file `path`, replacing it whole."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing any previous one: that one is moved aside
    (FINAL.old-PID) first and deleted after (finish_replacements mends a process killed in between)."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def finish_replacements(folder: Path, marker: str) -> None:
    """Finish the replace_dir calls in `folder` that a killed process left between their two renames: NAME is gone,
    the previous one is NAME.old-PID and the new one NAME.tmp-PID, complete (its `marker` file is written last):
    the new one goes into place. The old one is left to the caller's clean-up."""
    for old in folder.glob("*.old-*"):
        name, pid = old.name.rsplit(".old-", 1)
        new = folder / f"{name}.tmp-{pid}"
        if not (folder / name).exists() and (new / marker).is_file():
            os.replace(new, folder / name)
