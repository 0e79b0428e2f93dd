"""Writes that never leave a half-written file or folder under its real name: each is written under a temporary
name (NAME.tmp-PID) and renamed into place, so that a reader sees the old one or the new one, whole.

The data is flushed to the disk (fsync) before the rename and the rename after it: without that, a power loss or
a kernel crash soon after a save can leave a file under its real name with none of its bytes, as file systems such
as ext4 write data lazily and may write the rename first."""

import os
import shutil
from pathlib import Path


def sync(path: Path) -> None:
    """Flush a file, or a folder's entries (the names in it, not its files), to the disk. Windows cannot open a
    folder: its folders are not flushed."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """`text` into the file `path`, replacing it whole."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    sync(tmp)
    os.replace(tmp, path)
    sync(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing any previous one: that one is moved aside
    (FINAL.old-PID) first and deleted after (finish_replacements mends a process killed in between)."""
    for path in [*tmp.rglob("*"), tmp]:  # its files, its subfolders' entries, then its own
        sync(path)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    sync(final.parent)
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
