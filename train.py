"""The training loop, shared by pretrain.py and finetune.py: `fit(model, cfg, data, provenance)`.

`data` is any object with
    batch(step, micro, rank, world) -> (x, y)  LongTensors (B, T); y == -1 means "no loss here". A pure
                                               function of its arguments, so a resumed run sees the same batches;
    val_batches() -> [(x, y), ...]             the fixed held-out batches evaluated at every eval;
    fingerprint: str                           identifies the data in checkpoint provenance.

fit() picks the device and precision (bf16 autocast, TF32 and torch.compile on CUDA; fp32 on CPU), runs data
parallel under torchrun (DDP: NCCL on CUDA, gloo on CPU), steps the optimizer (optim.py) with warmup + cosine / wsd /
constant learning rate, accumulates gradients up to cfg.batch_tokens, clips them, and skips (and counts) steps whose loss
is not finite. It never loses a run: RUN/step_NNNNNNN checkpoints every cfg.save_every steps and at the end
(the last cfg.keep_last are kept), RUN/best by validation loss, SIGINT/SIGTERM finish the step, save and return,
and cfg.resume continues exactly from the newest valid checkpoint (a corrupted one is skipped with a warning).
Only rank 0 writes: checkpoints, RUN/log.jsonl (one JSON record per line) and RUN/loss.png.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, step_checkpoints
from config import ConfigError, TrainConfig, to_dict
from model import GPT, pick_device
from optim import check_optimizer, make_optimizer

# Dense bf16 tensor-core peak FLOP/s per GPU, for MFU; a GPU not listed (and the CPU) shows no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "RTX 4090": 165e12}


def check_config(cfg: TrainConfig) -> None:
    """Refuse values the loop cannot use before any work starts; the message names the field."""
    choices = {"schedule": ("cosine", "wsd", "constant"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"field '{name}' expects one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    minimum = {"batch_size": 1, "log_every": 1, "max_bad_steps": 1, "max_steps": 0, "warmup_steps": 0,
               "batch_tokens": 0, "eval_every": 0, "eval_batches": 0, "save_every": 0, "keep_last": 0, "lr": 0}
    for name, low in minimum.items():
        if getattr(cfg, name) < low:
            raise ConfigError(f"field '{name}' expects a value >= {low}, got {getattr(cfg, name)!r}")
    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time):
        raise ConfigError("no limit: set max_steps, max_tokens or max_time (one of them > 0)")
    if not 0 <= cfg.decay_fraction <= 1:
        raise ConfigError(f"field 'decay_fraction' expects a value in [0, 1], got {cfg.decay_fraction!r}")
    check_optimizer(cfg)


def log(msg: str) -> None:
    """A message that does not break the progress bar."""
    tqdm.write(msg, file=sys.stderr)


def setup_device(cfg: TrainConfig):
    """(device, rank, world, local_rank); joins the process group when started by torchrun."""
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), \
        int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world, local_rank


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
    total_steps may be fractional (planned_steps) or math.inf (no decay yet)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = total_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))  # cosine
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def micro_steps(cfg: TrainConfig, block_size: int, world: int) -> int:
    """Micro-batches per optimizer step on each process: enough to reach cfg.batch_tokens (at least one)."""
    return max(1, cfg.batch_tokens // (cfg.batch_size * block_size * world))


def latest_checkpoint(out: Path, model: GPT):
    """(train_state, path) of the newest checkpoint that loads, after copying its weights into `model`; corrupted
    ones are skipped with a warning. (None, None) when there is none."""
    for ckpt in reversed(step_checkpoints(out)):
        try:
            loaded, config, state = load_checkpoint(ckpt, train_state=True)
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {ckpt}: {e}")
            continue
        if loaded.config != model.config:
            raise CheckpointError(f"{ckpt}: model config {to_dict(loaded.config)} does not match this run's "
                                  f"{to_dict(model.config)}")
        model.load_state_dict(loaded.state_dict())
        return state, ckpt
    return None, None


def remove_dir(d: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint is ever left under a real name."""
    doomed = d.with_name(d.name + f".old-{os.getpid()}")
    os.replace(d, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class Log:
    """RUN/log.jsonl, one JSON object per line; written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def restart(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records of steps past the checkpoint, which the resumed run will redo (and a line
        cut short by a kill)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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


def plot_run(out: Path) -> None:
    """Refresh RUN/loss.png; a plotting failure must never stop training."""
    try:
        from plot_loss import plot_runs
        plot_runs([out], out / "loss.png")
    except Exception as e:  # noqa: BLE001 - the plot is a convenience, the run is what matters
        log(f"warning: could not plot {out / 'loss.png'}: {e}")


def fit(model: GPT, cfg: TrainConfig, data, provenance: dict, extra_config: dict | None = None) -> Path:
    """Train `model` on `data` per `cfg`; returns the best checkpoint's directory (else the final one)."""
    check_config(cfg)
    device, rank, world, local_rank = setup_device(cfg)
    master = rank == 0
    out = Path(cfg.out)
    dtype = autocast_dtype(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    block = model.config.block_size
    grad_accum = micro_steps(cfg, block, world)
    tokens_per_step = grad_accum * cfg.batch_size * block * world  # nominal: for the schedule's length
    step_limit = cfg.max_steps or math.inf  # max_steps 0: no step limit
    if cfg.max_tokens:
        step_limit = min(step_limit, math.ceil(cfg.max_tokens / tokens_per_step))

    # Resume: weights, optimizer, counters; the data position is the step, since batches are a function of it.
    step, tokens, elapsed, best_val, bad_steps, n_skipped = 0, 0, 0.0, float("inf"), 0, 0
    state, resumed_from = (latest_checkpoint(out, model) if cfg.resume else (None, None))
    if cfg.resume and state is None and master:
        log(f"--resume: no checkpoint in {out}, starting from the beginning")
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        best_val, bad_steps, n_skipped = state["best_val"], state["bad_steps"], state["skipped_steps"]
        if master:
            log(f"resuming from {resumed_from} (step {step}, {tokens:,} tokens)")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        earlier = step_checkpoints(out) + ([out / "best"] if (out / "best").is_dir() else [])
        if state is None and earlier:
            log(f"warning: a new run in {out}: deleting the {len(earlier)} checkpoints of the earlier run there "
                f"(--resume continues a run instead)")
            for d in earlier:
                remove_dir(d)
        for stale in [*out.glob("*.tmp-*"), *out.glob("*.old-*")]:  # left by a run killed while saving or deleting
            shutil.rmtree(stale, ignore_errors=True)
    run_log = Log(out / "log.jsonl", master)
    kind = provenance.get("kind", "finetune" if "finetune" in (extra_config or {}) else "pretrain")
    if state is None:
        run_log.restart()
        run_log.write({"type": "run", "kind": kind, "init_from": provenance.get("init_from") or cfg.init_from or None,
                       "config": {**to_dict(cfg), "model": to_dict(model.config)}, "world": world,
                       "grad_accum": grad_accum, "tokens_per_step": tokens_per_step})
    else:
        run_log.truncate_after(step)
        run_log.write({"type": "resume", "step": step, "tokens": tokens, "from": str(resumed_from)})

    raw_model = model
    if device.type == "cuda" and cfg.compile:
        model = torch.compile(model)
    eval_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_per_token = raw_model.flops_per_token(block)
    peak = peak_flops(device, dtype)

    def load(s: int, micro: int):
        x, y = data.batch(s, micro, rank, world)
        if device.type == "cuda":  # pinned memory lets the copy overlap the GPU's work on the previous batch
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def evaluate() -> float | None:
        batches = data.val_batches()
        if not batches:
            return None
        eval_model.eval()
        total = torch.zeros(2, device=device)
        with torch.no_grad(), autocast:
            for i in range(rank, len(batches), world):  # each rank evaluates its share of the fixed batches
                x, y = (t.to(device) for t in batches[i])
                total += torch.stack([eval_model(x, y).float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total)
        eval_model.train()
        return (total[0] / total[1]).item()

    def save(name: str, with_state: bool, val_loss: float | None = None) -> Path:
        prov = {**provenance, "kind": kind, "data": data.fingerprint, "step": step, "tokens": tokens}
        if val_loss is not None:
            prov["val_loss"] = val_loss
        train_state = None
        if with_state:  # no RNG state needed: the dropout RNG is reseeded from (seed, step, rank) every step
            train_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                           "tokens": tokens, "elapsed": elapsed, "best_val": best_val, "bad_steps": bad_steps,
                           "skipped_steps": n_skipped}
        return save_checkpoint(out / name, raw_model, prov, train_state, extra_config)

    def checkpoint_step() -> Path:
        path = save(f"step_{step:07d}", with_state=True)
        for old in step_checkpoints(out)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            remove_dir(old)
        return path

    def run_eval() -> None:
        nonlocal best_val, last_val
        val_loss = evaluate()
        if val_loss is None:
            return
        run_log.write({"type": "eval", "step": step, "tokens": tokens, "val_loss": val_loss})
        if master:
            if val_loss < best_val:
                save("best", with_state=False, val_loss=val_loss)
            if step > 0:  # a plot needs training records
                plot_run(out)
        best_val = min(best_val, val_loss)
        last_val = val_loss

    if master:
        log(f"training {raw_model.num_params():,} parameters on {world} x {device} ({str(dtype).split('.')[-1]}), "
            f"{tokens_per_step:,} tokens per step ({grad_accum} x {cfg.batch_size} x {block} x {world}), "
            "until " + " or ".join(([f"step {step_limit}"] if step_limit < math.inf else [])
                                   + ([f"{cfg.max_time:.0f} s"] if cfg.max_time else [])))
    last_val = None
    bar = tqdm(total=step_limit if step_limit < math.inf else None, initial=step, disable=not master, unit="step", dynamic_ncols=True)
    if state is None:
        run_eval()
    last_saved = step if state is not None else -1
    time_up = bool(cfg.max_time) and elapsed >= cfg.max_time
    model.train()
    stop_reason = ""
    tok_rate = sec_per_step = None  # sec_per_step: the pace for planned_steps, from this process's second step on
    first_step = step
    batch = load(step, 0)
    with StopFlag() as stop:
        while True:
            if step >= step_limit:
                stop_reason = f"reached max_steps ({step_limit})"
            elif cfg.max_tokens and tokens >= cfg.max_tokens:
                stop_reason = f"reached max_tokens ({cfg.max_tokens:,})"
            elif time_up:
                stop_reason = f"reached max_time ({cfg.max_time:.0f} s)"
            if stop_reason:
                break
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed + 1_000_003 * step + 1009 * rank)  # dropout: a function of (step, rank)
            lr = lr_at(step, cfg, planned_steps(step, cfg, step_limit, elapsed, sec_per_step))
            for group in optimizer.param_groups:
                group["lr"] = lr
            # [summed micro-batch losses, tokens, target tokens, stop requested, time is up], all-reduced so that
            # every rank takes the same decisions
            stats = torch.zeros(5, device=device)
            for micro in range(grad_accum):
                x, y = batch
                # the next micro-batch (or the next step's first) is read while the GPU works on this one
                batch = load(step, micro + 1) if micro + 1 < grad_accum else load(step + 1, 0)
                # DDP averages gradients across processes only on the last micro-batch of the step
                sync = micro == grad_accum - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast:
                        loss = model(x, y)
                    scaler.scale(loss / grad_accum).backward()
                stats[0] += loss.detach().float()
                stats[1] += x.numel()
                stats[2] += (y != -1).sum()
            stats[3] = float(stop.set)
            stats[4] = float(bool(cfg.max_time) and elapsed + time.perf_counter() - t0 >= cfg.max_time)
            if world > 1:
                dist.all_reduce(stats)
            loss_val = stats[0].item() / (grad_accum * world)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
            finite = math.isfinite(loss_val) and (math.isfinite(grad_norm) or scaler.is_enabled())
            if finite:
                scaler.step(optimizer)  # with fp16, the scaler itself skips steps whose gradients overflowed
                scaler.update()
                bad_steps = 0
            else:
                bad_steps += 1
                n_skipped += 1
                log(f"step {step}: non-finite loss ({loss_val}) or gradient norm ({grad_norm}): step skipped "
                    f"({bad_steps} in a row, the limit is max_bad_steps={cfg.max_bad_steps})")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(stats[1].item())
            dt = time.perf_counter() - t0
            elapsed += dt
            if step > first_step + 1:  # the first step of a process includes warm-up (torch.compile on CUDA)
                sec_per_step = dt if sec_per_step is None else 0.9 * sec_per_step + 0.1 * dt
            time_up = bool(stats[4] > 0)
            if bad_steps >= cfg.max_bad_steps:
                bar.close()
                kept = step_checkpoints(out)
                msg = (f"error: {bad_steps} steps in a row had a non-finite loss or gradient (max_bad_steps="
                       f"{cfg.max_bad_steps}); stopping. The last good checkpoint is "
                       f"{kept[-1] if kept else '(none yet)'}. Try a lower --lr, a longer warmup, or check the data.")
                run_log.write({"type": "stopped", "step": step, "reason": "non-finite loss"})
                if world > 1:
                    dist.destroy_process_group()
                raise SystemExit(msg)

            tok_rate = stats[1].item() / dt if tok_rate is None else 0.9 * tok_rate + 0.1 * stats[1].item() / dt
            mfu = flops_per_token * tok_rate / (peak * world) if peak else None
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_val:.4f} lr {lr:.2e} {tok_rate:,.0f} tok/s"
                                + (f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
                                + (f" val {last_val:.4f}" if last_val is not None else ""), refresh=False)
            if step % cfg.log_every == 0 or step == 1:
                run_log.write({"type": "train", "step": step, "tokens": tokens, "loss": loss_val, "lr": lr,
                               "grad_norm": grad_norm, "tok_per_s": tok_rate, "mfu": mfu, "elapsed": elapsed,
                               "target_tokens": int(stats[2].item())})
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
            if master and cfg.save_every and step % cfg.save_every == 0:
                checkpoint_step()
                last_saved = step
            if stats[3] > 0:
                stop_reason = "interrupted"
                break
    bar.close()

    if stop_reason != "interrupted" and not (cfg.eval_every and step % cfg.eval_every == 0):
        run_eval()  # the final model's validation loss
    final = None
    if master:
        final = checkpoint_step() if last_saved != step else out / f"step_{step:07d}"
        run_log.write({"type": "end", "step": step, "tokens": tokens, "reason": stop_reason, "elapsed": elapsed,
                       "skipped_steps": n_skipped})
        how = "resume with --resume" if stop_reason == "interrupted" else "done"
        log(f"{stop_reason} at step {step}: saved {final} ({how})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    best = out / "best"
    return best if best.is_dir() else (final or out / f"step_{step:07d}")
