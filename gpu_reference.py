"""The GPU reference run: the whole pipeline on one GPU in about ten minutes, measured, with a report.

  python gpu_reference.py                          # a CUDA machine; data from ../shared/data
  python gpu_reference.py --smoke                  # the very same stages at toy sizes on the CPU (a few minutes)
  python gpu_reference.py --data_root data/gpu_carry/data --report $OUT   # a carried run (pack_gpu_run.py)

Stages, each a script of this repository run as a subprocess (its output goes to run.log):
  env        torch, the device, package versions
  tokenize   tokenize_data.py on Gutenberg shards (the GPU run: two shards, at least 40M tokens): tokens/s
  pretrain   pretrain.py, the gpt2 preset (context 1024, bf16 and torch.compile on CUDA) for a wall-time budget;
             --max_time alone sizes the schedule to the time (README, "Pretrain"): the decay ends in time
  bench      bench.py train: our step against transformers' GPT2LMHeadModel at the same shape and batch
  finetune   finetune.py on instruct/mix and the dialog sets, for a wall-time budget
  evaluate   evaluate.py: the loss on held-out dialogs (oasst1_en_validation, never tuned on)
  samples    answers to the first turns of MT-bench (this script's `sample` mode)
  serve      bench.py serve: time to first token, decode tokens/s against transformers' generate, and the
             aggregate tokens/s of serve.py at 1, 4, 16 and 64 clients
  plot       plot_loss.py: pretraining and fine-tuning losses as one timeline (loss.png)

The report folder (--report) gets report.md, report.json, loss.png and run.log, rewritten after every stage, so a
run cut off by a time limit still leaves its report. A failed stage is recorded (exit code, the end of its output)
and the stages that need its output are skipped; the exit code is then 1. Checkpoints and token shards go to
--work. Peak memory per stage: the process's peak RSS, and on CUDA the device's peak memory.used (nvidia-smi,
sampled every second, all processes on the GPU).
"""

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from atomic import write_text
from config import cpu_name, usable_cores

ROOT = Path(__file__).resolve().parent
HELD_OUT = "oasst1_en_validation"  # the dialog set kept out of fine-tuning, for the evaluation's loss


@dataclass
class Profile:
    """The sizes of one kind of run. Figures of a smoke run only show that every stage works."""
    name: str
    corpus_shards: int  # Gutenberg train shards to tokenize
    min_tokens: int  # the corpus must reach this many tokens (0: no check)
    pretrain: list[str]  # pretrain.py arguments after --data/--out
    bench_train: list[str]
    finetune: list[str]
    mt_bench_questions: int
    sample_tokens: int
    bench_serve: list[str]
    evaluate: list[str]
    toy_docs: int = 0  # smoke: a corpus of the first toy_docs books, each cut to toy_chars characters
    toy_chars: int = 0
    toy_chats: int = 0  # smoke: the first toy_chats records of every chat file
    timeouts: dict = field(default_factory=dict)  # seconds per stage, beyond which it is stopped
    # With --deadline: the least time each stage needs (start-up, compilation, a few steps), kept free for the
    # stages still to come; a training stage's --max_time shrinks to its share minus its start-up (`overhead`).
    reserves: dict = field(default_factory=dict)
    overhead: float = 0.0


