"""Pretrain a GPT on token shards (from tokenize_data.py).

  python pretrain.py --preset tiny --data data/demo --out checkpoints/tiny
  python pretrain.py --preset gpt2 --data data/web --out checkpoints/gpt2 --max_steps 5000 --lr 6e-4
  python pretrain.py --preset gpt2 --data data/web --out checkpoints/gpt2 --init-from hf/gpt2   # continue pretraining
  python pretrain.py ... --resume            # continue a stopped run from its newest valid checkpoint
  torchrun --nproc_per_node 8 pretrain.py ...   # data parallel on 8 GPUs (or CPU processes)

With --init-from (a checkpoint of ours or a Hugging Face GPT-2 directory) the model, its shape and dropout, comes
from that checkpoint (model fields given that differ from it are named in a warning). --data_vocab computes the
loss's softmax over the token ids that occur in the shards (plus one logit standing for all the others, whose
embeddings it ties): for a corpus that uses few of the 50K ids, such as the demo's, a small model trains faster
with the same full-vocabulary loss (GPT.restrict_output; BENCHMARKS.md); the chat tokens keep embeddings of their
own for fine-tuning. Batches: shard_data.ShardData. Every config field
can be given as --field value; --help lists them.
"""

import os
import sys
from dataclasses import fields

import torch

from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, ModelConfig, TrainConfig, cli, fail, to_dict
from model import GPT
from shard_data import ShardData, data_vocab_ids
from shards import ShardError
from train import check_config, fit


def warn_unused_model_fields(given: ModelConfig, init: ModelConfig) -> None:
    """With --init-from the model is the checkpoint's: say which model fields given here (or by a preset) differ from
    it and are not used. The vocabulary's size is padding (ours 50304, GPT-2's own 50257 plus the chat tokens)."""
    unused = [f"{f.name} {getattr(given, f.name)!r} (the checkpoint's: {getattr(init, f.name)!r})"
              for f in fields(ModelConfig)
              if f.name != "vocab_size" and getattr(given, f.name) != getattr(init, f.name)]
    if unused and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --init-from gives the model; not used: {', '.join(unused)}", file=sys.stderr)


def main(argv: list[str]) -> None:
    train_cfg, model_cfg = TrainConfig(), ModelConfig()
    cli(argv, [train_cfg, model_cfg], usage=__doc__)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
    try:
        check_config(train_cfg)
        if train_cfg.init_from:
            model, _, _ = load_checkpoint(train_cfg.init_from)
            warn_unused_model_fields(model_cfg, model.config)
        else:
            model = GPT(model_cfg)
        data = ShardData(train_cfg.data, model.config.block_size, train_cfg.batch_size, train_cfg.seed,
                         train_cfg.eval_batches)
        if train_cfg.data_vocab:
            model.restrict_output(data_vocab_ids(train_cfg.data))
    except (CheckpointError, ShardError, ValueError) as e:
        fail(str(e))
    if model.output_ids is not None and int(os.environ.get("RANK", 0)) == 0:  # once under torchrun
        print(f"loss: softmax over the {len(model.output_ids):,} token ids that occur in {train_cfg.data} and the "
              f"chat tokens, plus one logit for the {len(model.rest_ids):,} others (--data_vocab)")
    provenance = {"kind": "pretrain", "init_from": train_cfg.init_from or None, "data_dir": str(train_cfg.data)}
    try:
        fit(model, train_cfg, data, provenance, extra_config={"train": to_dict(train_cfg)})
    except (CheckpointError, ConfigError) as e:  # --resume of a checkpoint that does not fit this run, say
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
