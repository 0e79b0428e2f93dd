"""Benchmarks; figures go into BENCHMARKS.md with the machine and the command.

  python bench.py tokenizer   tokenize_data.py against tiktoken's encode_ordinary_batch
  python bench.py train       training throughput against transformers' GPT2LMHeadModel
  python bench.py serve       time to first token, decode speed and concurrency of serve.py;
                              with --turns, its conversation reuse
  python bench.py speedrun    time to loss on Gutenberg: the vanilla GPT-2 recipe against parley's
"""

import contextlib
import inspect
import sys

from config import cpu_name, usable_cores


def medians_in_turn(*fns, repeat: int = 5) -> list[float]:
    """The median of each fn's result, the fns run in turn in every round: a change in the machine's speed (another
    job, a frequency change) meets them alike instead of favouring the one run later."""
    import statistics

    results = [[] for _ in fns]
    for _ in range(repeat):
        for fn, r in zip(fns, results):
            r.append(fn())
    return [statistics.median(r) for r in results]


def median_times(*fns, repeat: int = 5) -> list[float]:
    """The median time of each fn, the fns timed in turn (medians_in_turn)."""
    import time

    def timed(fn):
        def run():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run
    return medians_in_turn(*map(timed, fns), repeat=repeat)


def decode_rate(run, n_new: int) -> float:
    """Tokens/s after the first of one `run()`, which generates n_new tokens and returns the time.monotonic() when
    its first was out. The decode is timed from that run's own first token: a first-token time and a whole-run
    time taken from different runs can come in either order on a busy machine, and their difference go negative."""
    import time

    first = run()
    return (n_new - 1) / (time.monotonic() - first)


