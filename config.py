"""Configuration: dataclasses for every stage, named presets, and one command-line parser.

The training, evaluation, serving and chat scripts and tokenize_data.py build their configuration the same way
(cli), later sources overriding earlier ones:
  1. the dataclass defaults,
  2. `--preset NAME` (a row of PRESETS),
  3. `--config FILE.json` (a flat object of field -> value),
  4. `--field value` for any field (`--field-name` and `--field_name` are the same).
An unknown field or a value of the wrong type is an error that names the field and the expected type.
"""

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50304  # GPT-2's 50257 + chat special tokens, padded to a multiple of 64
    dropout: float = 0.0
    bias: bool = True
    rope: bool = False  # rotary position embeddings instead of learned ones (model.py); not exportable to HF GPT-2
    smear: bool = False  # add a learned share of the previous token's embedding to each input (model.py); not HF


@dataclass
class TrainConfig:
    data: str = "data/demo"  # a folder of token shards (tokenize_data.py) for pretraining
    data_vocab: bool = False  # pretraining: the softmax over the ids in the shards, exact (GPT.restrict_output)
    out: str = "checkpoints/run"
    init_from: str = ""  # a checkpoint of ours or a Hugging Face GPT-2 directory
    resume: bool = False  # continue from the newest valid checkpoint in `out`
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = True  # torch.compile on CUDA (not on the CPU, where it does not pay off for short runs)
    compile_cpu: str = ""  # a torch.compile backend to compile with on the CPU as well (aot_eager: quick, for tests)
    # Under torchrun: shard the weights, gradients and optimizer state across the processes (FSDP2) instead of
    # keeping a whole copy on each (DDP), for models whose training state does not fit one GPU. One process has
    # nothing to shard: it trains as without --fsdp (and says so). Not with muon or data_vocab.
    fsdp: bool = False
    batch_size: int = 8  # sequences per micro-batch per process
    batch_tokens: int = 0  # target tokens per optimizer step; 0 = one micro-batch per process
    max_steps: int = 1000  # 0 = no step limit; lifted when --max_time or --max_tokens is given alone (parse_args)
    max_tokens: int = 0  # stop after this many tokens (0 = no limit)
    max_time: float = 0.0  # stop after this many seconds of training (0 = no limit); the schedule fits it (train.py)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd only: the last fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (optim.py)
    muon_lr: float = 0.02  # muon: the matrices' peak learning rate, on the same schedule as lr
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the matrices
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3  # periodic checkpoints kept (the best one by validation loss is kept as well)
    log_every: int = 10
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops


@dataclass
class FinetuneConfig:
    init: str = ""  # checkpoint directory (ours or Hugging Face GPT-2) to fine-tune
    data: list[str] = field(default_factory=list)  # chat/instruction files; empty = built-in demo dialogs
    val_fraction: float = 0.05
    train_on_prompt: bool = False  # also train on system and user tokens
    rehearse: str = ""  # token shards (tokenize_data.py) whose text is mixed into every batch (finetune.py)
    rehearse_rows: int = 2  # windows of that text per batch, each as long as the batch's dialogs


@dataclass
class ServeConfig:
    checkpoint: str = "checkpoints/chat"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # also read from the PARLEY_API_KEY environment variable
    device: str = "auto"
    max_batch: int = 16  # sequences decoded together per step
    max_queue: int = 64  # waiting requests before 429
    max_tokens_cap: int = 1024
    max_n: int = 4
    max_body_bytes: int = 1_000_000
    request_timeout: float = 120.0  # seconds a request may take, queueing included
    max_sessions: int = 256  # conversations kept by /chat
    session_ttl: float = 3600.0  # seconds a /chat conversation is kept after its last use
    cors_origins: list[str] = field(default_factory=list)
    # Host names served besides the loopback ones when bound to a loopback address (the DNS-rebinding guard)
    allowed_hosts: list[str] = field(default_factory=list)
    # Tokens of finished sequences whose keys and values are kept, so that a prompt extending one (the next turn of
    # a conversation) prefills only its new tokens; least recently used dropped first; 0 turns reuse off
    prefix_cache_tokens: int = 8192
    log_prompts: bool = False


