"""Plot the losses of one or more training runs: python plot_loss.py RUN_DIR... [--out loss.png] [--x steps|tokens]

For each run (RUN_DIR/log.jsonl, written by train.py): the training loss raw (faint) and smoothed (an exponential
moving average over the logged points, spanning at most a tenth of them), the validation loss (markers), and the
learning rate (dotted, on the right-hand axis). Several runs are overlaid. A fine-tuning run whose log's init_from
points into another run folder given on the same command line (its checkpoint, or the folder itself; or a path
with that folder's name in it, as it was given from another working folder) is drawn after that run's end: its x values are offset by the last step
(or token count) of the pretraining run, so the two read as one timeline, with a vertical line where fine-tuning
starts. The loss axis is logarithmic (--y linear for a linear one): a run falls from about ln(vocabulary) to a
fraction of a nat, and fine-tuning's loss is a tenth of pretraining's, so a linear axis flattens all but the first
steps. Non-finite losses (a diverged step logs NaN) are left out of the curves. The folder of --out is created.
A missing or empty log is an error that names the file, as are a --smooth outside [0, 1) and an --out that cannot
be written (exit code 2).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (the Agg canvas)

from config import fail


class LogError(ValueError):
    """A run log that cannot be plotted; the message names the file."""


def read_log(run_dir) -> dict:
    """{"run": the run record (or {}), "train": [...], "eval": [...]} from RUN_DIR/log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise LogError(f"{path}: no such log (is {run_dir} a training run folder?)")
    log = {"run": {}, "train": [], "eval": []}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if f.read(1) == "":  # the last line of a run killed while writing it: ignore it
                    break
                raise LogError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            kind = record.get("type")
            if kind == "run" and not log["run"]:
                log["run"] = record
            elif kind in ("train", "eval"):
                log[kind].append(record)
    if not log["train"] and not log["eval"]:
        raise LogError(f"{path}: empty log (no training or validation records yet)")
    return log


def ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average, bias-corrected so that it starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def pretraining_run(init_from: str | None, run: Path, runs) -> Path | None:
    """The folder among `runs` (resolved) that a fine-tuning run's init_from points into: by path, else by the
    folder's name. The log holds init_from as it was given, relative to where the fine-tuning ran (`make demo`:
    checkpoints/demo-pretrain), which this command may not share."""
    if not init_from:
        return None
    others = [p for p in runs if p != run.resolve()]
    return next((p for p in others if _inside(Path(init_from).resolve(), p)), None) or \
        next((p for p in others if p.name in Path(init_from).parts), None)


def plot_runs(run_dirs, out, x: str = "steps", smooth: float = 0.9, y: str = "log") -> dict:
    """Draw the runs into the PNG `out` (written atomically); returns the plotted data per run label:
    {"x", "loss", "smooth", "val_x", "val_loss", "lr", "offset"} (x values include the offset)."""
    if x not in ("steps", "tokens"):
        raise ValueError(f"x must be 'steps' or 'tokens', got {x!r}")
    if y not in ("log", "linear"):
        raise ValueError(f"y must be 'log' or 'linear', got {y!r}")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    key = "step" if x == "steps" else "tokens"
    runs = [(Path(d), read_log(d)) for d in run_dirs]
    ends = {d.resolve(): max(r[key] for r in log["train"] + log["eval"]) for d, log in runs}

    fig = Figure(figsize=(10, 6), dpi=100)
    ax = fig.subplots()
    ax_lr = ax.twinx()
    data = {}
    for i, (d, log) in enumerate(runs):
        color = f"C{i % 10}"
        parent = pretraining_run(log["run"].get("init_from"), d, ends)
        offset = ends[parent] if parent is not None else 0
        label = d.name if [r.name for r, _ in runs].count(d.name) == 1 else str(d)
        # a non-finite loss (a skipped step's, which train.py logs as null) would stay in the EMA for the rest of
        # the run: such points are skipped
        train = [r for r in log["train"] if finite(r["loss"])]
        evals = [r for r in log["eval"] if finite(r["val_loss"])]
        xs = [r[key] + offset for r in train]
        loss = [r["loss"] for r in train]
        # the EMA spans about 1 / (1 - beta) points: at most a tenth of the run, or a short run is all lag
        smoothed = ema(loss, min(smooth, max(0.0, 1 - 10 / max(1, len(loss)))))
        val_x = [r[key] + offset for r in evals]
        val = [r["val_loss"] for r in evals]
        lr = [r["lr"] for r in train]
        ax.plot(xs, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smoothed, color=color, linewidth=1.8, label=f"{label} train")
        ax.plot(val_x, val, color=color, marker="o", markersize=4, linestyle="--", linewidth=1.2, label=f"{label} val")
        ax_lr.plot(xs, lr, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
        if offset:
            ax.axvline(offset, color=color, linestyle="-.", linewidth=1.0, alpha=0.6)
            ax.annotate(f"{label} starts", (offset, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8, color=color)
        data[label] = {"x": xs, "loss": loss, "smooth": smoothed, "val_x": val_x, "val_loss": val, "lr": lr,
                       "offset": offset}
    ax.set_yscale(y)
    ax.set_xlabel("optimizer steps" if x == "steps" else "tokens")
    ax.set_ylabel("loss (train: raw faint, smoothed solid; validation: markers)")
    ax_lr.set_ylabel("learning rate (dotted)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(", ".join(data))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return data


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (with log.jsonl)")
    parser.add_argument("--out", default="loss.png", help="the PNG to write (default: loss.png)")
    parser.add_argument("--x", choices=["steps", "tokens"], default="steps", help="x axis (default: steps)")
    parser.add_argument("--y", choices=["log", "linear"], default="log", help="loss axis (default: log)")
    parser.add_argument("--smooth", type=float, default=0.9,
                        help="EMA factor per logged point for the training loss, in [0, 1) (0 = raw; lowered for "
                             "short logs)")
    args = parser.parse_args(argv)
    try:
        data = plot_runs(args.runs, args.out, args.x, args.smooth, args.y)
    except ValueError as e:  # a bad log (LogError) or --smooth
        fail(str(e))
    except OSError as e:  # e.g. an --out that cannot be written
        fail(f"{e.filename}: {e.strerror}")
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({len(v['x'])} train / {len(v['val_x'])} val points)"
                                          for k, v in data.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