def _at_least(low: int):
    """An argparse type: an integer no less than `low`."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _gzipped(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"  # gzip's magic number


def bench_tokenizer(argv):
    """tokenize_data.py end to end against tiktoken's encode_ordinary_batch on the same text and thread count.

    usage: python bench.py tokenizer [FILE.jsonl.gz ...] [--rounds N]
    Default input: train_00 and train_01 of the shared Gutenberg corpus (45M tokens), and as the small input
    every 10th book of them (a tenth of the size). The two alternate for N rounds (default 2) and the best
    round of each counts, which filters out the other jobs of a shared machine. Our time is the whole
    `python tokenize_data.py` run:
    starting Python, reading and decompressing, writing shards; tiktoken's covers only encoding text already in
    memory. CPU seconds are reported too: on a shared machine they do not depend on the load. Peak memory is
    the tokenize_data.py process's max RSS, with the default shard size and with 1M-token shards (which takes
    the shard buffer out of the picture).
    """
    import argparse
    import gzip
    import json
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import tokenizer

    root = Path(__file__).resolve().parent
    gutenberg = root.parent / "shared" / "data" / "pretrain" / "gutenberg_top100_authors"
    parser = argparse.ArgumentParser(prog="bench.py tokenizer")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE.jsonl.gz")
    parser.add_argument("--rounds", type=_at_least(1), default=2, metavar="N")
    args = parser.parse_intermixed_args(argv)
    files = args.files or [gutenberg / "train_00.jsonl.gz", gutenberg / "train_01.jsonl.gz"]
    if missing := [str(f) for f in files if not f.is_file()]:
        sys.exit(f"error: no such input file: {', '.join(missing)}")
    if plain := [str(f) for f in files if not _gzipped(f)]:
        sys.exit(f"error: not gzip-compressed: {', '.join(plain)} (bench.py tokenizer reads gzipped JSON lines, "
                 f".jsonl.gz: gzip a .jsonl first)")
    workers = usable_cores()
    print(f"machine: {cpu_name()}, {workers} cores usable; load average before: {os.getloadavg()}")
    # A forked child's max RSS starts at its parent's (Linux keeps it across exec), and this process holds a
    # lot of text: a small Python wrapper runs tokenize_data.py and reports its wall time, RSS and CPU time.
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
               "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(time.perf_counter() - t, u.ru_maxrss / 1024, u.ru_utime + u.ru_stime); sys.exit(r)")

    def ours(inputs, out, shard_args):
        cmd = [sys.executable, str(root / "tokenize_data.py"), *map(str, inputs), "--out", str(out),
               "--workers", str(workers), *shard_args]
        run = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
        wall, rss, cpu_s = map(float, run.stdout.split())
        meta = json.loads((out / "meta.json").read_text())
        docs = sum(s["documents"] for s in meta["splits"].values())
        tokens = sum(s["tokens"] for s in meta["splits"].values()) - docs  # without the EOT separators
        return tokens, wall, cpu_s, rss

    def theirs(inputs):
        enc, tokens, wall, cpu_s = tokenizer.get_encoding(), 0, 0.0, 0.0
        for path in inputs:  # one file of text in memory at a time; results are counted and dropped
            with gzip.open(path, "rt", encoding="utf-8") as f:
                docs = [json.loads(line)["text"] for line in f]
            for i in range(0, len(docs), 32):
                start, start_cpu = time.perf_counter(), time.process_time()
                ids = enc.encode_ordinary_batch(docs[i:i + 32], num_threads=workers)
                wall += time.perf_counter() - start
                cpu_s += time.process_time() - start_cpu
                tokens += sum(map(len, ids))
        return tokens, wall, cpu_s

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.jsonl.gz"
        with gzip.open(small, "wb") as out:
            for path in files:
                with gzip.open(path, "rb") as f:
                    out.writelines(line for i, line in enumerate(f) if i % 10 == 0)
        for name, inputs in (("small", [small]), ("large", files)):
            rss_small_shards = ours(inputs, Path(tmp) / "out", ["--shard_tokens", "1000000"])[3]
            best_ref, best = (0, float("inf"), float("inf")), (0, float("inf"), float("inf"), 0)
            for r in range(args.rounds):
                n_ref, wall_ref, cpu_ref = theirs(inputs)
                n, wall, cpu_s, rss = ours(inputs, Path(tmp) / "out", [])
                assert n == n_ref, f"token counts differ: ours {n}, tiktoken {n_ref}"
                print(f"{name} round {r + 1}: {n:,} tokens; tiktoken {n_ref / wall_ref / 1e6:.2f}M tok/s "
                      f"({n_ref / cpu_ref / 1e6:.2f}M per CPU s); tokenize_data {n / wall / 1e6:.2f}M tok/s "
                      f"({n / cpu_s / 1e6:.2f}M per CPU s), peak RSS {rss:.0f} MB (1M-token shards: "
                      f"{rss_small_shards:.0f} MB); load {os.getloadavg()[0]:.1f}")
                best_ref = min(best_ref, (n_ref, wall_ref, cpu_ref), key=lambda x: x[1])
                best = min(best, (n, wall, cpu_s, rss), key=lambda x: x[1])
            (n_ref, wall_ref, _), (n, wall, _, rss) = best_ref, best
            rows.append((name, n, n_ref / wall_ref, n / wall, rss, rss_small_shards))
    print(f"load average after: {os.getloadavg()}\n")
    print("| input | tokens | tiktoken encode_ordinary_batch | tokenize_data.py, end to end | ratio | "
          "peak RSS | peak RSS, 1M-token shards |")
    print("|---|---|---|---|---|---|---|")
    for name, n, ref, rate, rss, rss_small_shards in rows:
        print(f"| {name} | {n / 1e6:.1f}M | {ref / 1e6:.2f}M tok/s | {rate / 1e6:.2f}M tok/s | {rate / ref:.2f} | "
              f"{rss:.0f} MB | {rss_small_shards:.0f} MB |")


def _check_device(parser, name: str) -> None:
    """Exit with a usage error unless `name` is a torch device this machine has."""
    from config import ConfigError
    from model import pick_device

    try:
        pick_device(name)
    except ConfigError as e:
        parser.error(f"--device {name}: {e}")


def _train_args(argv):
    import argparse

    from config import PRESETS

    parser = argparse.ArgumentParser(prog="bench.py train")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=_at_least(0), default=0,
                        help="torch threads on the CPU (0 = torch's default)")
    parser.add_argument("--batch_size", type=_at_least(0), default=0, help="sequences per step (0 = the preset's)")
    parser.add_argument("--rounds", type=_at_least(1), default=5)
    parser.add_argument("--steps", type=_at_least(1), default=3, help="timed steps per model per round")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype for all rows (auto: train.py's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours on the CPU too")
    parser.add_argument("--data_vocab", default="", help="also time the loss over the ids of these shards")
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    return args


def _train_step(model, loss_fn, optimizer, device_type: str, dtype):
    """One optimizer step as train.py takes it: loss_fn() under autocast, backward through train.py's gradient scaler
    (a no-op but for float16, so that a float16 row times the step training takes), clipping, the step."""
    import torch

    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(argv):
    """Training throughput: our GPT with train.py's settings against transformers' GPT2LMHeadModel.

    usage: python bench.py train [--preset tiny] [--device cpu|cuda] [--threads N] [--batch_size N] [--rounds R]
                                 [--dtype auto|float32|bfloat16|float16] [--compile] [--data_vocab SHARD_DIR]
    One optimizer step = forward + backward + gradient clipping + AdamW step on one batch of batch_size x block_size
    random tokens, the same shape and batch for both. Ours: train.py's optimizer (fused AdamW), precision (bf16
    autocast on CUDA; float16 with its gradient scaler) and torch.compile (CUDA); theirs: GPT2LMHeadModel with
    dropout 0 (like ours), its default attention (SDPA), torch.optim.AdamW with defaults, the same autocast and
    scaler. A third row is ours with the output layer
    and loss as plain F.cross_entropy (no compile): what model.LinearCrossEntropy (the CPU path) is worth. With
    --data_vocab, a fourth row is ours with the loss over the token ids of those shards (pretrain.py --data_vocab),
    on random tokens drawn from those ids. The
    models alternate in rounds, so all see the same machine load; the figure is the median step time.
    """
    import os

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from config import PRESETS, ModelConfig, TrainConfig, apply_overrides
    from model import GPT, enable_tf32
    from optim import make_optimizer
    from tokenizer import EOT_ID
    from train import autocast_dtype

    args = _train_args(argv)
    mcfg, tcfg = ModelConfig(), TrainConfig(device=args.device, dtype=args.dtype)
    apply_overrides([mcfg, tcfg], PRESETS[args.preset], f"preset {args.preset}")
    tcfg.optimizer = "adamw"  # the step transformers' side takes too (a preset may train with Muon)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = autocast_dtype(tcfg, device)
    B, T = args.batch_size or tcfg.batch_size, mcfg.block_size
    if device.type == "cuda":
        enable_tf32()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"preset {args.preset}: {mcfg.n_layer} layers, {mcfg.n_embd} wide, context {T}, batch {B}x{T}; {where}; "
          f"{str(dtype).split('.')[-1]}; torch {torch.__version__}; load average before: {os.getloadavg()}")

    torch.manual_seed(0)
    ours = GPT(mcfg).to(device)
    hf_cfg = GPT2Config(n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd, n_positions=T,
                        vocab_size=mcfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel(hf_cfg).to(device)
    x = torch.randint(0, EOT_ID + 1, (B, T + 1), device=device)  # GPT-2's own ids, which transformers' model has
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def make_step(model, loss_fn, optimizer):
        return _train_step(model, loss_fn, optimizer, device.type, dtype)

    compiled = torch.compile(ours) if (device.type == "cuda" and tcfg.compile) or args.compile else ours
    plain = GPT(mcfg).to(device)  # ours with the plain loss: what model.LinearCrossEntropy is worth

    def plain_loss():
        logits = plain.lm_head(plain.hidden_states(x))
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    steps = {
        "ours (model.py + train.py)": make_step(ours, lambda: compiled(x, y), make_optimizer(ours, tcfg, device)),
        "ours, plain F.cross_entropy": make_step(plain, plain_loss, make_optimizer(plain, tcfg, device)),
        # labels=x: transformers shifts the labels itself, so it gets the same (B, T) input as ours
        "transformers GPT2LMHeadModel": make_step(theirs, lambda: theirs(input_ids=x, labels=x).loss,
                                                  torch.optim.AdamW(theirs.parameters(), lr=tcfg.lr)),
    }
    if args.data_vocab:
        from shard_data import data_vocab_ids
        ids = torch.from_numpy(data_vocab_ids(args.data_vocab)).to(device)
        restricted = GPT(mcfg).to(device)
        restricted.restrict_output(ids)
        xr = ids[torch.randint(len(ids), (B, T + 1), device=device)]
        steps[f"ours, --data_vocab ({len(ids)} ids)"] = make_step(
            restricted, lambda: restricted(xr[:, :-1], xr[:, 1:]), make_optimizer(restricted, tcfg, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up: allocator, kernels, compilation
        for _ in range(3 if device.type == "cuda" else 1):
            step()

    def timed(step):
        def run():
            sync()
            for _ in range(args.steps):
                step()
            sync()
        return run

    medians = median_times(*map(timed, steps.values()), repeat=args.rounds)
    rate = {name: B * T * args.steps / t for name, t in zip(steps, medians)}
    for name, t in zip(steps, medians):
        print(f"  {name:32s} {rate[name]:>10,.0f} tokens/s  (median step {t / args.steps * 1000:,.0f} ms, "
              f"{args.rounds} rounds of {args.steps})")
    ours_rate, plain_rate, hf_rate = list(rate.values())[:3]
    print(f"  ratio ours / transformers: {ours_rate / hf_rate:.2f}x (with the plain loss: {plain_rate / hf_rate:.2f}x); "
          f"load average after: {os.getloadavg()}")


def _random_model(config):
    """A seeded random-init GPT whose special-token embeddings are zeroed, so that no special token is its greedy
    choice: its replies never end early, and every request generates the tokens asked for."""
    import torch

    from model import GPT
    from tokenizer import EOT_ID, N_VOCAB

    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        model.wte.weight[EOT_ID:N_VOCAB] = 0
    return model


def _transformers_twin(model, out_dir):
    """(reference, hf): `model` and its transformers GPT2LMHeadModel (same weights). A model GPT-2 cannot express
    (rope, smear) gets a random GPT-2-shaped stand-in of the same size (learned positions) as the reference: the
    speed comparison needs one model in both implementations."""
    import dataclasses

    from transformers import GPT2LMHeadModel

    from checkpoint import CheckpointError, export_hf

    try:
        return model, GPT2LMHeadModel.from_pretrained(export_hf(model, out_dir)).eval()
    except CheckpointError as e:
        print(f"transformers: {e}; comparing with a random GPT-2-shaped model of the same size instead")
    reference = _random_model(dataclasses.replace(model.config, rope=False, smear=False))
    return reference.eval(), GPT2LMHeadModel.from_pretrained(export_hf(reference, out_dir)).eval()


@contextlib.contextmanager
def _server(ckpt, threads: int, *args: str):
    """serve.py on `ckpt` in its own process with the extra command-line `args`; yields its URL once it is ready."""
    import os
    import socket
    import subprocess
    import time
    from pathlib import Path

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve_py = Path(__file__).resolve().parent / "serve.py"
    server = subprocess.Popen([sys.executable, str(serve_py), "--checkpoint", str(ckpt), "--port", str(port), *args],
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"serve.py exited with status {server.returncode} before it was ready")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


LOAD_ROUNDS = 6  # requests per client at each level of concurrency, at least
LOAD_REQUESTS = 48  # requests at each level, at least: one client's figure, the ratios' denominator, is no shorter


def load_rounds(n_clients: int) -> int:
    """Requests per client at a level of concurrency."""
    return max(LOAD_ROUNDS, -(-LOAD_REQUESTS // n_clients))


def _server_figures(ckpt, threads: int, n_new: int, clients: list[int], reference):
    """serve.py on `ckpt` in its own process: (time to first token, streaming tokens/s) of one client, the
    reference's tokens/s measured in turn with each stream (`reference()`, while the server idles, so that a
    change in the machine's speed meets both sides alike), and {clients: aggregate tokens/s} for each number of
    concurrent clients."""
    import asyncio
    import statistics
    import time

    import httpx

    with _server(ckpt, threads, "--max-batch", "64", "--max-queue", "256", "--max-tokens-cap", str(n_new)) as url:
        def one_stream():
            body = {"messages": [{"role": "user", "content": "Tell me a short story about a dog who learns to fly."}],
                    "temperature": 0, "max_tokens": n_new, "stream": True, "ignore_eos": True}
            start, stamps = time.perf_counter(), []
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if '"content": "' in line and '"role"' not in line:
                        stamps.append(time.perf_counter())
            return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])

        one_stream()
        runs, reference_rates = [], []
        for _ in range(5):
            reference_rates.append(reference())
            runs.append(one_stream())
        single = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

        async def load(n_clients, rounds, n_tokens):
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n_clients)) as c:
                async def client(i):
                    tokens = 0
                    for j in range(rounds):
                        body = {"messages": [{"role": "user", "content": f"Tell me about topic {i}-{j}."}],
                                "temperature": 0, "max_tokens": n_tokens, "ignore_eos": True}
                        tokens += (await c.post("/v1/chat/completions", json=body)).json()["usage"]["completion_tokens"]
                    return tokens
                start = time.perf_counter()
                total = sum(await asyncio.gather(*(client(i) for i in range(n_clients))))
                return total, time.perf_counter() - start

        # Every level in turn, three times over, each client sending load_rounds requests: a level's figure is
        # the median of three runs of several seconds, not one run that starts and ends with fewer rows busy; one
        # client sends as many requests as 8 clients do, or its figure swings with a second's noise.
        rates = {n: [] for n in clients}
        for _ in range(3):
            for n_clients in clients:
                total, wall = asyncio.run(load(n_clients, load_rounds(n_clients), min(64, n_new)))
                rates[n_clients].append(total / wall)
                print(f"  {n_clients:>2} clients: {total} tokens in {wall:.2f} s = {total / wall:.0f} tokens/s")
    return single, statistics.median(reference_rates), {n: statistics.median(r) for n, r in rates.items()}


REPLY_TOKENS = 12  # per /chat reply: 8 turns grow a conversation to about 200 prompt tokens


def _conversation_ttft(url: str, turns: int, conversations: int) -> dict:
    """Time to first token of turn 1 and of turn `turns` of /chat conversations (greedy, REPLY_TOKENS-token
    replies): medians over `conversations`, after one warm-up conversation, with turn `turns`' usage.
    /chat does not stream, so a timed turn asks for one token: its time is prefill + one token + HTTP. Turn 1 is
    timed in a session of its own, so that the conversation itself keeps full-length replies."""
    import statistics
    import time

    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        def turn(session_id, message, max_tokens):
            body = {"message": message, "session_id": session_id, "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            r = client.post("/chat", json=body)
            r.raise_for_status()
            return time.perf_counter() - start, r.json()

        first, last = [], []
        for c in range(conversations + 1):
            # each conversation's messages are its own: it can reuse only its own turns (and the chat template)
            message = [f"Conversation {c}, turn {t}: one more thing?" for t in range(1, turns + 1)]
            first.append(turn(None, message[0], 1))
            session_id = None
            for text in message[:-1]:
                session_id = turn(session_id, text, REPLY_TOKENS)[1]["session_id"]
            last.append(turn(session_id, message[-1], 1))
    first, last = first[1:], last[1:]
    return {"first": statistics.median(t for t, _ in first), "last": statistics.median(t for t, _ in last),
            "first_cached": statistics.median(r["usage"]["prompt_tokens_details"]["cached_tokens"] for _, r in first),
            "prompt": statistics.median(r["usage"]["prompt_tokens"] for _, r in last),
            "cached": statistics.median(r["usage"]["prompt_tokens_details"]["cached_tokens"] for _, r in last)}


def _reuse_figures(ckpt, threads: int, turns: int, conversations: int) -> dict:
    """_conversation_ttft on serve.py with the prefix cache at its default size, then with it off."""
    settings = {"reuse on (default --prefix_cache_tokens)": (),
                "reuse off (--prefix_cache_tokens 0)": ("--prefix_cache_tokens", "0")}
    figures = {}
    for name, args in settings.items():
        with _server(ckpt, threads, *args) as url:
            figures[name] = _conversation_ttft(url, turns, conversations)
    return figures


def _print_reuse_table(figures: dict, turns: int) -> None:
    print(f"\n| /chat conversation, {REPLY_TOKENS}-token replies | turn 1 time to first token | turn {turns} | "
          f"turn {turns} / turn 1 | turn {turns} prompt tokens | cached (turn 1, turn {turns}) |")
    print("|---|---|---|---|---|---|")
    for name, f in figures.items():
        print(f"| {name} | {f['first'] * 1e3:.1f} ms | {f['last'] * 1e3:.1f} ms | {f['last'] / f['first']:.2f}x | "
              f"{f['prompt']:.0f} | {f['first_cached']:.0f}, {f['cached']:.0f} |")


def _serve_args(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="bench.py serve")
    parser.add_argument("--checkpoint", default="checkpoints/demo-chat", metavar="DIR")
    parser.add_argument("--threads", type=_at_least(1), default=0, metavar="N", help="default: torch's")
    parser.add_argument("--tokens", type=_at_least(2), default=128, metavar="N",
                        help="new tokens per request; decode speed is timed after the first")
    parser.add_argument("--clients", type=_client_counts, default=[1, 4, 16, 64], metavar="N,N,...")
    parser.add_argument("--turns", type=_at_least(0), default=0, metavar="N")
    parser.add_argument("--conversations", type=_at_least(1), default=5, metavar="N")
    return parser.parse_args(argv)


def _client_counts(text: str) -> list[int]:
    return [_at_least(1)(n) for n in text.split(",")]


def _our_first_token(model, prompt: list[int], n_new: int) -> float:
    """Greedy generation of n_new tokens after `prompt` with engine.py's decode loop, as GPT.generate runs it; the
    time.monotonic() when the first token was out."""
    import time

    from engine import Engine, SamplingParams, Sequence

    engine, first = Engine(model, max_batch=1), None
    seq = Sequence(prompt, SamplingParams(n_new, temperature=0, stop_tokens=frozenset()))  # GPT.generate's default
    engine.submit([seq])
    while engine.busy():
        engine.step()
        if first is None and seq.tokens:
            first = time.monotonic()
    return first


def bench_serve(argv):
    """serve.py: time to first token and single-stream decode speed against transformers' `generate` (KV cache,
    same weights, greedy), then aggregate tokens/s of a running server at 1, 4, 16 and 64 concurrent clients.
    The two sides are timed in turn, round after round (each HTTP stream after a transformers run), so that a
    change in the machine's speed meets both alike; the ratios compare figures measured side by side.

    usage: python bench.py serve [--checkpoint DIR] [--threads N] [--tokens N] [--clients 1,4,16,64]
                                 [--turns N [--conversations N]]
    Default model: checkpoints/demo-chat (from `make demo`) if it exists, else a random-init model of the tiny
    preset's size (n_layer=4, n_head=4, n_embd=128, block_size=256, learned positions), whose special-token
    embeddings are zeroed so that its /chat replies do not end at once. Every request generates exactly the tokens
    asked for, in both implementations (this is a speed test): the server's requests send `ignore_eos`, as vLLM's
    benchmark does, so that a chat model's replies do not end at its first <|end|>. A model GPT-2 cannot express
    (the demo's: rope and smear) cannot be exported to transformers: the in-process comparison then runs on a
    random GPT-2-shaped model of its size, and serve.py on the model itself. The server runs as its own process
    (--max-batch 64); the clients (httpx, asyncio) run in this process, on the same cores. --threads sets torch's
    threads here and in the server.
    --turns N adds conversation reuse: the time to first token of turn 1 and turn N of /chat conversations, on a
    server with the prefix cache and on one without (medians of --conversations, default 5).
    """
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from chat_format import render
    from checkpoint import load_checkpoint, save_checkpoint
    from config import ModelConfig, PRESETS
    from tokenizer import EOT_ID

    opts = _serve_args(argv)
    threads, n_new, clients = opts.threads or torch.get_num_threads(), opts.tokens, opts.clients
    torch.set_num_threads(threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch threads {threads}; "
          f"load average before: {os.getloadavg()}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if Path(opts.checkpoint).exists():
        model = load_checkpoint(opts.checkpoint)[0]
        print(f"model: {opts.checkpoint}")
    else:
        tiny = {k: PRESETS["tiny"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
        model = _random_model(ModelConfig(**tiny))
        print(f"model: random init, tiny preset {tiny} (no chat checkpoint at {opts.checkpoint})")
    model.eval()
    try:
        ckpt = save_checkpoint(tmp / "ckpt", model)
        reference, hf = _transformers_twin(model, tmp / "hf")
        prompt = render([{"role": "user", "content": "Tell me a short story about a dog who learns to fly."}],
                        add_generation_prompt=True)[0]

        ids = torch.tensor([prompt])
        with torch.no_grad():
            def hf_generate(n, streamer=None):
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=True, pad_token_id=EOT_ID, streamer=streamer)

            def our_generate(n):
                return reference.generate([prompt], n, temperature=0)[0]

            def hf_first_token():  # transformers hands its streamer the prompt, then each new token
                stamps = []
                hf_generate(n_new, SimpleNamespace(put=lambda _: stamps.append(time.monotonic()), end=lambda: None))
                return stamps[1]

            def our_first_token():
                return _our_first_token(reference, prompt, n_new)

            hf_generate(4), our_generate(4)  # warm-up
            same = hf_generate(n_new)[0, len(prompt):].tolist() == our_generate(n_new)
            hf_ttft, our_ttft = median_times(lambda: hf_generate(1), lambda: our_generate(1))
            hf_rate, our_rate = medians_in_turn(lambda: decode_rate(hf_first_token, n_new),
                                                lambda: decode_rate(our_first_token, n_new))

            print(f"greedy tokens identical to transformers: {same}")
            (srv_ttft, srv_rate), hf_rate_http, concurrency = _server_figures(
                ckpt, threads, n_new, clients, lambda: decode_rate(hf_first_token, n_new))
        turns = opts.turns
        reuse = _reuse_figures(ckpt, threads, turns, opts.conversations) if turns else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nload average after: {os.getloadavg()}\n")
    print(f"| {n_new} new tokens, prompt of {len(prompt)} | time to first token | decode tokens/s |")
    print("|---|---|---|")
    print(f"| transformers GPT2LMHeadModel.generate (KV cache) | {hf_ttft * 1e3:.1f} ms | {hf_rate:.0f} |")
    print(f"| ours, GPT.generate in process | {our_ttft * 1e3:.1f} ms | {our_rate:.0f} ({our_rate / hf_rate:.2f}x) |")
    print(f"| ours, serve.py over HTTP, streaming | {srv_ttft * 1e3:.1f} ms | {srv_rate:.0f} "
          f"({srv_rate / hf_rate_http:.2f}x transformers' {hf_rate_http:.0f} measured in turn with it) |")
    print(f"\n| concurrent clients | aggregate tokens/s | vs {clients[0]} | vs one HTTP stream |\n|---|---|---|---|")
    for n_clients, rate in concurrency.items():
        print(f"| {n_clients} | {rate:.0f} | {rate / concurrency[clients[0]]:.1f}x | {rate / srv_rate:.1f}x |")
    if reuse:
        _print_reuse_table(reuse, turns)


# bench.py speedrun, per device: the model shape and micro-batch both runs share (so they evaluate the same
# validation windows), each recipe's pretrain.py flags, the tokens between evaluations (an equal spacing in time
# when both recipes process tokens at about the same rate) and the size of the Gutenberg slice to tokenize. On the
# CPU the shape is the tiny preset's, the one model this machine trains, so what the benchmark finds can set its
# defaults. vanilla's lr is the best of a sweep (BENCHMARKS.md); parley's lr is AdamW's, which with Muon trains
# only the embeddings, gains and biases. The cuda settings are a starting point, not yet measured.
SPEEDRUN = {
    "cpu": {"shape": "--n_layer 4 --n_head 4 --n_embd 128 --block_size 256 --batch_size 8 --eval_batches 8",
            "vanilla": "--rope false --smear false --optimizer adamw --schedule cosine --lr 3e-3 --warmup_steps 20",
            "parley": "--rope true --smear true --optimizer muon --schedule wsd --lr 1.2e-2 --muon_lr 0.01 "
                      "--warmup_steps 20 --data_vocab true",
            "eval_tokens": 50_000, "corpus_tokens": 6_000_000},
    "cuda": {"shape": "--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 32 --eval_batches 16 "
                      "--batch_tokens 262144 --device cuda",
             "vanilla": "--rope false --smear false --optimizer adamw --schedule cosine --lr 6e-4 --warmup_steps 50",
             "parley": "--rope true --smear true --optimizer muon --schedule wsd --lr 1.8e-3 --muon_lr 0.02 "
                       "--warmup_steps 50",
             "eval_tokens": 8_000_000, "corpus_tokens": 90_000_000},
}


def time_to_loss(curve: list[tuple[float, float]], target: float) -> float | None:
    """The time a validation-loss curve [(seconds, loss), ...] first reaches `target`, interpolated linearly
    between the two evaluations around it; None if it never does."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def _speedrun_data(corpus, out, tokens: int, workers: int):
    """`out`: token shards, as they are if the folder exists (tokenize_data.py writes it whole or not at all), else
    the first books of the Gutenberg corpus up to `tokens` tokens, 5% of the books held out for validation."""
    import gzip
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    if out.is_dir():
        return out
    files = sorted(Path(corpus).glob("train_*.jsonl.gz"))
    if not files:
        sys.exit(f"speedrun: no Gutenberg corpus (train_*.jsonl.gz) in {corpus}: give its folder with --corpus, "
                 f"or token shards with --data")
    with tempfile.TemporaryDirectory() as tmp:
        books, n = Path(tmp) / "books.jsonl.gz", 0
        with gzip.open(books, "wt", encoding="utf-8") as f:
            for path in files:
                with gzip.open(path, "rt", encoding="utf-8") as source:
                    for line in source:
                        f.write(line)
                        n += json.loads(line)["n_tokens"]
                        if n >= tokens:
                            break
                if n >= tokens:
                    break
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "tokenize_data.py"), str(books), "--out",
               str(out), "--val_fraction", "0.05", *(["--workers", str(workers)] if workers else [])]
        subprocess.run(cmd, check=True)
    return out


