"""Fine-tune a checkpoint on conversations, with the same training loop as pretraining (train.fit).

  python finetune.py --init checkpoints/pretrain --out checkpoints/chat          # the built-in demo dialogs
  python finetune.py --init checkpoints/pretrain --out checkpoints/chat \\
      --data ../shared/data/dialog/sgd/sgd.jsonl.gz ../shared/data/instruct/mix/instruct_mix.jsonl.gz
  python finetune.py --init hf/gpt2 --data chats.jsonl --out checkpoints/chat --lr 5e-5 --max-steps 3000
  python finetune.py ... --resume         # continue a stopped run from its newest valid checkpoint

--init is a checkpoint of ours (or a run folder: its best checkpoint) or a Hugging Face GPT-2 directory; the
model's shape comes from it (of the model fields only --dropout applies, default 0). --data takes chat JSONL
({"messages": [...]}), ShareGPT ({"conversations": [...]}) or Alpaca ({"instruction", "input", "output"}) files,
plain or .gz (see chat_data.py), or folders of them (searched recursively, in sorted order, for .json, .jsonl,
.json.gz and .jsonl.gz files; the files of other types and the hidden ones are left out and counted in the report,
and a broken symbolic link is an error, as in tokenize_data.py); a pattern such as 'dir/*.jsonl.gz' is expanded
here too (useful in --config files). Only the assistant's tokens are trained on unless
--train-on-prompt. A conversation longer than the context loses its oldest exchanges (the system message stays);
one whose last exchange does not fit is dropped. --rehearse DIR adds --rehearse_rows windows of pretraining text
(token shards) to every batch, all their tokens trained (chat_data.Rehearsal): a narrow fine-tuning set otherwise
overwrites what pretraining taught (BENCHMARKS.md, Demo). An init pretrained with --data_vocab keeps its softmax
restricted to the ids it or the data trains on: the same loss, cheaper. An id that neither trains on (one only a
prompt uses) keeps the shared row of the ids pretraining never saw: the model reads every such id as the same
unknown word. --data_vocab is pretraining's option and refused here, as is an --init_from (pretraining's name of
--init) other than --init.
The chat template is stored in every checkpoint (config.json "chat_template"). Every field: --help.
"""

import glob
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

import chat_format
from chat_data import ChatData, ChatDataError, Rehearsal, encode_conversations, length_buckets, read_files, split
from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, FinetuneConfig, ModelConfig, TrainConfig, cli, fail, to_dict
from input_files import InputError, expand_folders, skipped_files
from model import GPT, pick_device
from shard_data import ShardData, data_vocab_ids
from shards import ShardError
from tokenizer import TokenizerNotFound
from train import check_config, compile_backend, fit, micro_steps

# Fine-tuning starts from a trained model: a smaller learning rate than pretraining, a short warmup, frequent
# evals (fit keeps RUN/best by validation loss, so over-fitting a small data set costs nothing).
FINETUNE_DEFAULTS = dict(out="checkpoints/chat", lr=1e-4, warmup_steps=50, max_steps=1000, eval_every=100,
                         save_every=500, eval_batches=20, weight_decay=0.0)
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")  # a folder's files that are read (compared in lower case)


def data_files(patterns: list[str]) -> tuple[list[str], list[str]]:
    """The files --data names (patterns expanded, folders searched by input_files.expand_folders), and the lines that
    report the files the folders left out."""
    paths = [p for pattern in patterns for p in (sorted(glob.glob(pattern)) or [pattern])]
    try:
        files, others, hidden = expand_folders(paths, DATA_SUFFIXES)
    except InputError as e:
        raise ChatDataError(str(e)) from None
    return [str(f) for f in files], skipped_files(others, hidden, DATA_SUFFIXES)


def conversations(ft: FinetuneConfig):
    """(train, val, summary): the files' conversations split by content hash (val_fraction), or without
    files the demo dialogs with their own train/val split."""
    if not ft.data:
        import demo_data
        train, val = demo_data.dialogs("train"), demo_data.dialogs("val")
        return train, val, {"files": [], "conversations": len(train) + len(val)}
    paths, skipped = data_files(ft.data)
    convs, counts = read_files(paths)
    train, val = split(convs, ft.val_fraction)
    return train, val, {**counts, "files": paths, "skipped_files": skipped}