GPU = Profile(
    name="gpu", corpus_shards=2, min_tokens=40_000_000,
    # Micro-batches of 32 x 1024 (an H200 holds them easily), 4 per step, so that the steps that fit the budget at
    # the expected pace are many times the 30 warmup steps; the cosine decay follows the clock.
    pretrain=["--preset", "gpt2", "--batch_size", "32", "--batch_tokens", "131072", "--warmup_steps", "30",
              "--max_time", "180", "--eval_every", "100", "--eval_batches", "20", "--save_every", "0",
              "--log_every", "5"],
    bench_train=["train", "--preset", "gpt2", "--device", "cuda", "--batch_size", "32", "--rounds", "3",
                 "--steps", "3"],
    finetune=["--batch_size", "32", "--lr", "2e-4", "--warmup_steps", "30", "--max_time", "90",
              "--eval_every", "100", "--eval_batches", "10", "--save_every", "0", "--log_every", "5"],
    mt_bench_questions=80, sample_tokens=256,
    bench_serve=["serve", "--tokens", "128"],
    evaluate=["--suite", "false", "--batch_size", "16"],  # evaluate.py holds a batch's fp32 logits over the vocabulary
    timeouts={"env": 60, "tokenize": 180, "pretrain": 420, "bench": 300, "finetune": 300, "evaluate": 180,
              "samples": 180, "serve": 360, "plot": 60},
    reserves={"env": 10, "tokenize": 45, "pretrain": 150, "plot_pretrain": 15, "bench": 60, "finetune": 110,
              "plot": 15, "evaluate": 30, "samples": 45, "serve": 75},
    overhead=75,  # python, CUDA and torch.compile's first graphs
)

SMOKE = Profile(
    name="smoke", corpus_shards=1, min_tokens=0,
    # The gpt2 preset's code path (learned positions) at the tiny preset's shape, which bench.py train times.
    pretrain=["--preset", "gpt2", "--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "256",
              "--batch_size", "4", "--batch_tokens", "0", "--lr", "3e-3", "--warmup_steps", "5", "--max_time", "12",
              "--eval_every", "50", "--eval_batches", "2", "--save_every", "0", "--log_every", "2"],
    bench_train=["train", "--preset", "tiny", "--device", "cpu", "--rounds", "1", "--steps", "1"],
    finetune=["--batch_size", "8", "--lr", "1e-3", "--warmup_steps", "5", "--max_time", "10",
              "--eval_every", "20", "--eval_batches", "2", "--save_every", "0", "--log_every", "2"],
    mt_bench_questions=4, sample_tokens=16,
    bench_serve=["serve", "--tokens", "64"],
    evaluate=["--suite", "false", "--batch_size", "16"],
    toy_docs=40, toy_chars=20_000, toy_chats=200,
    timeouts={"env": 60, "tokenize": 120, "pretrain": 180, "bench": 240, "finetune": 180, "evaluate": 120,
              "samples": 120, "serve": 300, "plot": 60},
    reserves={"env": 5, "tokenize": 10, "pretrain": 20, "plot_pretrain": 5, "bench": 20, "finetune": 20,
              "plot": 5, "evaluate": 10, "samples": 10, "serve": 30},
    overhead=8,
)
STAGES = ("env", "tokenize", "pretrain", "plot_pretrain", "bench", "finetune", "plot", "evaluate", "samples", "serve")


# ---- running a stage -------------------------------------------------------------------------------------------