def _speedrun_flags(setup: dict, data, extra: dict, minutes: float, eval_tokens: int) -> dict:
    """{recipe: its pretrain.py flags}: the shared shape, the recipe's own, extra[recipe] (flags given on the
    command line), the time limit and an eval every eval_tokens tokens. Exits if the two would evaluate different
    validation windows."""
    from config import ModelConfig, TrainConfig, parse_args
    from train import micro_steps

    runs, windows = {}, set()
    for name in ("vanilla", "parley"):
        flags = [*setup["shape"].split(), *setup[name].split(), "--data", str(data), "--save_every", "0",
                 "--log_every", "10", *extra[name], "--max_time", str(minutes * 60)]
        tcfg, mcfg = TrainConfig(), ModelConfig()
        parse_args(flags, [tcfg, mcfg])
        step_tokens = micro_steps(tcfg, mcfg.block_size, 1) * tcfg.batch_size * mcfg.block_size
        runs[name] = flags + ["--eval_every", str(max(1, round(eval_tokens / step_tokens)))]
        windows.add((tcfg.batch_size, tcfg.eval_batches, tcfg.seed, mcfg.block_size))
    if len(windows) > 1:  # ShardData draws the validation windows from these
        sys.exit("speedrun: the two runs would evaluate different validation windows: keep batch_size, "
                 "eval_batches, seed and block_size the same")
    return runs