def load_data(ft: FinetuneConfig, cfg: TrainConfig, block_size: int, world: int):
    """(ChatData, summary) ready for fit."""
    train, val, summary = conversations(ft)
    counts = {}
    train_ex = encode_conversations(train, block_size + 1, ft.train_on_prompt, counts)
    val_ex = encode_conversations(val, block_size + 1, ft.train_on_prompt, counts)
    for split_name, kept, given in (("training", train_ex, train), ("validation", val_ex, val)):
        if given and not kept:
            raise ChatDataError(f"no {split_name} example is left: {counts['dropped']:,} of {len(train) + len(val):,} "
                                f"conversations are longer than the context of {block_size} tokens even in their "
                                "last exchange (shorter conversations, or a model with a longer context)")
    # micro-batches per optimizer step, as train.fit counts them: consecutive steps then read consecutive batches
    grad_accum = micro_steps(cfg, block_size, world)
    # a model that fit compiles sees a few fixed lengths, each compiled once
    buckets = length_buckets(block_size) if compile_backend(cfg, pick_device(cfg.device).type) else None
    data = ChatData(train_ex, val_ex, block_size, cfg.batch_size, cfg.seed, grad_accum, cfg.eval_batches, buckets)
    summary.update(counts, **data.stats())
    return data, summary


def restrict_to_used_ids(model: GPT, data: ChatData, rehearse: str) -> int:
    """After a --data_vocab pretraining, the ids that never occurred share one embedding row (GPT.shared_rows);
    the loss's softmax is then restricted to the others and to every id the data trains on (which may move away
    from the shared row): the same loss, at a fraction of the output layer's cost. Returns the number of shared
    rows left (0: nothing restricted).

    An id that only the prompts use stays on the shared row. Given a row of its own, it would be trained from its
    few prompts alone, and the model would tell the words of its fine-tuning data from the words it never read
    (BENCHMARKS.md, Demo, "requests with words outside the corpus"): on the shared row, every word it cannot read
    looks alike, so what fine-tuning teaches about such words holds for all of them. The price: a word that the
    prompts use often and the corpus lacks reads as unknown too, so the corpus should hold the prompts' words."""
    shared = model.shared_rows()
    if len(shared) == 0:
        return 0
    keep = torch.ones(model.config.vocab_size, dtype=torch.bool)
    keep[shared.cpu()] = False
    used = [ids[mask] for ids, mask in data.train + data.val] + ([data_vocab_ids(rehearse)] if rehearse else [])
    keep[torch.from_numpy(np.unique(np.concatenate(used)).astype(np.int64))] = True
    model.restrict_output(keep.nonzero().squeeze(1))
    return len(model.rest_ids)


def report(summary: dict, cfg: TrainConfig, data: ChatData, world: int) -> None:
    s = summary
    skipped = {k: s[k] for k in ("trailing_user_removed", "skipped_no_reply", "skipped_empty", "skipped_tool_calls")
               if s.get(k)}
    source = f"{len(s['files'])} file(s)" if s["files"] else "the built-in demo dialogs (demo_data.py)"
    print(f"data: {source}, {s['conversations']:,} conversations"
          + (f" ({', '.join(f'{k} {v:,}' for k, v in skipped.items())})" if skipped else ""))
    for line in s.get("skipped_files", []):
        print(f"  {line}")
    for where in s.get("skipped_where", []):
        print(f"  skipped: {where}")
    print(f"  longer than the context: {s['cut']:,} cut at turn boundaries, {s['dropped']:,} dropped")
    print(f"  train: {s['train_examples']:,} examples, {s['train_tokens']:,} tokens "
          f"({s['train_trained_tokens']:,} trained on)")
    print(f"  val:   {s['val_examples']:,} examples, {s['val_tokens']:,} tokens "
          f"({s['val_trained_tokens']:,} trained on)")
    if cfg.max_steps:
        epochs = cfg.max_steps * data.micro_steps * world / data.batches_per_epoch
        print(f"  {cfg.max_steps:,} steps x {data.micro_steps * world} batches of {cfg.batch_size} "
              f"= {epochs:.3g} epochs")
    if data.buckets:
        print(f"  compiled: batches padded to {', '.join(map(str, data.buckets))} tokens, one graph each")


