"""The token shard format: a 256-byte header, then uint16 token ids.

Header (little-endian int64 x 32): [MAGIC, VERSION, n_tokens, 0...]. A shard whose size does not match
its header (a truncated or half-copied file) is refused with the file name. Shards are written under a
temporary name and renamed, so a file with a real shard name is always complete.
"""

import os
from pathlib import Path

import numpy as np

MAGIC = 0x50415231  # "PAR1"
VERSION = 1
HEADER_INTS = 32
HEADER_BYTES = HEADER_INTS * 8


class ShardError(ValueError):
    pass


def write_shard(path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i8")
    header[:3] = (MAGIC, VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)  # no bytes copy of a 200 MB shard
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path) -> int:
    """The shard's token count, after checking magic, version and file size."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: too short to be a token shard ({len(raw)} bytes)")
    header = np.frombuffer(raw, dtype="<i8")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (bad magic number)")
    if header[1] != VERSION:
        raise ShardError(f"{path}: shard version {header[1]}, this code reads version {VERSION}")
    n = int(header[2])
    size = path.stat().st_size
    if size != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: truncated or corrupted: header says {n} tokens "
                         f"({HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes")
    return n


def open_shard(path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (uint16)."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def list_shards(data_dir, split: str) -> list[Path]:
    """DATA/split/*.bin in order; an empty or missing split is an error naming the folder."""
    d = Path(data_dir) / split
    shards = sorted(d.glob("*.bin"))
    if not shards:
        raise ShardError(f"no token shards in {d} (run tokenize_data.py first)")
    return shards


def token_ids(data_dir) -> np.ndarray:
    """The sorted token ids that occur in DIR's train and val shards."""
    seen = np.zeros(1 << 16, dtype=bool)
    for split in ("train", "val"):
        for path in list_shards(data_dir, split):
            seen |= np.bincount(open_shard(path), minlength=1 << 16) > 0
    return np.flatnonzero(seen)