def _speedrun_run(name: str, flags: list[str], out, threads: int) -> list[tuple[float, float]]:
    """Train one recipe with pretrain.py in its own process; its validation curve [(seconds of training, loss)]."""
    import json
    import os
    import subprocess
    from pathlib import Path

    cmd = [sys.executable, str(Path(__file__).resolve().parent / "pretrain.py"), *flags, "--out", str(out / name)]
    print(f"== {name}: pretrain.py {' '.join(flags)}", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"speedrun: the {name} run failed (its output is above)")
    records = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    return [(r["elapsed"], r["val_loss"]) for r in records if r["type"] == "eval"]


def _plot_speedrun(curves: dict, target: float, reached: float | None, path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot([t / 60 for t, _ in curve], [loss for _, loss in curve], marker=".", label=name)
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label="vanilla's final loss")
    if reached is not None:
        ax.axvline(reached / 60, color="gray", linestyle=":", linewidth=0.8, label="parley reaches it")
    # from the second evaluation up: the first, of the initial weights, would flatten the rest
    top = max(curve[min(1, len(curve) - 1)][1] for curve in curves.values())
    ax.set(xlabel="minutes of training (evaluations excluded)", ylabel="validation loss",
           ylim=(min(loss for curve in curves.values() for _, loss in curve) - 0.1, top + 0.1))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _speedrun_report(curves: dict, setting: dict, out) -> None:
    """The ratio, the table, and OUT/speedrun.png, .json (`setting`, the curves, the figures) and .csv."""
    import csv
    import json

    total, target = curves["vanilla"][-1]
    reached = time_to_loss(curves["parley"], target)
    ratio = reached / total if reached is not None else None
    _plot_speedrun(curves, target, reached, out / "speedrun.png")
    (out / "speedrun.json").write_text(json.dumps({**setting, "curves": curves, "target": target,
                                                   "vanilla_time": total, "parley_time_to_target": reached,
                                                   "ratio": ratio}, indent=1))
    with open(out / "speedrun.csv", "w", newline="") as f:
        csv.writer(f).writerows([("run", "seconds", "val_loss")] +
                                [(name, t, loss) for name, curve in curves.items() for t, loss in curve])
    print(f"\n| recipe | evaluations | training time | final val loss | time to {target:.4f} |\n|---|---|---|---|---|")
    for name, curve in curves.items():
        when = time_to_loss(curve, target)
        print(f"| {name} | {len(curve)} | {curve[-1][0]:.0f} s | {curve[-1][1]:.4f} | "
              + (f"{when:.0f} s |" if when is not None else "not reached |"))
    print("\nparley reaches vanilla's final loss in "
          + (f"{ratio:.2f}x vanilla's time" if ratio is not None else "- (not within its time)")
          + f"; the curves: {out / 'speedrun.png'}")