def check_options(ft: FinetuneConfig, cfg: TrainConfig, model_cfg: ModelConfig, init: str) -> None:
    """Refuse options fine-tuning cannot use, before any data is read."""
    shape = [f.name for f in fields(ModelConfig) if f.name != "dropout"
             and getattr(model_cfg, f.name) != getattr(ModelConfig(), f.name)]
    if shape:
        raise ConfigError(f"field '{shape[0]}': the model's shape comes from --init; of the model fields only "
                          "--dropout applies to fine-tuning")
    if not init:
        raise ConfigError("--init CHECKPOINT_DIR is required (a checkpoint of ours or a Hugging Face GPT-2 directory)")
    if ft.init and cfg.init_from and Path(ft.init).resolve() != Path(cfg.init_from).resolve():
        raise ConfigError(f"--init {ft.init} and --init_from {cfg.init_from} disagree: give one (--init)")
    if cfg.data_vocab:
        raise ConfigError("field 'data_vocab' is pretraining's: fine-tuning keeps an init's restricted softmax "
                          "by itself (see --help)")
    if ft.rehearse and ft.rehearse_rows < 1:
        raise ConfigError(f"field 'rehearse_rows' expects a value >= 1 with --rehearse, got {ft.rehearse_rows}")
    if not 0 <= ft.val_fraction < 1:
        raise ConfigError(f"field 'val_fraction' expects a value in [0, 1), got {ft.val_fraction}")
    out, source = Path(cfg.out).resolve(), Path(init).resolve()
    if source == out or out in source.parents:  # a new run in --out deletes the checkpoints there
        raise ConfigError(f"--out {cfg.out} holds --init {init}, the model to fine-tune: give another --out")
    check_config(cfg)


def main(argv: list[str]) -> None:
    ft, train_cfg, model_cfg = FinetuneConfig(), TrainConfig(**FINETUNE_DEFAULTS), ModelConfig()
    cli(argv, [ft, train_cfg, model_cfg], usage=__doc__)
    init = ft.init or train_cfg.init_from
    world = int(os.environ.get("WORLD_SIZE", 1))
    master = int(os.environ.get("RANK", 0)) == 0
    try:
        check_options(ft, train_cfg, model_cfg, init)
        model, init_config, _ = load_checkpoint(init)
        data, summary = load_data(ft, train_cfg, model.config.block_size, world)
        text = ShardData(ft.rehearse, model.config.block_size, ft.rehearse_rows, train_cfg.seed, 0) \
            if ft.rehearse else None
        if model.config.dropout != model_cfg.dropout:  # dropout is a constructor setting: rebuild with the weights
            state = model.state_dict()
            model = GPT(replace(model.config, dropout=model_cfg.dropout))
            model.load_state_dict(state)
    except (ValueError, CheckpointError, ChatDataError, ShardError, TokenizerNotFound) as e:  # ValueError: ConfigError
        fail(str(e))
    if master:
        print(f"init: {init} ({model.num_params():,} parameters, context {model.config.block_size})")
        report(summary, train_cfg, data, world)
    shared = restrict_to_used_ids(model, data, ft.rehearse)
    if master and shared:
        print(f"loss: softmax over the {len(model.output_ids):,} token ids that the init or the data trains on, "
              f"plus one logit for the {shared:,} others (the init was pretrained with --data_vocab)")
    if text is not None:
        if master:
            print(f"rehearsal: {ft.rehearse_rows} windows of {ft.rehearse} text in every batch")
        data = Rehearsal(data, text)
    provenance = {"kind": "finetune", "init_from": str(init), "data_files": summary["files"],
                  "init_provenance": init_config.get("provenance") or {"source": init_config.get("source")}}
    finetune_info = {"files": summary["files"], "demo_dialogs": not summary["files"],
                     "train_on_prompt": ft.train_on_prompt, "val_fraction": ft.val_fraction,
                     "rehearse": ft.rehearse or None, "rehearse_rows": ft.rehearse_rows if ft.rehearse else 0,
                     "counts": {k: v for k, v in summary.items()
                                if k not in ("files", "skipped_files", "skipped_where")}}
    train_cfg = replace(train_cfg, data="", init_from=str(init))  # recorded as run: the data are finetune_info's
    try:
        fit(model, train_cfg, data, provenance,
            extra_config={"chat_template": chat_format.JINJA_TEMPLATE, "finetune": finetune_info,
                          "train": to_dict(train_cfg)})
    except (CheckpointError, ConfigError) as e:  # --resume of a checkpoint that does not fit this run, say
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