PRESETS: dict[str, dict] = {
    # Trains on a 2-core CPU in minutes. Most of its FLOPs are in the 50K-wide output layer (see --data_vocab).
    # Rotary positions and smear: at this size and training length it learns to copy from its context, which
    # with GPT-2's learned positions it does not (model.py). Muon for the blocks' matrices, AdamW's lr for the
    # rest, and warmup-stable-decay: `bench.py speedrun`'s settings at this shape on real text, which reach
    # GPT-2's recipe's loss in a fraction of its time (BENCHMARKS.md, "Time to loss").
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, rope=True, smear=True,
                 optimizer="muon", muon_lr=0.01, lr=1.2e-2, schedule="wsd", warmup_steps=20, max_steps=100,
                 eval_every=25, save_every=25, eval_batches=4),
    # GPT-2 small, 124M parameters.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, batch_tokens=524288,
                 lr=6e-4, warmup_steps=700, max_steps=19000),
    # GPT-2 medium, 350M parameters.
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, batch_size=8, batch_tokens=524288,
                        lr=3e-4, warmup_steps=700, max_steps=19000),
    # GPT-2 large, 774M parameters, and XL, 1.5B: the learning rates of the GPT-3 paper's models of these sizes
    # (760M and 1.3B), the same tokens per step, smaller micro-batches for their larger activations. Where the
    # training state does not fit one GPU next to them, --fsdp shards it.
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, batch_size=4, batch_tokens=524288,
                       lr=2.5e-4, warmup_steps=700, max_steps=19000),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, batch_size=4, batch_tokens=524288,
                    lr=2e-4, warmup_steps=700, max_steps=19000),
}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(name: str, value, tp):
    """Convert `value` (a string from the command line, or a JSON value) to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(name, value, inner[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"field '{name}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(name, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"field '{name}' expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"field '{name}' expects int, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"field '{name}' expects int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"field '{name}' expects float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"field '{name}' expects float, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"field '{name}' expects str, got {value!r}")
        return value
    raise ConfigError(f"field '{name}' has unsupported type {_type_name(tp)}")


def _fields(section) -> dict:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def apply_overrides(sections: list, overrides: dict, source: str) -> None:
    """Set fields on the first section that owns them; an unknown field is an error naming `source`."""
    for key, value in overrides.items():
        name = key.replace("-", "_")
        for section in sections:
            types_ = _fields(section)
            if name in types_:
                setattr(section, name, _convert(name, value, types_[name]))
                break
        else:
            known = sorted(n for s in sections for n in _fields(s))
            raise ConfigError(f"unknown field '{key}' ({source}); known fields: {', '.join(known)}")


def parse_args(argv: list[str], sections: list, max_positional: int | None = 0, usage: str = "") -> list[str]:
    """Fill `sections` (dataclass instances) from argv; returns the positional arguments.

    Arguments that do not start with '--' are returned as positionals (for example the input files of
    tokenize_data.py); more than `max_positional` of them (None = any number) is an error. `--preset`, `--config`,
    and `--help` are handled here.
    A bool field given without a value (`--resume`) means true; a list field takes every value up to the
    next option (`--data a.jsonl b.jsonl`). When two sections share a field name the first section wins.
    """
    preset, config_file, overrides, positionals, from_file = None, None, {}, [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage or __doc__)
            shown = set()  # a field of an earlier section shadows a later one's (which can never be set)
            for section in sections:
                print(f"\n[{type(section).__name__}]")
                for name, tp in _fields(section).items():
                    if name not in shown:
                        print(f"  --{name:<22} {_type_name(tp):<10} default: {getattr(section, name)!r}")
                shown |= set(_fields(section))
            if any(isinstance(section, ModelConfig) for section in sections):
                print(f"\npresets: {', '.join(PRESETS)}")
            sys.exit(0)
        if not arg.startswith("--"):
            positionals.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        tp = next((_fields(s)[key.replace("-", "_")] for s in sections if key.replace("-", "_") in _fields(s)), None)
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if typing.get_origin(tp) is list:  # a list field takes every value up to the next --option
                value = []
                while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = value + [argv[i + 1]], i + 1
            elif tp is bool and (not has_value or (max_positional != 0 and argv[i + 1].lower() not in
                                                   ("1", "0", "true", "false", "yes", "no", "on", "off"))):
                value = "true"  # a bare flag; with positionals allowed, a non-bool word after it is a positional
            elif has_value:
                value, i = argv[i + 1], i + 1
            else:
                raise ConfigError(f"--{key} needs a value")
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        else:
            overrides[key] = value
        i += 1

    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
        if not any(isinstance(section, ModelConfig) for section in sections):
            raise ConfigError(f"--preset {preset}: a preset sets a model's shape and its training, which this script "
                              "does not have")
        known = {n for s in sections for n in _fields(s)}
        apply_overrides(sections, {k: v for k, v in PRESETS[preset].items() if k in known}, f"preset {preset}")
    if config_file is not None:
        try:
            with open(config_file) as f:
                from_file = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {config_file}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"--config {config_file}: expected a JSON object of field -> value")
        apply_overrides(sections, from_file, config_file)
    apply_overrides(sections, overrides, "command line")
    lift_step_limit(sections, {k.replace("-", "_") for k in [*overrides, *from_file]})
    if max_positional is not None and len(positionals) > max_positional:
        raise ConfigError(f"unexpected argument(s): {' '.join(positionals[max_positional:])}")
    return positionals


def lift_step_limit(sections: list, given: set[str]) -> None:
    """The limit rule: a run stops at the first limit the user gave. A max_steps that came from a preset or a
    default is a step limit the user never asked for, so giving --max_time or --max_tokens without --max_steps
    removes it (max_steps 0): `--preset tiny --max_time 300` trains for 300 s, not for the preset's 100 steps."""
    if "max_steps" in given or not given & {"max_time", "max_tokens"}:
        return
    for section in sections:
        if "max_steps" in _fields(section):
            section.max_steps = 0
            return


