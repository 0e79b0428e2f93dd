"""Pretrain a GPT on token shards (from tokenize_data.py).

  python pretrain.py --preset tiny --data data/demo --out checkpoints/tiny
  python pretrain.py --preset gpt2 --data data/web --out checkpoints/gpt2 --max_steps 5000 --lr 6e-4
  python pretrain.py --preset gpt2 --data data/web --out checkpoints/gpt2 --init-from hf/gpt2   # continue pretraining
  python pretrain.py ... --resume            # continue a stopped run from its newest valid checkpoint
  torchrun --nproc_per_node 8 pretrain.py ...   # data parallel on 8 GPUs (or CPU processes)

With --init-from (a checkpoint of ours or a Hugging Face GPT-2 directory) the model's shape comes from that
checkpoint. --data_vocab computes the loss's softmax over the token ids that occur in the shards (plus one logit
standing for all the others, whose embeddings it ties): for a corpus that uses few of the 50K ids, such as the
demo's (~1,100), a tiny model trains several times faster with the same full-vocabulary loss
(GPT.restrict_output); the chat tokens keep embeddings of their own for fine-tuning. Every config field can be
given as --field value; --help lists them.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError, load_checkpoint
from config import ModelConfig, TrainConfig, cli, to_dict
from model import GPT
from shards import ShardError, list_shards, open_shard, read_header, token_ids
from tokenizer import CHAT_SPECIAL_TOKENS
from train import check_config, fit


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
            raise ShardError(f"{Path(data_dir) / split}: every shard is shorter than a window of "
                             f"{self.block_size + 1} tokens (block_size + 1)")
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


def main(argv: list[str]) -> None:
    train_cfg, model_cfg = TrainConfig(), ModelConfig()
    cli(argv, [train_cfg, model_cfg], usage=__doc__)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
    try:
        check_config(train_cfg)
        if train_cfg.init_from:
            model, _, _ = load_checkpoint(train_cfg.init_from)
        else:
            model = GPT(model_cfg)
        data = ShardData(train_cfg.data, model.config.block_size, train_cfg.batch_size, train_cfg.seed,
                         train_cfg.eval_batches)
        if train_cfg.data_vocab:
            model.restrict_output(data_vocab_ids(train_cfg.data))
    except (CheckpointError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if model.output_ids is not None:
        print(f"loss: softmax over the {len(model.output_ids):,} token ids that occur in {train_cfg.data} and the "
              f"chat tokens, plus one logit for the {len(model.rest_ids):,} others (--data_vocab)")
    provenance = {"kind": "pretrain", "init_from": train_cfg.init_from or None, "data_dir": str(train_cfg.data)}
    fit(model, train_cfg, data, provenance, extra_config={"train": to_dict(train_cfg)})


if __name__ == "__main__":
    main(sys.argv[1:])