class GpuMemory:
    """The peak of nvidia-smi's memory.used (MiB, all processes) while a stage runs; None without nvidia-smi."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            used = max((float(x) for x in out if x.replace(".", "", 1).isdigit()), default=None)
            if used is not None:
                self.peak = max(self.peak or 0.0, used)
            self._stop.wait(1.0)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def run(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run cmd, its output echoed and appended to log_path. {"rc", "seconds", "output", "peak_rss_mb",
    "peak_gpu_mb", "timed_out"}. At the timeout it gets SIGTERM (training saves and stops), then SIGKILL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    lines = []
    with open(log_path, "a") as log, GpuMemory() as gpu:
        log.write(f"$ {' '.join(cmd)}\n")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                print(line, end="", flush=True)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status, usage, timed_out, signalled = None, None, False, 0.0
        try:
            while status is None:  # os.wait4 gives this child's own peak RSS
                pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    status, usage = st, ru
                    break
                elapsed = time.perf_counter() - start
                if elapsed > timeout and not signalled:
                    timed_out, signalled = True, elapsed
                    os.killpg(proc.pid, signal.SIGTERM)
                elif signalled and elapsed > signalled + 30:
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            if status is None:  # this run is stopped (Ctrl-C, SIGTERM): the stage, in a session of its own, too
                os.killpg(proc.pid, signal.SIGTERM)
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=10)
        seconds = time.perf_counter() - start
    return {"rc": proc.returncode, "seconds": round(seconds, 2), "output": "".join(lines), "timed_out": timed_out,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_gpu_mb": gpu.peak}


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / name), *map(str, args)]


def shown(cmd: list[str]) -> str:
    """A command as the report shows it: `python`, and paths relative to the repository."""
    return " ".join(["python", *cmd[1:]]).replace(f"{ROOT}/", "")


# ---- inputs ----------------------------------------------------------------------------------------------------

def find(root: Path, pattern: str) -> list[Path]:
    """Files matching pattern + '.jsonl' or '.jsonl.gz' under root (a carried run has them decompressed)."""
    return sorted(p for ext in (".jsonl", ".jsonl.gz") for p in root.glob(pattern + ext))


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def head_jsonl(src: Path, dest: Path, rows: int, cut: dict | None = None) -> Path:
    """The first `rows` lines of src written to dest (.jsonl), a field cut to a length if cut = {field: chars}."""
    with open_text(src) as f, open(dest, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= rows:
                break
            if cut:
                record = json.loads(line)
                record.update({k: record[k][:n] for k, n in cut.items()})
                line = json.dumps(record) + "\n"
            out.write(line)
    return dest


def inputs(data_root: Path, profile: Profile, work: Path) -> dict:
    """{"corpus": [...], "chats": [...], "held_out": path, "questions": path}: the shared data's files, or in the
    smoke profile small copies of their first records (the same formats, written into work/inputs)."""
    corpus = find(data_root, "pretrain/gutenberg_top100_authors/train_*")[:profile.corpus_shards]
    chats = find(data_root, "instruct/mix/*") + [p for p in find(data_root, "dialog/*/*") if p.parent.name != HELD_OUT]
    held_out = find(data_root, f"dialog/{HELD_OUT}/*")
    questions = data_root / "eval" / "mt_bench_80" / "question.jsonl"
    wanted = (("Gutenberg train shards", corpus), ("instruct/mix", chats), (f"dialog/{HELD_OUT}", held_out),
              ("MT-bench", [questions] if questions.exists() else []))
    missing = [name for name, found in wanted if not found]
    if missing:
        print(f"error: {data_root}: no {', '.join(missing)} (expected the layout of ../shared/data; README, GPU)",
              file=sys.stderr)
        sys.exit(2)
    if profile.toy_docs:
        toy = work / "inputs"
        toy.mkdir(parents=True, exist_ok=True)
        corpus = [head_jsonl(corpus[0], toy / "corpus.jsonl", profile.toy_docs, {"text": profile.toy_chars})]
        chats = [head_jsonl(p, toy / f"{p.parent.name}.jsonl", profile.toy_chats) for p in chats]
        held_out = [head_jsonl(held_out[0], toy / f"{HELD_OUT}.jsonl", profile.toy_chats)]
    return {"corpus": corpus, "chats": chats, "held_out": held_out[0], "questions": questions}


# ---- reading what the stages wrote ------------------------------------------------------------------------------

def train_log(run_dir: Path) -> dict:
    """Figures of a training run from RUN/log.jsonl (train.py's records). tok_per_s and mfu are train.py's
    moving averages at the end; steady_tok_per_s is the mean of the logged tok_per_s from the second logged step on,
    each weighted by the time since the record before: the first step's warm-up (torch.compile on CUDA) is left out,
    and so is fine-tuning's padding, which the records' cumulative "tokens" (the schedule's count) include but
    train.Meter's rates do not. steady_mfu scales mfu by the same ratio (FLOPs per token / peak)."""
    records = [json.loads(line) for line in open(run_dir / "log.jsonl") if line.strip()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r["val_loss"] for r in records if r["type"] == "eval" and r.get("val_loss") is not None]
    end = next((r for r in reversed(records) if r["type"] == "end"), {})
    last = train[-1] if train else {}
    out = {"steps": end.get("step"), "tokens": end.get("tokens"), "train_seconds": end.get("elapsed"),
           "stop_reason": end.get("reason"), "skipped_steps": end.get("skipped_steps"),
           "final_train_loss": last.get("loss"), "tok_per_s": last.get("tok_per_s"), "mfu": last.get("mfu"),
           "first_val_loss": evals[0] if evals else None, "final_val_loss": evals[-1] if evals else None,
           "best_val_loss": min(evals) if evals else None}
    if len(train) >= 3 and last["elapsed"] > train[1]["elapsed"]:
        spans = [(b["elapsed"] - a["elapsed"], b["tok_per_s"]) for a, b in zip(train[1:], train[2:])]
        out["steady_tok_per_s"] = sum(dt * rate for dt, rate in spans) / sum(dt for dt, _ in spans)
        if last.get("mfu") and last.get("tok_per_s"):
            out["flops_per_token_over_peak"] = last["mfu"] / last["tok_per_s"]
            out["steady_mfu"] = out["steady_tok_per_s"] * out["flops_per_token_over_peak"]
    return out


def parse_bench_train(output: str) -> dict:
    rates = {name: float(rate.replace(",", "")) for name, rate in
             re.findall(r"^\s+(\S.*?)\s+([\d,]+) tokens/s\s+\(median step", output, re.M)}
    ratio = re.search(r"ratio ours / transformers: ([\d.]+)x", output)
    setup = next((line for line in output.splitlines() if line.startswith("preset ")), "")
    return {"setup": setup, "tok_per_s": rates, "ratio": float(ratio.group(1)) if ratio else None}


def parse_bench_serve(output: str) -> dict:
    """bench.py serve's figures: its single-stream table (a rate it could not measure is None) and its table of
    aggregate rates (the medians of its rounds, not the rounds' own lines)."""
    same = re.search(r"greedy tokens identical to transformers: (\w+)", output)
    rows = {name: {"ttft_ms": float(ttft), "decode_tok_per_s": float(rate) if re.fullmatch(r"\d+", rate) else None}
            for name, ttft, rate in
            re.findall(r"^\| ((?:transformers|ours)[^|]*?) \| ([\d.]+) ms \| (\S+)", output, re.M)}
    clients = {int(n): float(rate) for n, rate in
               re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+x \| [\d.]+x \|$", output, re.M)}
    return {"identical_to_transformers": same.group(1) == "True" if same else None, "single_stream": rows,
            "aggregate_tok_per_s": clients}


def parse_finetune_counts(output: str) -> dict:
    found = {split: re.search(rf"^\s+{split}:\s+([\d,]+) examples, ([\d,]+) tokens", output, re.M)
             for split in ("train", "val")}
    return {f"{split}_{what}": int(m.group(i).replace(",", "")) for split, m in found.items() if m
            for i, what in ((1, "examples"), (2, "tokens"))}


# ---- the stages -------------------------------------------------------------------------------------------------

class Reference:
    """The run: stages in order, each recorded in report.json and report.md as soon as it ends."""

    def __init__(self, profile: Profile, data_root: Path, work: Path, report_dir: Path, deadline: float = 0):
        self.profile, self.data_root, self.work, self.dir = profile, data_root, work, report_dir
        self.log = report_dir / "run.log"
        self.start, self.deadline = time.time(), deadline
        self.report = {"profile": profile.name, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "commit": commit(), "data_root": str(data_root), "work": str(work),
                       "deadline_s": deadline or None, "stages": {}}

    def budget(self, name: str) -> float:
        """Seconds stage `name` may run: its timeout, and with a deadline no more than the time left after
        reserving the later stages' least needs (so one slow stage cannot starve the rest of the report)."""
        timeout = self.profile.timeouts.get(name.split("_")[0], 600)
        if not self.deadline:
            return timeout
        later = sum(self.reserve(n) for n in STAGES[STAGES.index(name) + 1:])
        return min(timeout, self.deadline - (time.time() - self.start) - later)

    def reserve(self, name: str) -> float:
        """The least time stage `name` needs, or its share of a deadline shorter than all of theirs (which
        would otherwise leave the first stages no time at all)."""
        reserves = self.profile.reserves
        return reserves.get(name, 0) * min(1.0, self.deadline / sum(reserves.values()))

    def fit_max_time(self, cmd: list[str], budget: float) -> list[str]:
        """cmd with its --max_time cut to the budget less start-up, so training stops in time and saves."""
        if not self.deadline or "--max_time" not in cmd:
            return cmd
        i = cmd.index("--max_time") + 1
        return cmd[:i] + [str(int(max(1, min(float(cmd[i]), budget - self.profile.overhead))))] + cmd[i + 1:]

    def stage(self, name: str, cmd: list[str], parse=None, needs: tuple = ()) -> bool:
        """Run one stage (unless a stage it needs did not succeed), record it and rewrite the report."""
        failed = [n for n in needs if self.report["stages"].get(n, {}).get("status") != "ok"]
        budget = self.budget(name)
        if failed:
            entry = {"status": "skipped", "reason": f"needs {', '.join(failed)}"}
        elif budget < self.reserve(name) / 2:
            entry = {"status": "skipped", "reason": f"{budget:.0f} s left of the {self.deadline:.0f} s deadline"}
        else:
            cmd = self.fit_max_time(cmd, budget)
            print(f"\n== {name}: {shown(cmd)}", flush=True)
            result = run(cmd, self.log, budget)
            ok = result["rc"] == 0 and not result["timed_out"]
            entry = {"status": "ok" if ok else "failed", "command": shown(cmd),
                     **{k: result[k] for k in ("rc", "seconds", "peak_rss_mb", "peak_gpu_mb", "timed_out")}}
            try:  # the stage's own figures (its seconds, say) are kept over any of the same name it reports
                entry = {**(parse(result["output"]) if ok and parse else {}), **entry}
            except (OSError, ValueError, KeyError, IndexError) as e:
                entry.update(status="failed", error=f"reading its results: {e!r}")
            if entry["status"] != "ok":
                entry["tail"] = result["output"].splitlines()[-40:]
            print(f"== {name}: {entry['status']} in {result['seconds']:.0f} s", flush=True)
        self.report["stages"][name] = entry
        self.write()
        return entry["status"] == "ok"

    def write(self) -> None:
        self.report["wall_seconds"] = round(time.time() - self.start, 1)
        write_text(self.dir / "report.json", json.dumps(self.report, indent=2) + "\n")
        write_text(self.dir / "report.md", markdown(self.report))

    def run_all(self, paths: dict) -> bool:
        p, w = self.profile, self.work
        shards, pre, chat = w / "gutenberg", w / "pretrain", w / "chat"
        self.stage("env", script("gpu_reference.py", "env"), lambda out: {"info": json.loads(out.splitlines()[-1])})
        if self.stage("tokenize", script("tokenize_data.py", *paths["corpus"], "--out", shards),
                      lambda out: tokenize_figures(shards, p.min_tokens)):
            entry = self.report["stages"]["tokenize"]
            entry["tok_per_s"] = entry["tokens"] / entry["seconds"]  # the whole process: start, read, write
            self.write()
        self.stage("pretrain", script("pretrain.py", "--data", shards, "--out", pre, *p.pretrain),
                   lambda out: train_log(pre), needs=("tokenize",))
        self.stage("plot_pretrain", script("plot_loss.py", pre, "--out", self.dir / "loss.png"), needs=("pretrain",))
        self.stage("bench", script("bench.py", *p.bench_train), parse_bench_train)
        self.stage("finetune", script("finetune.py", "--init", pre, "--out", chat, "--data", *paths["chats"],
                                      *p.finetune),
                   lambda out: {**train_log(chat), **parse_finetune_counts(out)}, needs=("pretrain",))
        self.stage("plot", script("plot_loss.py", pre, chat, "--out", self.dir / "loss.png"), needs=("finetune",))
        self.stage("evaluate", script("evaluate.py", chat, "--data", paths["held_out"], *p.evaluate),
                   lambda out: {"losses": json.loads((chat / "eval.json").read_text())["losses"]},
                   needs=("finetune",))
        samples = w / "mt_bench.json"
        self.stage("samples", script("gpu_reference.py", "sample", chat, paths["questions"], samples,
                                     "--n", p.mt_bench_questions, "--max_new_tokens", p.sample_tokens),
                   lambda out: json.loads(samples.read_text()), needs=("finetune",))
        self.stage("serve", script("bench.py", *p.bench_serve, "--checkpoint", chat), parse_bench_serve,
                   needs=("finetune",))
        return all(s["status"] == "ok" for s in self.report["stages"].values())


def tokenize_figures(shards: Path, min_tokens: int) -> dict:
    meta = json.loads((shards / "meta.json").read_text())
    splits = meta["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    docs = sum(s["documents"] for s in splits.values())
    if tokens < min_tokens:
        raise ValueError(f"{shards / 'meta.json'}: {tokens:,} tokens, fewer than the {min_tokens:,} asked for")
    return {"tokens": tokens, "documents": docs, "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"]}


def commit() -> str | None:
    """The repository's commit, with '+changes' when the working tree differs from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


# ---- the report -------------------------------------------------------------------------------------------------

GOALS = ("The H200 goals (issue 14): pretraining MFU >= 50% and >= 1.3x GPT2LMHeadModel's tokens/s; "
         "decode >= 2x generate")


def num(x, spec: str = ",.0f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def summary(name: str, s: dict) -> str:
    """One cell: the stage's main figure."""
    if s.get("status") != "ok":
        timed_out = " (timed out)" if s.get("timed_out") else ""
        return s.get("reason") or s.get("error") or f"exit code {s.get('rc')}{timed_out}"
    if name == "tokenize":
        return f"{num(s.get('tokens'))} tokens, {num(s.get('tok_per_s'))} tokens/s"
    if name in ("pretrain", "finetune"):
        return (f"{num(s.get('steps'))} steps, val loss {num(s.get('first_val_loss'), '.3f')} -> "
                f"{num(s.get('final_val_loss'), '.3f')}, {num(s.get('steady_tok_per_s'))} tokens/s")
    if name == "bench":
        return f"ours / transformers {num(s.get('ratio'), '.2f')}x"
    if name == "evaluate":
        return "; ".join(f"loss {x['loss']:.3f} on {x['tokens']:,} tokens" for x in s.get("losses", []))
    if name == "samples":
        return f"{len(s.get('answers', []))} answers, {num(s.get('tok_per_s'))} tokens/s"
    if name == "serve":
        agg = s.get("aggregate_tok_per_s", {})
        return f"aggregate {num(agg.get(16))} tokens/s at 16 clients, {num(agg.get(64))} at 64"
    return ""


def markdown(report: dict) -> str:
    st = report["stages"]
    info = st.get("env", {}).get("info", {})
    md = [f"# GPU reference run ({report['profile']})", "",
          f"Started {report['started']}; {report['wall_seconds']:.0f} s "
          f"{'in all' if report.get('finished') else 'so far (still running, or cut off)'}; "
          f"{info.get('device', '?')}; torch {info.get('torch', '?')}; python {info.get('python', '?')}; "
          f"commit {report.get('commit')}. "
          f"Data: `{report['data_root']}`." + (" **Smoke run: toy sizes on the CPU; its figures only show that "
                                               "every stage works.**" if report["profile"] == "smoke" else ""), "",
          "| stage | status | wall s | peak RSS MB | peak GPU MiB | result |", "|---|---|---|---|---|---|"]
    md += [f"| {name} | {s['status']} | {num(s.get('seconds'), '.1f')} | {num(s.get('peak_rss_mb'))} | "
           f"{num(s.get('peak_gpu_mb'))} | {summary(name, s)} |" for name, s in st.items()]
    md += training_section(st) + serving_section(st) + samples_section(st)
    md += ["", "## Commands", ""] + [f"- {name}: `{s['command']}`" for name, s in st.items() if "command" in s]
    for name, s in st.items():
        if "tail" in s:
            md += ["", f"## {name}: the end of its output", "", "```", *s["tail"], "```"]
    return "\n".join(md) + "\n"


def training_section(st: dict) -> list[str]:
    md = ["", "## Training", "", "| run | steps | tokens | train s | tokens/s (steady) | MFU (steady) | "
          "val loss first -> last (best) | stop |", "|---|---|---|---|---|---|---|---|"]
    for name in ("pretrain", "finetune"):
        s = st.get(name, {})
        if s.get("status") == "ok":
            md.append(f"| {name} | {num(s['steps'])} | {num(s['tokens'])} | {num(s['train_seconds'], '.0f')} | "
                      f"{num(s.get('steady_tok_per_s'))} | {num(s.get('steady_mfu'), '.1%')} | "
                      f"{num(s['first_val_loss'], '.3f')} -> {num(s['final_val_loss'], '.3f')} "
                      f"({num(s['best_val_loss'], '.3f')}) | {s['stop_reason']} |")
    ft = st.get("finetune", {})
    if "train_examples" in ft:
        md += ["", f"Fine-tuning data: {ft['train_examples']:,} train examples ({ft['train_tokens']:,} tokens), "
                   f"{ft.get('val_examples', 0):,} validation examples; its tokens/s leave padding out."]
    bench, ratio_of = st.get("bench", {}), st.get("pretrain", {}).get("flops_per_token_over_peak")
    if bench.get("tok_per_s"):
        md += ["", f"`bench.py train`: {bench.get('setup', '')}", "", "| model | tokens/s | MFU |", "|---|---|---|"]
        md += [f"| {k} | {v:,.0f} | {num(v * ratio_of if ratio_of else None, '.1%')} |"
               for k, v in bench["tok_per_s"].items()]
        md += ["", f"Ours / transformers: {num(bench.get('ratio'), '.2f')}x. MFU here uses the pretraining run's FLOPs "
                   "per token and peak (the same shape). " + GOALS + "."]
    ev = st.get("evaluate", {})
    md += ["", "Held-out dialogs: " + "; ".join(f"loss {x['loss']:.4f}, perplexity {x['perplexity']:.2f} on "
                                                 f"{x['tokens']:,} assistant tokens of `{x['data']}`"
                                                 for x in ev.get("losses", []))] if ev.get("losses") else []
    plotted = st.get("plot", st.get("plot_pretrain", {})).get("status") == "ok"
    return md + (["", "![losses: pretraining, then fine-tuning](loss.png)"] if plotted else [])


def serving_section(st: dict) -> list[str]:
    s = st.get("serve", {})
    if not s.get("single_stream"):
        return []
    md = ["", "## Serving (`bench.py serve`)", "", f"Greedy tokens identical to transformers: "
          f"{s.get('identical_to_transformers')}.", "", "| single stream | time to first token | decode tokens/s |",
          "|---|---|---|"]
    md += [f"| {k} | {v['ttft_ms']:.1f} ms | {v['decode_tok_per_s']:,.0f} |" for k, v in s["single_stream"].items()]
    md += ["", "| concurrent clients | aggregate tokens/s |", "|---|---|"]
    md += [f"| {n} | {rate:,.0f} |" for n, rate in s.get("aggregate_tok_per_s", {}).items()]
    return md


def samples_section(st: dict) -> list[str]:
    s = st.get("samples", {})
    if not s.get("answers"):
        return []
    md = ["", f"## MT-bench first turns ({s['sampling']})", ""]
    for a in s["answers"][:10]:
        md += [f"**Q{a['question_id']} ({a['category']})**: {a['question']}", "",
               "> " + a["answer"].replace("\n", "\n> "), ""]
    return md + ([f"({len(s['answers']) - 10} more in report.json)"] if len(s["answers"]) > 10 else [])


# ---- the helper modes: env and sample --------------------------------------------------------------------------

def env_info() -> None:
    """One JSON line: python, torch, the device and the versions of the packages the run uses."""
    import importlib.metadata
    import platform

    import torch
    cpu = cpu_name()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cores": usable_cores(), "cpu": cpu, "device": f"CPU: {cpu}"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor})"
    packages = {}
    for name in ("transformers", "tiktoken", "safetensors", "fastapi", "uvicorn", "pydantic", "numpy", "matplotlib"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    print(json.dumps({**info, "packages": packages}))


def sample(checkpoint: str, questions: str, out: str, n: int, max_new_tokens: int) -> None:
    """Answers of a chat checkpoint to the first turns of MT-bench questions, written to `out` as JSON."""
    import torch

    import chat_format
    from checkpoint import load_checkpoint
    from model import pick_device
    from tokenizer import decode

    device = pick_device("auto")
    model = load_checkpoint(checkpoint, device=device)[0].eval()
    rows = [json.loads(line) for line in open(questions) if line.strip()][:n]
    room = model.config.block_size - max_new_tokens
    prompts = [chat_format.render([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True)[0][-room:]
               for q in rows]
    settings = dict(temperature=0.7, top_p=0.9, seed=0)
    start = time.perf_counter()
    with torch.no_grad():
        new = model.generate(prompts, max_new_tokens, stop_tokens=(chat_format.END,), **settings)
    seconds = time.perf_counter() - start
    answers = [{"question_id": q["question_id"], "category": q["category"], "question": q["turns"][0],
                "answer": decode(ids[:-1] if ids and ids[-1] == chat_format.END else ids), "tokens": len(ids)}
               for q, ids in zip(rows, new)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    write_text(Path(out), json.dumps({
        "answers": answers, "seconds": seconds, "tok_per_s": sum(a["tokens"] for a in answers) / seconds,
        "peak_allocated_mb": peak, "sampling": f"one batch of {len(rows)}, up to {max_new_tokens} new tokens, "
                                              f"temperature {settings['temperature']}, top_p {settings['top_p']}, "
                                              f"seed {settings['seed']}, on {device}"}, indent=2) + "\n")


def main(argv: list[str]) -> None:
    if argv[:1] == ["env"]:
        return env_info()
    if argv[:1] == ["sample"]:
        p = argparse.ArgumentParser(prog="gpu_reference.py sample")
        p.add_argument("checkpoint"), p.add_argument("questions"), p.add_argument("out")
        p.add_argument("--n", type=int, default=80), p.add_argument("--max_new_tokens", type=int, default=256)
        a = p.parse_args(argv[1:])
        return sample(a.checkpoint, a.questions, a.out, a.n, a.max_new_tokens)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    p.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"),
                   help="the shared data folder, or a carried copy of its files (pack_gpu_run.py)")
    p.add_argument("--work", default="",
                   help="token shards and checkpoints (default checkpoints/gpu-reference, -smoke for --smoke)")
    p.add_argument("--report", default="", help="report.md, report.json, loss.png, run.log (default WORK/report)")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds for the whole run (0: none); training stages shrink their --max_time to fit and "
                        "a stage with too little time left is skipped, so a time-limited call still ends with "
                        "its report (e.g. 540 inside a 600 s device call)")
    a = p.parse_args(argv)
    # SIGTERM (an outer time limit, a kill) ends this run as Ctrl-C does, through run()'s cleanup: the running
    # stage, in a session of its own, is stopped too instead of training on orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    profile = SMOKE if a.smoke else GPU
    work = Path(a.work or ROOT / "checkpoints" / ("gpu-reference-smoke" if a.smoke else "gpu-reference")).resolve()
    report_dir = Path(a.report or work / "report").resolve()
    for d in (work, report_dir):
        d.mkdir(parents=True, exist_ok=True)
    (report_dir / "run.log").unlink(missing_ok=True)
    paths = inputs(Path(a.data_root), profile, work)
    ref = Reference(profile, Path(a.data_root), work, report_dir, a.deadline)
    ok = ref.run_all(paths)
    ref.report["finished"] = True
    ref.write()
    print(f"\n{'done' if ok else 'FAILED (see the report)'} in {ref.report['wall_seconds']:.0f} s: "
          f"{report_dir / 'report.md'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