def check_minimums(section, minimum: dict) -> None:
    """A ConfigError naming the first field of `section` below its minimum in `minimum` (field -> least value)."""
    for name, least in minimum.items():
        if getattr(section, name) < least:
            raise ConfigError(f"field '{name}' expects a value >= {least}, got {getattr(section, name)!r}")


def fail(message: str) -> typing.NoReturn:
    """A script's configuration or input error: the message on stderr and exit code 2, as for a bad option."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cli(argv: list[str], sections: list, max_positional: int | None = 0, usage: str = "") -> list[str]:
    """parse_args for scripts: a configuration error prints the message and exits with code 2."""
    try:
        return parse_args(argv, sections, max_positional, usage)
    except ConfigError as e:
        fail(str(e))


def to_dict(section) -> dict:
    return dataclasses.asdict(section)


def model_config_from_dict(d: dict, source: str = "config") -> ModelConfig:
    cfg = ModelConfig()
    apply_overrides([cfg], d, source)
    return cfg


def progress_interval(stream=sys.stderr) -> float:
    """Seconds between progress-bar updates (tqdm's mininterval): tqdm's default on a terminal; written to a log
    (CI, `make demo > log`) one update every half minute, so that the log stays readable. $TQDM_MININTERVAL wins."""
    if "TQDM_MININTERVAL" in os.environ:
        return float(os.environ["TQDM_MININTERVAL"])
    return 0.1 if stream.isatty() else 30.0


def cpu_name() -> str:
    """The CPU's model name, for a benchmark's machine line (Linux's /proc/cpuinfo, else what platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        import platform
        return platform.processor() or "?"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as taskset or a container limits it; macOS and Windows
    have no affinity call: all cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
