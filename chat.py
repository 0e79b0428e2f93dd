"""Chat in the terminal, with a checkpoint loaded here or with a running serve.py.

  python chat.py --checkpoint checkpoints/chat
  python chat.py --url http://127.0.0.1:8000 [--api-key KEY]     (the key also from $PARLEY_API_KEY)

Replies stream as they are generated. Commands: /reset (forget the conversation), /system TEXT (set the
system message; /system alone clears it), /quit; any other line starting with "/" is refused as an unknown command,
and "//text" sends the message "/text". The oldest turns are dropped when the conversation outgrows the context,
leaving room for a reply: with a checkpoint, --max-tokens (the reply's cap; else 256) or a quarter of the context,
whichever is less; with --url, --max-tokens (which the server reserves in full), else a quarter of the context or
256 tokens, whichever is less, as the server's /tokenize counts them (a server answers a prompt over its context
with an error; a server without /tokenize gets the whole conversation). A message that does not fit the context
even alone (or beside the system message) is refused and the conversation kept. Bad options (a --top-p of 0, a
--device this machine lacks) are errors before the first message, with exit code 2. --url needs only the standard
library (no torch).
"""

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from config import cli, fail


@dataclass
class ChatConfig:
    checkpoint: str = ""  # a checkpoint (or run folder) to load here
    url: str = ""  # or a running serve.py, e.g. http://127.0.0.1:8000
    api_key: str = ""
    system: str = ""
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0  # above 1: tokens already in the conversation less likely (vLLM's); 1 = off
    max_tokens: int = 0  # per reply; 0 = as many as fit the context
    seed: int = -1  # -1 = a different sample every time
    device: str = "auto"
    timeout: float = 300.0  # seconds to wait for a server


COMMANDS = "/reset, /system TEXT, /quit"


class ChatError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):  # status: the server's HTTP status, if any
        super().__init__(message)
        self.status = status


def check_sampling(cfg: ChatConfig) -> str | None:
    """What is wrong with the sampling options, naming the field (None: nothing). Checked here, before the first
    message, and without torch: --url runs on the standard library alone."""
    limits = {"temperature": cfg.temperature >= 0, "top_p": 0 < cfg.top_p <= 1, "top_k": cfg.top_k >= 0,
              "repetition_penalty": 0 < cfg.repetition_penalty <= 10, "max_tokens": cfg.max_tokens >= 0,
              "timeout": cfg.timeout > 0}
    expected = {"temperature": ">= 0", "top_p": "in (0, 1]", "top_k": ">= 0 (0: off)",
                "repetition_penalty": "in (0, 10] (1: off)", "max_tokens": ">= 0 (0: as many as fit)",
                "timeout": "> 0 seconds"}
    bad = [name for name, ok in limits.items() if not ok]
    return f"field '{bad[0]}' expects a value {expected[bad[0]]}, got {getattr(cfg, bad[0])!r}" if bad else None