def bench_speedrun(argv):
    """Time to loss: the vanilla GPT-2 recipe against parley's on the same model shape, data and validation set.

    usage: python bench.py speedrun [--minutes M] [--threads N] [--device cpu|cuda] [--corpus DIR] [--data DIR]
                                    [--out DIR] [--eval_tokens N] [--vanilla FLAGS] [--parley FLAGS]
                                    [-- PRETRAIN_FLAGS...]
    Each recipe trains with pretrain.py for M minutes (default 8) on the first books of the shared Gutenberg corpus
    (tokenized once into --data, default data/speedrun-DEVICE: 6M tokens for the CPU, 90M for cuda) and is
    evaluated on the same validation windows every --eval_tokens tokens. vanilla: GPT-2's learned positions, AdamW,
    warmup and cosine decay. parley: rotary positions, smear, Muon for the blocks' matrices, warmup-stable-decay
    (fitted to the time, as every --max_time run is), a higher AdamW lr, and on the CPU the softmax over the
    corpus's ids (--data_vocab: the same full-vocabulary loss). Time is training time: evaluations are not
    counted. The figure: the time parley takes to reach vanilla's final validation loss (linear between
    evaluations) over vanilla's time. --device cuda trains GPT-2 small's shape (bf16 autocast, torch.compile).
    --vanilla and --parley add pretrain.py flags to one run ("--lr 1e-3"), PRETRAIN_FLAGS after `--` to both;
    --threads sets OMP_NUM_THREADS for the runs (default: torch's choice). Writes OUT/vanilla and OUT/parley (the
    run folders), OUT/speedrun.png (the curves), OUT/speedrun.json and OUT/speedrun.csv (the points); --out
    defaults to checkpoints/speedrun.
    """
    import argparse
    from pathlib import Path

    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="bench.py speedrun")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--threads", type=_at_least(0), default=0)
    parser.add_argument("--device", default="cpu", choices=list(SPEEDRUN))
    parser.add_argument("--corpus", default=str(Path(__file__).resolve().parent.parent / "shared" / "data" /
                                                "pretrain" / "gutenberg_top100_authors"))
    parser.add_argument("--data", default="")
    parser.add_argument("--out", default="checkpoints/speedrun")
    parser.add_argument("--eval_tokens", type=_at_least(0), default=0)
    parser.add_argument("--vanilla", default="")
    parser.add_argument("--parley", default="")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.minutes > 0:
        parser.error(f"argument --minutes: must be more than 0, got {args.minutes}")
    _check_device(parser, args.device)
    setup, out = SPEEDRUN[args.device], Path(args.out)
    data = _speedrun_data(args.corpus, Path(args.data or f"data/speedrun-{args.device}"), setup["corpus_tokens"],
                          args.threads)
    extra = {name: [*shared, *getattr(args, name).split()] for name in ("vanilla", "parley")}
    runs = _speedrun_flags(setup, data, extra, args.minutes, args.eval_tokens or setup["eval_tokens"])
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: _speedrun_run(name, flags, out, args.threads) for name, flags in runs.items()}
    _speedrun_report(curves, {"device": args.device, "minutes": args.minutes, "threads": args.threads,
                              "flags": runs}, out)


BENCHES = {"tokenizer": bench_tokenizer, "train": bench_train, "serve": bench_serve, "speedrun": bench_speedrun}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(__doc__.strip())
    bench = BENCHES[sys.argv[1]]
    if {"-h", "--help"} & set(sys.argv[2:]):
        sys.exit(inspect.cleandoc(bench.__doc__))
    bench(sys.argv[2:])
