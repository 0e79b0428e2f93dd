"""Pretraining batches for train.fit from token shards (shards.py): ShardData, the twin of chat_data.ChatData.

`fingerprint` identifies a shard folder in checkpoint provenance; `data_vocab_ids` are the ids pretrain.py
--data_vocab restricts the loss's softmax to (GPT.restrict_output). This module is separate from shards.py, which
tokenize_data.py imports, so that tokenizing never pays for importing torch.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch

from shards import ShardError, list_shards, open_shard, read_header, token_ids
from tokenizer import CHAT_SPECIAL_TOKENS


class ShardData:
    """Random windows of block_size + 1 tokens from memory-mapped shards (x = the first T, y = the last T).

    A batch is a pure function of (seed, step, micro-batch index across all processes), so a resumed run reads
    exactly the batches it would have read, each process reads its own part, and a run on 2 processes sees the
    same data as a run on 1 process with 2 accumulation steps.
    """

    def __init__(self, data_dir, block_size: int, batch_size: int, seed: int, eval_batches: int):
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.train = self._open(data_dir, "train")
        self.val = self._open(data_dir, "val")
        self.fingerprint = fingerprint(data_dir)
        generator = torch.Generator().manual_seed(seed)
        self._val = [self._windows(self.val, generator) for _ in range(eval_batches)]

    def _open(self, data_dir, split: str):
        shards = [open_shard(p) for p in list_shards(data_dir, split)]
        starts = torch.tensor([max(0, len(s) - self.block_size) for s in shards])  # window starts per shard
        if starts.sum() == 0:
            tokens = sum(len(s) for s in shards)
            if tokens > self.block_size:
                fix = "a larger --shard_tokens"
            else:  # the split itself is too small: more text, or a fraction that gives this split more of it
                fix = f"more text, or a {'larger' if split == 'val' else 'smaller'} --val_fraction"
            raise ShardError(f"{Path(data_dir) / split}: every shard is shorter than a window of {self.block_size + 1} "
                             f"tokens (block_size + 1), {tokens:,} tokens in all; run tokenize_data.py again with {fix}")
        return shards, starts.cumsum(0)

    def _windows(self, split, generator):
        shards, ends = split
        picks = torch.randint(int(ends[-1]), (self.batch_size,), generator=generator)
        which = torch.searchsorted(ends, picks, right=True)  # the shard each window falls in
        rows = []
        for i, pick in zip(which.tolist(), picks.tolist()):
            start = pick - (int(ends[i - 1]) if i else 0)
            rows.append(np.asarray(shards[i][start: start + self.block_size + 1], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def batch(self, step: int, micro: int, rank: int, world: int):
        index = micro * world + rank  # the global micro-batch index: independent of how work is split
        seed = int(np.random.SeedSequence([self.seed, step, index]).generate_state(1)[0])
        return self._windows(self.train, torch.Generator().manual_seed(seed))

    def val_batches(self):
        return self._val


def fingerprint(data_dir) -> str:
    """sha256 of DIR/meta.json, else of the shards' names and token counts."""
    meta = Path(data_dir) / "meta.json"
    if meta.is_file():
        return "sha256:" + hashlib.sha256(meta.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for split in ("train", "val"):
        for p in list_shards(data_dir, split):
            h.update(f"{split}/{p.name}:{read_header(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def data_vocab_ids(data_dir) -> np.ndarray:
    """The ids --data_vocab computes the softmax over: those in the shards, and the chat tokens. These never occur
    in pretraining text, but fine-tuning needs them told apart: tied to the other rows' mean they would enter
    fine-tuning as one and the same embedding."""
    return np.union1d(token_ids(data_dir), list(CHAT_SPECIAL_TOKENS.values()))