def local_replier(cfg: ChatConfig):
    """reply(system, messages) streaming text pieces from the model (engine.py), with the chat template; a turn
    reuses the previous turns' keys and values."""
    from chat_format import render
    from checkpoint import load_checkpoint
    from engine import Engine, SamplingParams, fit_conversation, stream
    from model import pick_device

    from tokenizer import get_encoding

    model, _, _ = load_checkpoint(cfg.checkpoint, device=pick_device(cfg.device))
    get_encoding()  # a missing or wrong BPE file is an error now, not at the first message
    block = model.config.block_size
    engine = Engine(model, max_batch=1, reuse_tokens=2 * block)
    turn = 0

    def reply(system: str, messages: list[dict]):
        nonlocal turn
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        # max_tokens only caps the reply: room for a longer one than a quarter would cost the history it needs
        reserve = min(cfg.max_tokens or 256, block // 4)
        prompt, _, dropped = fit_conversation(conversation, reserve, block)
        if len(prompt) >= block:  # the system message and the new message alone: the turn is refused, nothing dropped
            message = len(render(messages[-1:], add_generation_prompt=True)[0])
            if system and message < block:
                raise ChatError(f"the system message is too long: {len(prompt) - message} tokens leave no room for "
                                f"this message ({message} tokens) in the context of {block} (/system TEXT changes it)")
            raise ChatError(f"the message is too long: {message} tokens for a context of {block}")
        if dropped:
            del messages[:dropped]
            print(f"[dropped the {dropped} oldest messages to fit the context of {block} tokens]", flush=True)
        # A seed gives each turn its own reproducible draws.
        seed = cfg.seed + turn if cfg.seed >= 0 else None
        turn += 1
        params = SamplingParams(max_tokens=min(cfg.max_tokens or block, block - len(prompt)),
                                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=seed,
                                repetition_penalty=cfg.repetition_penalty)
        yield from stream(engine, prompt, params)

    return reply


def remote_replier(cfg: ChatConfig):
    """reply(system, messages) streaming text pieces from a server's /v1/chat/completions (server-sent events)."""
    base = cfg.url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"

    def post(path: str, body: dict, accept: str = "application/json"):
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={**headers, "Accept": accept}, method="POST")
        try:
            return urllib.request.urlopen(request, timeout=cfg.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise ChatError(f"{e.code}: {message}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise ChatError(f"cannot reach {cfg.url}: {getattr(e, 'reason', e)}") from None

    def fit(head: list[dict], messages: list[dict]) -> None:
        """Drop the oldest exchanges of `messages` until the prompt leaves room for a reply, counted by the
        server's /tokenize (vLLM's names its limit max_model_len); a server without it gets them all."""
        dropped = 0
        while len(messages) > 1:
            try:
                with post("/tokenize", {"messages": head + messages}) as response:
                    counted = json.load(response)
            except ChatError as e:
                if e.status in (404, 405):
                    return
                raise
            limit = counted.get("max_context") or counted.get("max_model_len")
            if not limit or counted["count"] + (cfg.max_tokens or min(256, limit // 4)) <= limit:
                break
            del messages[:2]  # a user turn and its reply go together
            dropped += 2
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the context of {limit} tokens]", flush=True)

    def reply(system: str, messages: list[dict]):
        head = [{"role": "system", "content": system}] if system else []
        fit(head, messages)
        body = {"messages": head + messages, "stream": True,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "repetition_penalty": cfg.repetition_penalty}
        if cfg.max_tokens:
            body["max_tokens"] = cfg.max_tokens
        if cfg.seed >= 0:
            body["seed"] = cfg.seed
        with post("/v1/chat/completions", body, accept="text/event-stream") as response:
            try:
                for line in response:  # one event per `data:` line; each is a whole JSON object
                    line = line.decode("utf-8").strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        raise ChatError(chunk["error"].get("message", "error"))
                    for choice in chunk["choices"]:
                        yield choice.get("delta", {}).get("content") or ""
            except OSError as e:
                raise ChatError(f"lost {cfg.url}: {e}") from None

    return reply


def main(argv: list[str]) -> None:
    cfg = ChatConfig()
    cli(argv, [cfg], usage=__doc__)
    cfg.api_key = cfg.api_key or os.environ.get("PARLEY_API_KEY", "")
    if bool(cfg.checkpoint) == bool(cfg.url):
        fail("give either --checkpoint DIR or --url http://HOST:PORT (see --help)")
    if problem := check_sampling(cfg):
        fail(problem)
    if cfg.url:
        reply = remote_replier(cfg)
    else:
        from checkpoint import CheckpointError
        from config import ConfigError
        from tokenizer import TokenizerNotFound
        try:
            reply = local_replier(cfg)
        except (CheckpointError, ConfigError, TokenizerNotFound) as e:  # ConfigError: a --device this machine lacks
            fail(str(e))
    system, messages = cfg.system, []
    print(f"parley chat: {COMMANDS}", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            continue
        if line.startswith("//"):  # a message that starts with "/"
            line = line[1:]
        elif line == "/quit":
            break
        elif line == "/reset":
            messages = []
            print("[conversation cleared]", flush=True)
            continue
        elif line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip()
            print(f"[system message {'set' if system else 'cleared'}]", flush=True)
            continue
        elif line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; commands: {COMMANDS}]", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        pieces = []
        try:
            for piece in reply(system, messages):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except ChatError as e:
            print(f"\n[error: {e}]", flush=True)
            messages.pop()  # the turn did not happen
            continue
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces)})


if __name__ == "__main__":
    main(sys.argv[1:])
