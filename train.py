"""The training loop, shared by pretrain.py and finetune.py: `fit(model, cfg, data, provenance)`.

`data` is any object with
    batch(step, micro, rank, world) -> (x, y)  LongTensors (B, T); y == -1 means "no loss here". A pure
                                               function of its arguments, so a resumed run sees the same batches;
    val_batches() -> [(x, y), ...]             the fixed held-out batches evaluated at every eval;
    fingerprint: str                           identifies the data in checkpoint provenance.

fit() picks the device and precision (bf16 autocast, TF32 and torch.compile on CUDA; fp32 on CPU), runs data
parallel under torchrun (DDP, or with cfg.fsdp FSDP2's sharding; NCCL on CUDA, gloo on CPU), steps the optimizer
(optim.py) with warmup + cosine / wsd / constant learning rate, accumulates gradients up to cfg.batch_tokens, clips
them, and skips (and counts) steps whose loss is not finite. It never loses a run: RUN/step_NNNNNNN checkpoints
every cfg.save_every steps and at the end (the last cfg.keep_last are kept; written by a background thread while
training goes on), RUN/best by validation loss, SIGINT/SIGTERM finish the step, save and return, and cfg.resume
continues exactly from the newest valid checkpoint (a corrupted one is skipped with a warning). Only rank 0 writes:
checkpoints, RUN/log.jsonl (one JSON record per line) and RUN/loss.png (drawn by plot_loss.py in a background
process). `python train.py` only says which script to run.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

try:
    import fcntl  # the run folder's lock (lock_run_dir); Windows has none
except ImportError:
    fcntl = None

from atomic import finish_replacements, write_text
from checkpoint import (CheckpointError, cpu_copy, load_checkpoint, step_checkpoints, wrong_shapes,
                        write_checkpoint)
from config import ConfigError, TrainConfig, check_minimums, progress_interval, to_dict
from model import GPT, enable_tf32, pick_device
from optim import MuonAdamW, check_optimizer, make_optimizer

# Dense bf16 tensor-core peak FLOP/s per GPU, for MFU; a GPU not listed (and the CPU) shows no MFU. The longest
# key the GPU's name contains wins ("NVIDIA H200 NVL" is an H200 NVL, not an H200).
PEAK_FLOPS = {"H200": 989e12, "H200 NVL": 836e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
              "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def check_config(cfg: TrainConfig) -> None:
    """Refuse values the loop cannot use before any work starts; the message names the field."""
    choices = {"schedule": ("cosine", "wsd", "constant"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"field '{name}' expects one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    check_minimums(cfg, {"batch_size": 1, "log_every": 1, "max_bad_steps": 1, "max_steps": 0, "warmup_steps": 0,
                         "batch_tokens": 0, "eval_every": 0, "eval_batches": 0, "save_every": 0, "keep_last": 0,
                         "lr": 0})
    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time):
        raise ConfigError("no limit: set max_steps, max_tokens or max_time (one of them > 0)")
    for name in ("decay_fraction", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"field '{name}' expects a value in [0, 1], got {getattr(cfg, name)!r}")
    pick_device(cfg.device)  # refuses a device that is not one, or that this machine lacks
    check_optimizer(cfg)
    if cfg.fsdp:
        check_fsdp(cfg)


def check_fsdp(cfg: TrainConfig) -> None:
    """Refuse what FSDP cannot train here; the message names the field and why."""
    if cfg.optimizer == "muon":
        raise ConfigError("field 'optimizer' muon does not work with fsdp: Muon orthogonalizes each whole matrix, "
                          "and FSDP gives each process a slice of it; use --optimizer adamw, or DDP (no --fsdp)")
    if cfg.data_vocab:
        raise ConfigError("field 'data_vocab' does not work with fsdp: the restricted output layer maps ids to the "
                          "rows of its whole embedding table, which FSDP shards; use DDP (no --fsdp)")


def log(msg: str) -> None:
    """A message that does not break the progress bar."""
    tqdm.write(msg, file=sys.stderr)


# ---- setup ------------------------------------------------------------------------------------------------------

def setup_device(cfg: TrainConfig):
    """(device, rank, world); joins the process group when started by torchrun."""
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), \
        int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1 and device.index is not None:
        raise ConfigError(f"field 'device' is {cfg.device!r} under torchrun: every process would use that one GPU; "
                          f"give --device cuda (process N takes cuda:LOCAL_RANK) and pick the GPUs with "
                          f"CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":  # NCCL binds to this process's GPU, not one guessed from the rank
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device, rank, world


def cpu_times(cpus) -> dict | None:
    """{"cpuN": [user, nice, system, idle, iowait, irq, softirq, steal]} in clock ticks since boot, for the given
    CPUs (Linux's /proc/stat); None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            rows = {line.split()[0]: [int(v) for v in line.split()[1:9]] for line in f if line.startswith("cpu")}
    except OSError:
        return None
    return {f"cpu{i}": rows[f"cpu{i}"] for i in cpus if f"cpu{i}" in rows}


def idle_cores(before: dict, after: dict) -> float:
    """How many cores were idle between two cpu_times readings (a core half busy counts a half)."""
    idle = 0.0
    for cpu, start in before.items():
        ticks = [b - a for a, b in zip(start, after[cpu])]
        idle += (ticks[3] + ticks[4]) / sum(ticks) if sum(ticks) else 1.0
    return idle


class CpuThreads:
    """Train on the CPU with one torch thread per core that other work leaves free, measured before training and
    again every `every` seconds of it. torch's default, a thread per core, collapses beside a busy process: every
    parallel op waits for the thread that shares a core with it, and a job started mid-run does that as surely as
    one running before (BENCHMARKS.md, Demo: v4's "a slower or busier machine" and "a busy process started
    mid-run"). A core counts as free when it is idle or runs this process (its CPU time over the wall time), so that
    the process's own threads do not read as other work; the free share is summed and rounded down unless its
    fraction is at least three quarters. OMP_NUM_THREADS, when set, decides instead, as it does under torchrun;
    `enabled` False does nothing."""

    def __init__(self, enabled: bool = True, every: float = 10.0):
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.most, self.every = torch.get_num_threads(), every
        self.reading = self._read() if enabled and "OMP_NUM_THREADS" not in os.environ else None

    def _read(self):
        times = cpu_times(self.cpus)
        return (times, time.process_time(), time.monotonic()) if times else None

    def start(self, seconds: float = 0.3) -> str:
        """The first measurement, over `seconds` before training: adjust's message."""
        if self.reading is None:
            return ""
        time.sleep(seconds)
        return self.adjust(force=True)

    def adjust(self, force: bool = False) -> str:
        """Measure once `every` seconds have passed since the last reading (force: now) and set the threads; a
        message when they change."""
        if self.reading is None or not (force or time.monotonic() - self.reading[2] >= self.every):
            return ""
        (before, own0, wall0), self.reading = self.reading, self._read()
        if self.reading is None:
            return ""
        after, own1, wall1 = self.reading
        free = idle_cores(before, after) + (own1 - own0) / max(wall1 - wall0, 1e-9)
        was, threads = torch.get_num_threads(), max(1, min(self.most, int(free + 0.25)))
        if threads == was:
            return ""
        torch.set_num_threads(threads)
        return (f"cpu: {threads} torch thread(s), not {was}: other work leaves {min(free, len(self.cpus)):.1f} of the "
                f"{len(self.cpus)} cores free (set OMP_NUM_THREADS to choose)")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def setup_precision(cfg: TrainConfig, device: torch.device):
    """(dtype, autocast context for the forward passes, gradient scaler: enabled for float16 only); TF32 on CUDA."""
    dtype = autocast_dtype(cfg, device)
    if device.type == "cuda":
        enable_tf32()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    return dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in PEAK_FLOPS if k in name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def step_limit_of(cfg: TrainConfig, tokens_per_step: int) -> float:
    """The steps max_steps and max_tokens allow (math.inf if neither is set)."""
    limit = cfg.max_steps or math.inf  # max_steps 0: no step limit
    return min(limit, math.ceil(cfg.max_tokens / tokens_per_step)) if cfg.max_tokens else limit


def planned_steps(step: int, cfg: TrainConfig, step_limit: float, elapsed: float, sec_per_step: float | None) -> float:
    """The run's length in steps, for the schedule: the step limit (max_steps, max_tokens; math.inf if neither),
    or with max_time the steps that fit the time left at the current pace, if fewer. So the learning rate
    always finishes its decay by the time limit, on a slow or busy machine too; where the step limit comes first
    the schedule is exactly that of the steps alone."""
    if cfg.max_time and sec_per_step:
        return min(step_limit, step + max(0.0, cfg.max_time - elapsed) / sec_per_step)
    return step_limit


def lr_at(step: int, cfg: TrainConfig, total_steps: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio * lr,
    or warmup-stable-decay (constant, then linear decay over the last decay_fraction of the steps), or constant.
    total_steps may be fractional (planned_steps) or math.inf (no decay yet). The warmup takes at most
    MAX_WARMUP_FRACTION of the run: a preset's warmup, sized for its full length, would otherwise fill a short run."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.lr * min(1.0, (step + 1) / warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = total_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))  # cosine
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


MAX_WARMUP_FRACTION = 0.2


def warmup_steps(cfg: TrainConfig, total_steps: float) -> float:
    """cfg.warmup_steps, or MAX_WARMUP_FRACTION of total_steps if that is less (see lr_at)."""
    return min(cfg.warmup_steps, MAX_WARMUP_FRACTION * total_steps)


def micro_steps(cfg: TrainConfig, block_size: int, world: int) -> int:
    """Micro-batches per optimizer step on each process: enough to reach cfg.batch_tokens (at least one)."""
    return max(1, -(-cfg.batch_tokens // (cfg.batch_size * block_size * world)))


# ---- the run folder -----------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """The counters a checkpoint keeps for an exact resume. The data position is the step (batches are a function
    of it) and the dropout RNG is reseeded from (seed, step, rank) every step, so no RNG state is saved."""
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training
    best_val: float = math.inf  # the lowest validation loss so far (RUN/best)
    bad_steps: int = 0  # non-finite steps in a row
    skipped_steps: int = 0  # non-finite steps in all
    # The pace (Meter): a --max_time run's schedule is sized by it, and a resumed process measures its own only
    # from its second step on; without it, those steps would take the peak learning rate of an endless schedule.
    sec_per_step: float | None = None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        # a checkpoint written before sec_per_step was kept has no pace: the resumed run measures its own
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def resume(out: Path, model: GPT, optimizer, scaler, master: bool, sharded: bool, data_fingerprint: str,
           tokens_per_step: int, seed: int) -> tuple[TrainState, Path | None]:
    """(counters, checkpoint) of the newest checkpoint in `out` that loads, after loading its weights and optimizer
    state; corrupted ones are skipped with a warning, and one made for another model, optimizer, data, seed or
    number of tokens per step is an error. Sharded, rank 0 alone reads it and sends each process its shard (a process's
    memory never holds the whole model and optimizer state but rank 0's). A fresh TrainState and None when `out`
    holds no checkpoint; an error when none of its checkpoints can be resumed (the run's files are left as they are)."""
    for ckpt in reversed(step_checkpoints(out)):
        weights, saved, problem = read_for_resume(ckpt, model, optimizer, data_fingerprint, tokens_per_step, seed) \
            if master or not sharded else (None, None, None)
        if sharded:  # every process follows rank 0's reading: skip, stop, or load this checkpoint
            shared = [problem, saved and {k: v for k, v in saved.items() if k != "optimizer"}]
            dist.broadcast_object_list(shared, src=0)
            problem, counters = shared
        if isinstance(problem, CheckpointError):
            raise problem
        if problem:
            log(f"warning: skipping checkpoint {ckpt}: {problem}")
            continue
        if sharded:
            load_into_shards(model, optimizer, weights or {}, saved["optimizer"] if saved else {})
            saved = counters
        else:
            model.load_state_dict(weights)
            optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"]:  # empty when saved without fp16
            scaler.load_state_dict(saved["scaler"])
        state = TrainState.from_checkpoint(saved)
        if master:
            log(f"resuming from {ckpt} (step {state.step}, {state.tokens:,} tokens)")
        return state, ckpt
    if step_checkpoints(out):  # none loads: a new run here would delete them, and best/ with them
        raise CheckpointError(f"--resume: no checkpoint in {out} can be resumed (see the warnings above); the run "
                              "there is left as it is: start afresh without --resume (which deletes it) or in "
                              "another --out")
    if master:
        log(f"--resume: no checkpoint in {out}, starting from the beginning")
    return TrainState(), None


def read_for_resume(ckpt: Path, model: GPT, optimizer, data_fingerprint: str, tokens_per_step: int, seed: int
                    ) -> tuple[dict | None, dict | None, str | CheckpointError | None]:
    """(weights, saved training state, None), or (None, None, problem): the text of why `ckpt` does not load (a
    corrupted checkpoint, to skip), or a CheckpointError to raise (one made for another model, optimizer, data, seed
    or number of tokens per step).
    Shapes are checked here because torch loads an optimizer's moments unchecked, and a fused step then writes past
    the end of ones that are too small."""
    try:
        loaded, config, saved = load_checkpoint(ckpt, train_state=True)
    except CheckpointError as e:
        return None, None, str(e)
    if loaded.config != model.config:
        return None, None, CheckpointError(f"{ckpt}: model config {to_dict(loaded.config)} does not match this "
                                           f"run's {to_dict(model.config)}")
    trained_on = config.get("provenance", {}).get("data")
    if trained_on not in (None, data_fingerprint):
        return None, None, CheckpointError(f"{ckpt} was trained on other data ({trained_on}) than this run's "
                                           f"({data_fingerprint}): resume with the data it was trained on, or start "
                                           "afresh in another --out")
    if problem := batch_mismatch(ckpt, config, tokens_per_step, seed):
        return None, None, problem
    weights = loaded.state_dict()
    problem = mismatch(model.state_dict(), weights, "weights") or optimizer_mismatch(optimizer, saved["optimizer"])
    if problem:
        return None, None, CheckpointError(f"{ckpt}: {problem} this run's: resume with the options the run was "
                                           "started with (--optimizer, --data_vocab)")
    return weights, saved, None


def batch_mismatch(ckpt: Path, config: dict, tokens_per_step: int, seed: int) -> CheckpointError | None:
    """The error of resuming `ckpt` with another number of tokens per step or another seed (None for a checkpoint
    that does not say, written before they were recorded). Batches are a function of the seed and the step, so the
    resumed steps would read other data (fine-tuning would repeat or skip part of its epoch), and a max_tokens
    schedule would be sized for steps of another size; another split of the same tokens (--batch_size, processes)
    reads the same data."""
    saved_seed = config.get("train", {}).get("seed")
    if saved_seed not in (None, seed):
        return CheckpointError(f"field 'seed': {ckpt} was trained with --seed {saved_seed}, this run has {seed}: the "
                               f"data order is the seed's, so resume with --seed {saved_seed}, or start afresh in "
                               "another --out")
    saved = config.get("provenance", {}).get("tokens_per_step")
    if saved in (None, tokens_per_step):
        return None
    return CheckpointError(f"field 'batch_tokens': {ckpt} was trained with {saved:,} tokens per step (batch_size x "
                           f"block_size x micro-batches x processes), this run takes {tokens_per_step:,}: resume with "
                           f"--batch_tokens {saved} (any --batch_size and number of processes that reach it exactly), "
                           "or start afresh in another --out")


def mismatch(expected: dict, got: dict, what: str) -> str | None:
    """Where tensors of `got` differ in shape from `expected`'s (this run's), as the start of a sentence."""
    wrong = wrong_shapes(expected, got)
    return f"its {what} ({', '.join(wrong[:3])}) do not fit" if wrong else None


def optimizer_mismatch(optimizer, state: dict) -> str | None:
    """Why an optimizer's saved state_dict does not fit `optimizer`'s parameters, or None."""
    pairs = [(optimizer, state)]
    if isinstance(optimizer, MuonAdamW):
        pairs = [(optimizer.adamw, state.get("adamw")), (optimizer.muon, state.get("muon"))]
    for opt, saved in pairs:
        params = [p for group in opt.param_groups for p in group["params"]]
        numbers = [i for group in (saved or {}).get("param_groups", []) for i in group["params"]]
        if len(numbers) != len(params):
            return f"its optimizer state (for {len(numbers)} parameters) does not fit"
        for p, i in zip(params, numbers):
            moments = {k: v for k, v in saved["state"].get(i, {}).items() if torch.is_tensor(v) and v.dim()}
            if problem := mismatch(dict.fromkeys(moments, p), moments, "optimizer moments"):
                return problem
    return None


# ---- FSDP's shards and whole checkpoints ---------------------------------------------------------------------
# A checkpoint holds the whole model and optimizer state in the format of model.state_dict() and
# optimizer.state_dict() (parameters numbered in param_groups order), however the run was sharded: the same files
# resume a DDP, FSDP or one-process run, and load for evaluation, fine-tuning and serving. torch.distributed.checkpoint
# gathers and shards these states, keyed by parameter names, which `renumbered` translates.

def shard(model: GPT, dtype: torch.dtype) -> None:
    """FSDP2, in place: each block's parameters, then the rest (embeddings, final LayerNorm), sharded across the
    processes. A block's weights are gathered for its forward and its backward only, so a process holds one
    block whole at a time, besides its shards. Under bf16 autocast the weights are gathered in bf16, the precision
    the forward computes in anyway, which halves what the gathers move; gradients are still reduced, and the
    shards kept and stepped, in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def renumbered(optimizer_state: dict, keys: list) -> dict:
    """An optimizer state dict with its parameters' keys replaced by `keys`, in param_groups order (indices for
    names, or names for indices)."""
    old = [k for group in optimizer_state["param_groups"] for k in group["params"]]
    new = dict(zip(old, keys, strict=True))
    return {"state": {new[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [new[k] for k in g["params"]]} for g in optimizer_state["param_groups"]]}


def gather_shards(model: GPT, optimizer) -> tuple[dict, dict | None]:
    """(weights, optimizer state or None without an optimizer), whole and on rank 0's CPU; the other ranks get
    empty dicts. A collective: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if not state:  # not rank 0
        return weights, state
    return weights, renumbered(state, list(range(sum(len(g["params"]) for g in state["param_groups"]))))


def load_into_shards(model: GPT, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load whole states (as gather_shards returns them) into the sharded model and its optimizer: rank 0 passes
    them and sends each process its shard; the other ranks pass empty dicts. A collective: every rank calls it."""
    by_name = {}
    if optimizer_state:
        names = {id(p): name for name, p in model.named_parameters()}
        by_name = renumbered(optimizer_state, [names[id(p)] for g in optimizer.param_groups for p in g["params"]])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def remove_dir(d: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint is ever left under a real name."""
    doomed = d.with_name(d.name + f".old-{os.getpid()}")
    os.replace(d, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def lock_run_dir(out: Path) -> int | None:
    """An open descriptor of RUN that holds its lock (the system drops it when the process ends, killed or not), or
    an error when another run holds it: two runs in one folder would interleave their logs and overwrite each
    other's checkpoints. A torchrun killed with SIGKILL leaves its workers training, and a --resume beside them
    would do just that. None where the system has no such lock (Windows)."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        log(f"warning: {out} cannot be locked on this system: make sure no other run trains there")
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"{out} is in use by another run, which holds its lock (a torchrun killed with SIGKILL "
                              "leaves its worker processes training): stop it or let it end, then --resume") from None
    except OSError as e:  # a file system without such locks (some network ones): train unguarded
        log(f"warning: {out} cannot be locked ({e.strerror}): make sure no other run trains there")
    return fd


def prepare_run_dir(out: Path, resuming: bool) -> None:
    """Create RUN. A new run there deletes an earlier run's checkpoints (with a warning); what a run killed while
    saving or deleting left behind goes too, once a replacement it cut short is finished."""
    out.mkdir(parents=True, exist_ok=True)
    finish_replacements(out, "config.json")  # a kill while RUN/best was replaced leaves it under a temporary name
    earlier = step_checkpoints(out) + ([out / "best"] if (out / "best").is_dir() else [])
    if not resuming and earlier:
        log(f"warning: a new run in {out}: deleting the {len(earlier)} checkpoints of the earlier run there "
            f"(--resume continues a run instead)")
        for d in earlier:
            remove_dir(d)
    for stale in [*out.glob("*.tmp-*"), *out.glob("*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


class Log:
    """RUN/log.jsonl, one JSON object per line; written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def start(self, record: dict) -> None:
        """A new run: an earlier run's records go."""
        if self.enabled:
            self.path.unlink(missing_ok=True)
        self.write(record)

    def resume(self, state: "TrainState", checkpoint: Path) -> None:
        """Drop the records of steps past the checkpoint, which the resumed run will redo, the end of the run it
        continues (and a line cut short by a kill), then note the resumption."""
        step = state.step
        if self.enabled and self.path.exists():
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        if record.get("step", 0) <= step and record.get("type") != "end":
                            keep.append(line)
                    except json.JSONDecodeError:
                        continue
            write_text(self.path, "".join(keep))
        self.write({"type": "resume", "step": step, "tokens": state.tokens, "from": str(checkpoint)})

    def write(self, record: dict) -> None:
        """A non-finite number (a skipped step's loss) is written as null: NaN is not JSON."""
        if self.enabled:
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


class Checkpoints:
    """Rank 0's checkpoints: RUN/step_NNNNNNN with the training state (the newest keep_last are kept) and RUN/best,
    the weights with the lowest validation loss. Every rank calls the saves: a sharded model's are gathered first.
    A save copies the state to the CPU, then a background thread writes and hashes it while training goes on. One
    write at a time: the next save, and close(), wait for it (and raise its error). A write is atomic
    (checkpoint.write_checkpoint): a crash meanwhile leaves the checkpoints before it. close() also releases the
    run folder's lock (lock_run_dir's descriptor, rank 0's)."""

    def __init__(self, out: Path, model: GPT, optimizer, scaler, cfg: TrainConfig, provenance: dict,
                 extra_config: dict | None, enabled: bool, sharded: bool, lock: int | None):
        self.out, self.model, self.optimizer, self.scaler = out, model, optimizer, scaler
        self.keep_last, self.provenance, self.extra_config = cfg.keep_last, provenance, extra_config
        self.enabled, self.sharded, self.lock = enabled, sharded, lock
        self.writer, self.writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint"), None

    def _save(self, name: str, state: TrainState, with_state: bool, val_loss: float | None = None,
              then=lambda: None) -> None:
        self.wait()  # before copying: one copy of the state at a time
        weights, optimizer_state = None, None
        if self.sharded:  # gathered into copies on rank 0's CPU
            weights, optimizer_state = gather_shards(self.model, self.optimizer if with_state else None)
        if not self.enabled:
            return
        if not self.sharded:
            weights = cpu_copy(self.model.state_dict())
            optimizer_state = cpu_copy(self.optimizer.state_dict()) if with_state else None
        provenance = {**self.provenance, "step": state.step, "tokens": state.tokens}
        if val_loss is not None:
            provenance["val_loss"] = val_loss
        train_state = None
        if with_state:
            train_state = {"optimizer": optimizer_state, "scaler": self.scaler.state_dict(),
                           **dataclasses.asdict(state)}

        def write():
            write_checkpoint(self.out / name, self.model.config, weights, provenance, train_state, self.extra_config)
            then()
        self.writing = self.writer.submit(write)

    def save_step(self, state: TrainState) -> None:
        self._save(f"step_{state.step:07d}", state, with_state=True, then=self._prune)

    def _prune(self) -> None:
        for old in step_checkpoints(self.out)[:-self.keep_last] if self.keep_last > 0 else []:
            remove_dir(old)

    def save_best(self, state: TrainState, val_loss: float) -> None:
        self._save("best", state, with_state=False, val_loss=val_loss)

    def wait(self) -> None:
        """Wait for the checkpoint being written, if any; a failed write raises its error here."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.writer.shutdown()
            if self.lock is not None:
                os.close(self.lock)


class Plotter:
    """RUN/loss.png, redrawn by `python plot_loss.py RUN` in a background process, so that training neither waits
    for matplotlib nor imports a script; a plotting failure is a warning, never the end of a run."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled, self.proc = out, enabled, None

    def start(self) -> None:
        self.wait()
        if not self.enabled:
            return
        script = Path(__file__).resolve().parent / "plot_loss.py"
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.out), "--out", str(self.out / "loss.png")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self) -> None:
        if self.proc is not None:
            _, err = self.proc.communicate()
            if self.proc.returncode != 0:
                log(f"warning: could not plot {self.out / 'loss.png'}: {err.strip().splitlines()[-1:] or ''}")
            self.proc = None


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second signal interrupts at once."""

    def __init__(self):
        self.set = False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        log(f"\n{signal.Signals(signum).name}: finishing this step, then saving (send it again to abort)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- the loop -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, batches, device, autocast, rank: int, world: int) -> float | None:
    """The mean loss over the fixed validation batches (each rank evaluates its share), or None without any.
    Every rank runs the same number of forwards (a sharded model gathers its weights in each): a rank without a
    batch of its own left evaluates the last one again, uncounted."""
    if not batches:
        return None
    model.eval()
    total = torch.zeros(2, device=device)
    with autocast:
        for first in range(0, len(batches), world):
            i = first + rank
            x, y = (t.to(device) for t in batches[min(i, len(batches) - 1)])
            loss = model(x, y).float()
            if i < len(batches):
                total += torch.stack([loss, torch.ones((), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def stop_reason(state: TrainState, cfg: TrainConfig, step_limit: float, time_up: bool, interrupted: bool) -> str:
    """Why the run stops before this step ("" if it does not)."""
    if interrupted:
        return "interrupted"
    if state.step >= step_limit:  # the nearer of max_steps and max_tokens' steps
        if cfg.max_tokens and step_limit < (cfg.max_steps or math.inf):
            return f"reached max_tokens ({cfg.max_tokens:,})"
        return f"reached max_steps ({step_limit})"
    if cfg.max_tokens and state.tokens >= cfg.max_tokens:
        return f"reached max_tokens ({cfg.max_tokens:,})"
    return f"reached max_time ({cfg.max_time:.0f} s)" if time_up else ""


def every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def wrap(model: GPT, cfg: TrainConfig, device: torch.device, world: int, dtype: torch.dtype):
    """(raw model, the model to train): with several processes under DDP, or sharded in place (cfg.fsdp: the raw
    model is then the sharded one), then compiled on CUDA, and on the CPU with cfg.compile_cpu's backend. DDP
    first, as PyTorch's DDP notes advise: its optimizer then splits the compiled graph at the gradient buckets. No
    buffer broadcasts: the model's buffers (rotary tables, restrict_output's maps) are the same on every process.
    Evaluation runs the raw model: compiling its no-grad forward would cost a second graph."""
    raw_model = model
    if world > 1 and cfg.fsdp:
        shard(model, dtype)
    elif world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    backend = compile_backend(cfg, device.type)
    if backend:  # static shapes: pretraining has one, compiled fine-tuning a few (chat_data.length_buckets)
        model = torch.compile(model, backend=backend, dynamic=False)
    return raw_model, model


def compile_backend(cfg: TrainConfig, device_type: str) -> str | None:
    """The torch.compile backend that fit trains with on this kind of device: inductor on CUDA, cfg.compile_cpu's on
    the CPU; None when it does not compile."""
    return {"cuda": "inductor", "cpu": cfg.compile_cpu or None}.get(device_type) if cfg.compile else None


# The pace that sizes a max_time schedule (planned_steps) is the mean step time over the last this many seconds of
# training. The steps just after a checkpoint or an evaluation run slower (the writer thread shares the cores): a
# short average reads them as a slower machine and dips the learning rate after each, and a window shorter than
# the time between checkpoints swings as each pause enters and leaves it. A minute holds the pauses of a run that
# checkpoints every half minute or more often in the same measure, and still follows a machine that stays slower.
PACE_SECONDS = 60.0


class Meter:
    """The pace: seconds per step (for planned_steps; the mean over the last PACE_SECONDS), tokens per second and,
    on a GPU with a known peak, MFU (moving averages, for the progress bar and the log), all from a process's second
    step on (its first includes warm-up, torch.compile on CUDA). A row's tokens are counted up to its last target, so
    fine-tuning's right padding is left out, and their FLOPs at the length of their batch and the width of the
    output layer (GPT.flops_per_token)."""

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, world: int):
        self.flops_per_token = functools.cache(model.flops_per_token)  # by sequence length: the model is fixed
        self.peak, self.world = peak_flops(device, dtype), world
        self.steps, self.sec_per_step, self.tok_rate, self.flop_rate, self.mfu = 0, None, None, None, None
        self.step_times, self.window = collections.deque(), 0.0  # the last PACE_SECONDS' steps, and their sum

    def work(self, x, y) -> torch.Tensor:
        """[tokens, training FLOPs] of a micro-batch (x, y), on its device: reading it would wait for the device."""
        last_target = (torch.arange(1, y.size(1) + 1, device=y.device) * (y != -1)).amax(dim=1)
        tokens = last_target.sum().float()
        return torch.stack([tokens, tokens * self.flops_per_token(x.size(1))])

    def update(self, tokens: float, flops: float, dt: float) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) after a step of `tokens` and `flops` (sums of `work` over all ranks) in dt s."""
        self.steps += 1
        if self.steps > 1:  # the first step includes warm-up (compiling on CUDA): shown alone, never averaged
            self.step_times.append(dt)
            self.window += dt
            while self.window - self.step_times[0] >= PACE_SECONDS:
                self.window -= self.step_times.popleft()
            self.sec_per_step = self.window / len(self.step_times)
        if self.steps <= 2:
            self.tok_rate, self.flop_rate = tokens / dt, flops / dt
        else:
            self.tok_rate = 0.9 * self.tok_rate + 0.1 * tokens / dt
            self.flop_rate = 0.9 * self.flop_rate + 0.1 * flops / dt
        self.mfu = self.flop_rate / (self.peak * self.world) if self.peak else None
        return self.tok_rate, self.mfu

    def text(self, loss: float, lr: float, val_loss: float | None) -> str:
        """The progress bar's summary of the last step."""
        return (f"loss {loss:.4f} lr {lr:.2e} {self.tok_rate:,.0f} tok/s"
                + (f" MFU {100 * self.mfu:.1f}%" if self.mfu is not None else "")
                + (f" val {val_loss:.4f}" if val_loss is not None else ""))


def to_device(batch, device: torch.device):
    """A batch (x, y) on the device; on CUDA from pinned memory, so that the copy overlaps the GPU's work."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def describe(model: GPT, cfg: TrainConfig, device, dtype, world: int, grad_accum: int, step_limit: float) -> str:
    block, warmup = model.config.block_size, warmup_steps(cfg, step_limit)
    precision = str(dtype).split('.')[-1] + (", sharded by FSDP" if cfg.fsdp and world > 1 else "")
    return (f"training {model.num_params():,} parameters on {world} x {device} ({precision}), "
            f"{grad_accum * cfg.batch_size * block * world:,} tokens per step ({grad_accum} x {cfg.batch_size} x "
            f"{block} x {world}), until " + " or ".join(([f"step {step_limit}"] if step_limit < math.inf else [])
                                                      + ([f"{cfg.max_time:.0f} s"] if cfg.max_time else []))
            + (f"; warmup {warmup:g} steps, {MAX_WARMUP_FRACTION:.0%} of the run (not {cfg.warmup_steps})"
               if warmup < cfg.warmup_steps else ""))


def record_eval(state: TrainState, val_loss: float | None, run_log: Log, checkpoints: Checkpoints,
                plotter: Plotter) -> None:
    """Log a validation loss, keep the best weights, redraw the plot."""
    if val_loss is None:
        return
    run_log.write({"type": "eval", "step": state.step, "tokens": state.tokens, "elapsed": state.elapsed,
                   "val_loss": val_loss})
    if val_loss < state.best_val:
        checkpoints.save_best(state, val_loss)
    state.best_val = min(state.best_val, val_loss)
    if state.step > 0:  # a plot needs training records
        plotter.start()


def clip_gradients(model: GPT, max_norm: float) -> float:
    """Scale the gradients down to a total norm of max_norm at most (0: no limit); their norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    # Sharded, the norm is a DTensor made of every process's part: its whole value is gathered
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def set_learning_rate(optimizer, state: TrainState, cfg: TrainConfig, step_limit: float, bar) -> float:
    """Set the schedule's rate for this step on every parameter group and return it. With max_time the schedule is
    as long as planned_steps says, and so are the progress bar's total and time left."""
    planned = planned_steps(state.step, cfg, step_limit, state.elapsed, state.sec_per_step)
    lr = lr_at(state.step, cfg, planned)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if planned < math.inf:
        bar.total = max(state.step + 1, math.ceil(planned))
    return lr


def forward_backward(model, batch, load, grad_accum: int, ddp: bool, autocast, scaler, meter: "Meter"):
    """One step's forward and backward passes over its grad_accum micro-batches, the first `batch`, each next one
    read (load(micro); micro grad_accum is the next step's first) while the device works on this one. Returns
    ([summed losses, tokens, target tokens, 0, 0, tokens and FLOPs for the pace (Meter.work)], the next step's
    first batch). DDP averages gradients across processes only on the last micro-batch of the step; FSDP
    reduce-scatters each micro-batch's, so that a process never holds a whole model's gradients."""
    stats = torch.zeros(7, device=batch[0].device)
    for micro in range(grad_accum):
        x, y = batch
        batch = load(micro + 1)
        with model.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext():
            with autocast:
                loss = model(x, y)
            scaler.scale(loss / grad_accum).backward()
        stats[0] += loss.detach().float()
        stats[1] += x.numel()
        stats[2] += (y != -1).sum()
        stats[5:] += meter.work(x, y)
    return stats, batch


def accept_step(state: TrainState, cfg: TrainConfig, loss: float, grad_norm: float, fp16: bool) -> bool:
    """Whether to take the step: its loss and gradient norm are finite (with fp16 an overflowing gradient is the
    gradient scaler's to skip). A step not taken is counted and reported."""
    if math.isfinite(loss) and (math.isfinite(grad_norm) or fp16):
        state.bad_steps = 0
        return True
    state.bad_steps += 1
    state.skipped_steps += 1
    log(f"step {state.step}: non-finite loss ({loss}) or gradient norm ({grad_norm}): step skipped "
        f"({state.bad_steps} in a row, the limit is max_bad_steps={cfg.max_bad_steps})")
    return False


def clip_and_step(model: GPT, optimizer, scaler, state: TrainState, cfg: TrainConfig, loss: float) -> float:
    """Clip the gradients, then step unless the loss or the gradient is not finite (accept_step), and clear them;
    the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model, cfg.grad_clip)
    if accept_step(state, cfg, loss, grad_norm, fp16=scaler.is_enabled()):
        scaler.step(optimizer)  # with fp16, the scaler itself skips steps whose gradients overflowed
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_record(model: GPT, cfg: TrainConfig, provenance: dict, world: int, sharded: bool, grad_accum: int,
               tokens_per_step: int) -> dict:
    """The first record of a new run's log: what it trains, from what, and how."""
    return {"type": "run", "kind": provenance.get("kind"), "init_from": provenance.get("init_from")
            or cfg.init_from or None, "config": {**to_dict(cfg), "model": to_dict(model.config)},
            "world": world, "sharded": sharded, "grad_accum": grad_accum, "tokens_per_step": tokens_per_step}


def is_sharded(model: GPT, cfg: TrainConfig, world: int, master: bool) -> bool:
    """Whether FSDP shards the model: with cfg.fsdp under torchrun. One process has nothing to shard (a note says
    so); a restricted output layer cannot be sharded (an error)."""
    if cfg.fsdp and world == 1 and master:
        log("note: --fsdp shards across torchrun's processes; with one process it trains unsharded")
    if cfg.fsdp and world > 1 and model.token_map is not None:
        raise ConfigError("field 'fsdp': this model's output layer is restricted (a --data_vocab pretraining, or "
                          "fine-tuning one); FSDP cannot shard its embedding table; use DDP (no --fsdp)")
    return cfg.fsdp and world > 1


def fit(model: GPT, cfg: TrainConfig, data, provenance: dict, extra_config: dict | None = None) -> None:
    """Train `model` on `data` per `cfg` (see the module docstring); `provenance` goes into every checkpoint."""
    check_config(cfg)
    device, rank, world = setup_device(cfg)
    cpu_threads = CpuThreads(enabled=device.type == "cpu" and world == 1)
    note = cpu_threads.start()
    master, out = rank == 0, Path(cfg.out)
    dtype, autocast, scaler = setup_precision(cfg, device)
    grad_accum = micro_steps(cfg, model.config.block_size, world)
    tokens_per_step = grad_accum * cfg.batch_size * model.config.block_size * world  # nominal: the schedule's length
    step_limit = step_limit_of(cfg, tokens_per_step)

    # Wrap (a sharded model's optimizer takes its shards), then resume or start afresh; rank 0 keeps the run folder.
    sharded = is_sharded(model, cfg, world, master)
    raw_model, model = wrap(model.to(device), cfg, device, world, dtype)
    optimizer = make_optimizer(raw_model, cfg, device)
    state, resumed_from = (resume(out, raw_model, optimizer, scaler, master, sharded, data.fingerprint,
                                  tokens_per_step, cfg.seed) if cfg.resume else (TrainState(), None))
    lock = lock_run_dir(out) if master else None
    if master:
        prepare_run_dir(out, resuming=resumed_from is not None)
    run_log = Log(out / "log.jsonl", master)
    if resumed_from is None:
        run_log.start(run_record(raw_model, cfg, provenance, world, sharded, grad_accum, tokens_per_step))
    else:
        run_log.resume(state, resumed_from)
    checkpoints = Checkpoints(out, raw_model, optimizer, scaler, cfg, {**provenance, "data": data.fingerprint,
                                                                        "tokens_per_step": tokens_per_step},
                              extra_config, enabled=master, sharded=sharded, lock=lock)
    plotter = Plotter(out, enabled=master)
    meter = Meter(raw_model, device, dtype, world)
    if master:
        log(describe(raw_model, cfg, device, dtype, world, grad_accum, step_limit) + (f"\n{note}" if note else ""))

    def load(step: int, micro: int):
        """Micro-batch `micro` of `step`; micro grad_accum is the first of the next step."""
        if micro == grad_accum:
            step, micro = step + 1, 0
        return to_device(data.batch(step, micro, rank, world), device)

    bar = tqdm(total=step_limit if step_limit < math.inf else None, initial=state.step, disable=not master,
               unit="step", dynamic_ncols=True, mininterval=progress_interval())
    done = state.step if resumed_from else -1  # a resumed run's first step: evaluated and saved before it stopped
    time_up, interrupted, last_val, record = bool(cfg.max_time) and state.elapsed >= cfg.max_time, False, None, None
    batch = load(state.step, 0)
    model.train()
    with StopFlag() as stop:
        while True:
            reason = stop_reason(state, cfg, step_limit, time_up, interrupted)
            # Once in a while, and at the end: evaluate (keep the best weights), save a checkpoint.
            if state.step != done and (state.step == 0 or every(cfg.eval_every, state.step)
                                       or reason not in ("", "interrupted")):
                last_val = evaluate(raw_model, data.val_batches(), device, autocast, rank, world)
                record_eval(state, last_val, run_log, checkpoints, plotter)
            if state.step != done and (reason or (every(cfg.save_every, state.step) and state.step > 0)):
                checkpoints.save_step(state)
            if reason:
                break

            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed + 1_000_003 * state.step + 1009 * rank)  # dropout: a function of (step, rank)
            lr = set_learning_rate(optimizer, state, cfg, step_limit, bar)
            # [summed losses, tokens, target tokens, stop requested, time is up, tokens and FLOPs for the pace] are
            # all-reduced, so that every rank takes the same decisions.
            stats, batch = forward_backward(model, batch, lambda micro: load(state.step, micro), grad_accum,
                                            world > 1 and not sharded, autocast, scaler, meter)
            stats[3] = float(stop.set)
            stats[4] = float(bool(cfg.max_time) and state.elapsed + time.perf_counter() - t0 >= cfg.max_time)
            if world > 1:
                dist.all_reduce(stats)
            loss_val = stats[0].item() / (grad_accum * world)

            grad_norm = clip_and_step(raw_model, optimizer, scaler, state, cfg, loss_val)
            dt = time.perf_counter() - t0
            state.step, state.tokens, state.elapsed = state.step + 1, state.tokens + int(stats[1]), state.elapsed + dt
            time_up, interrupted = bool(stats[4] > 0), bool(stats[3] > 0)

            # Log, and stop after too many bad steps.
            tok_rate, mfu = meter.update(*stats[5:].tolist(), dt)
            state.sec_per_step = meter.sec_per_step or state.sec_per_step
            if threads_note := cpu_threads.adjust():
                log(threads_note)
            bar.update(1)
            bar.set_postfix_str(meter.text(loss_val, lr, last_val), refresh=False)
            record = {"type": "train", "step": state.step, "tokens": state.tokens, "loss": loss_val, "lr": lr,
                      "grad_norm": grad_norm, "tok_per_s": tok_rate, "mfu": mfu, "elapsed": state.elapsed,
                      "target_tokens": int(stats[2].item())}
            if every(cfg.log_every, state.step) or state.step == 1:
                run_log.write(record)
                record = None
            if state.bad_steps >= cfg.max_bad_steps:
                stop_on_bad_steps(state, cfg, checkpoints, run_log, world, bar)
    bar.close()
    if record:  # the last step, so that the curve reaches the end
        run_log.write(record)
    plotter.wait()
    checkpoints.close()
    finish(state, reason, last_val, run_log, out, master, world)


def finish(state: TrainState, reason: str, val_loss: float | None, run_log: Log, out: Path, master: bool,
           world: int) -> None:
    """Log why the run stopped, its last validation loss and where it was saved, then leave the process group."""
    run_log.write({"type": "end", "step": state.step, "tokens": state.tokens, "reason": reason,
                   "elapsed": state.elapsed, "skipped_steps": state.skipped_steps})
    if master:
        val = f", validation loss {val_loss:.4f} (best {state.best_val:.4f})" if val_loss is not None else ""
        log(f"{reason} at step {state.step}{val}: saved {out / f'step_{state.step:07d}'} "
            f"({'resume with --resume' if reason == 'interrupted' else 'done'})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def stop_on_bad_steps(state: TrainState, cfg: TrainConfig, checkpoints: Checkpoints, run_log: Log, world: int,
                      bar) -> None:
    """Too many non-finite steps in a row: stop the run with an error naming the last good checkpoint."""
    bar.close()
    checkpoints.close()  # the last one written
    kept = step_checkpoints(checkpoints.out)
    run_log.write({"type": "stopped", "step": state.step, "reason": "non-finite loss"})
    if world > 1:
        dist.destroy_process_group()
    raise SystemExit(f"error: {state.bad_steps} steps in a row had a non-finite loss or gradient (max_bad_steps="
                     f"{cfg.max_bad_steps}); stopping. The last good checkpoint is "
                     f"{kept[-1] if kept else '(none yet)'}. Try a lower --lr, a longer warmup, or check the data.")


if __name__ == "__main__":
    print("train.py is the training loop that pretrain.py and finetune.py share; run one of them:\n"
          "  python pretrain.py --preset tiny --data data/demo --out checkpoints/pretrain   (--help: every option)\n"
          "  python finetune.py --init checkpoints/pretrain --out checkpoints/chat", file=sys.stderr)
    sys.exit(2)
