"""serve.py: a real uvicorn process on a tiny random checkpoint, plus in-process uvicorn servers around a
scripted model (exact tokens, fixed speed) for UTF-8 streaming, disconnects, floods, deadlines and the page."""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chat_format import END, render  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from config import ModelConfig, ServeConfig  # noqa: E402
from model import GPT  # noqa: E402
from engine import STOP_IDS, TextStream, fit_conversation  # noqa: E402
from serve import Mailbox, create_app  # noqa: E402
from tokenizer import EOT_ID, N_VOCAB, decode, decode_bytes, encode  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model() -> GPT:
    with torch.random.fork_rng():  # seeded without touching the global RNG other tests see
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128))
    with torch.no_grad():
        # At GPT-2's init scale a random model says the same word whatever the prompt; larger weights make
        # the output depend on the prompt, so mixed-up answers would show.
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "wpe")):
                p.mul_(3)
        # Random weights often pick a special token first, which would end every reply at once; zeroing their
        # embeddings (tied to the output layer) gives them logit 0, below the best ordinary token.
        model.wte.weight[EOT_ID:N_VOCAB] = 0
    return model


def greedy_reference(model: GPT, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """Text and token count of an unbatched greedy generation, ending like the server's."""
    (ids,) = model.generate([prompt], max_tokens, temperature=0, stop_tokens=STOP_IDS)
    return decode([t for t in ids if t not in STOP_IDS]), len(ids)


def chat_prompt(text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return render(messages, add_generation_prompt=True)[0]


def wait_ready(url: str, headers=None, proc=None, log=None, timeout: float = 60):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(path, tiny_model())
    return path


@pytest.fixture(scope="session")
def model(ckpt):
    return load_checkpoint(ckpt)[0].eval()


@pytest.fixture(scope="session")
def server_log(ckpt):
    return ckpt.parent / "serve.log"


@pytest.fixture(scope="session")
def server(ckpt, server_log):
    """serve.py in its own process, with an API key and a small max_tokens cap; its log goes to a file."""
    port = free_port()
    with open(server_log, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(ckpt), "--port",
                                 str(port), "--api-key", KEY, "--max-batch", "8", "--max-tokens-cap", "64"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, AUTH, proc, server_log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


# ---- a scripted model in an in-process uvicorn -------------------------------------------------

class ScriptedModel(GPT):
    """Emits `script` over and over (a row restarts it at each prefill), sleeping `delay` s per forward. Its hidden
    state is a one-hot vector that the output layer (rows of 100 at the script's ids) maps to the next token."""

    def __init__(self, script: list[int], delay: float = 0.0):
        self.ids = sorted(set(script))
        with torch.random.fork_rng():  # its other weights are never used: leave the global RNG alone
            super().__init__(ModelConfig(n_layer=1, n_head=1, n_embd=len(self.ids), block_size=128))
        with torch.no_grad():
            self.wte.weight.zero_()
            for j, token in enumerate(self.ids):
                self.wte.weight[token, j] = 100.0
        self.script, self.delay, self.steps = script, delay, {}

    def hidden_states(self, idx, cache=None, pos=None, prev=None):
        time.sleep(self.delay)
        x = torch.zeros(idx.numel(), self.config.n_embd)
        # A step's tokens: one for each of the first cache.n rows (decoding), then the prompts' (prefilling).
        for i, row in enumerate(cache.write_rows.flatten().tolist()):
            self.steps[row] = self.steps.get(row, 0) + 1 if i < cache.n else 0
            x[i, self.ids.index(self.script[self.steps[row] % len(self.script)])] = 1.0
        return x.view(*idx.shape, -1)


UTF8_TEXT = "Hi 😀 你好 🎉!"
UTF8_SCRIPT = encode(UTF8_TEXT)


def scripted_text(n_tokens: int) -> str:
    ts = TextStream([])
    return "".join(ts.push(t) for t in (UTF8_SCRIPT * (n_tokens // len(UTF8_SCRIPT) + 1))[:n_tokens]) + ts.finish()


@contextmanager
def in_process_server(model, **cfg_fields):
    import uvicorn
    cfg = ServeConfig(**{"checkpoint": "scripted", "prefix_cache_tokens": 0, **cfg_fields})
    app = create_app(cfg, model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_ready(url, {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def scripted():
    """2 rows, 2 queue places, 20 ms per step: slow enough to watch, small enough to fill."""
    with in_process_server(ScriptedModel(UTF8_SCRIPT, delay=0.02), max_batch=2, max_queue=2, max_tokens_cap=100,
                           request_timeout=20) as s:
        yield s


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def assert_error_shape(r: httpx.Response, status=None, code=None):
    assert 400 <= r.status_code < 600, r.status_code
    if status is not None:
        assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body


def sse_events(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the basic routes ---------------------------------------------------------------------------

def test_health_ready_models_tokenize_metrics(client, server, model):
    assert httpx.get(server + "/health").json() == {"status": "ok"}  # no key needed
    assert client.get("/ready").json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["context_length"] == 128
    assert client.get("/v1/models/tiny").json() == models["data"][0]  # the OpenAI SDK's models.retrieve
    assert_error_shape(client.get("/v1/models/gpt-4"), 404, "model_not_found")
    assert 'route="/v1/models/{model_id:path}",status="404"' in client.get("/metrics").text
    assert client.post("/tokenize", json={"text": "Hello world"}).json()["tokens"] == encode("Hello world")
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    r = client.post("/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == render(msgs, add_generation_prompt=True)[0] and r["count"] == len(r["tokens"])
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ("parley_requests_total", "parley_prompt_tokens_total", "parley_completion_tokens_total",
                 "parley_time_to_first_token_seconds_count", "parley_time_per_output_token_seconds_count",
                 "parley_queue_depth", "parley_errors_total"):
        assert name in text, name
    assert metric(text, "parley_completion_tokens_total") >= 3
    assert metric(text, "parley_time_to_first_token_seconds_count") >= 2  # the warm-up and our request


def test_metrics_parse_as_prometheus_text_with_exact_counts():
    """A fresh app counts only its own requests: every app has its own registry (earlier apps live in this process)."""
    from prometheus_client import CONTENT_TYPE_LATEST
    from prometheus_client.parser import text_string_to_metric_families

    with in_process_server(ScriptedModel(UTF8_SCRIPT)) as (url, _):
        for _ in range(2):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                               "max_tokens": 5})
            assert r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(url + "/v1/models").status_code == 200
        assert httpx.get(url + "/no-such-route").status_code == 404
        r = httpx.get(url + "/metrics")
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def requests(route, status):
        return samples[("parley_requests_total", (("route", route), ("status", status)))]

    assert requests("/v1/chat/completions", "200") == 2 and requests("/v1/models", "200") == 1
    assert requests("other", "404") == 1 and samples[("parley_errors_total", (("status", "404"),))] == 1
    assert ("parley_requests_total", (("route", "/metrics"), ("status", "200"))) not in samples  # counted once sent
    ttft = "parley_time_to_first_token_seconds"
    assert samples[(ttft + "_count", ())] == 3  # the warm-up's generation and our two
    assert samples[(ttft + "_bucket", (("le", "+Inf"),))] == 3 and samples[(ttft + "_sum", ())] > 0
    assert samples[("parley_time_per_output_token_seconds_count", ())] == 3
    assert samples[("parley_completion_tokens_total", ())] == 2 + 2 * 5  # the warm-up asks for 2 tokens
    assert samples[("parley_batch_slots", ())] == ServeConfig().max_batch
    assert samples[("parley_active_sequences", ())] == 0 and samples[("parley_queue_depth", ())] == 0


def test_prompts_are_not_logged_and_other_origins_are_refused(client, server, server_log):
    secret = "my secret prompt 4711"
    body = {"messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # a page of another origin cannot drive the model or write into a /chat conversation, even without reading
    # the reply (a simple POST needs no CORS preflight): the Origin header tells its requests apart
    for path, payload in (("/v1/chat/completions", body), ("/chat", {"message": "I am Mallory", "session_id": "a"})):
        r = client.post(path, content=json.dumps(payload), headers={"Origin": "http://evil.example",
                                                                     "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert client.post("/chat", json={"message": "hi", "session_id": "a", "max_tokens": 2}).json()["new_session"]
    r = client.post("/v1/chat/completions", json=body, headers={"Origin": "null"})  # a sandboxed page
    assert r.status_code == 403
    # the server's own page (its origin is the Host it was loaded from) is served
    r = client.post("/v1/chat/completions", json=body, headers={"Origin": server})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    log = server_log.read_text()
    assert "POST /v1/chat/completions" in log and secret not in log


def test_cors_when_origins_are_given():
    with in_process_server(ScriptedModel(UTF8_SCRIPT), cors_origins=["http://ok.example"], api_key="k") as (url, _):
        r = httpx.options(url + "/v1/chat/completions", headers={  # as the OpenAI JS SDK asks
            "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-lang"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://ok.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://other.example", "Authorization": "Bearer k"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://other.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_web_page_is_served_open_and_self_contained(server):
    r = httpx.get(server + "/")  # the page itself needs no key; its API calls do
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/chat/completions" in page and "getReader" in page and "Authorization" in page
    assert "<script src" not in page and "<link" not in page and "https://" not in page  # nothing external


def test_auth_on_every_route(server):
    msgs = [{"role": "user", "content": "hi"}]
    routes = [("GET", "/ready", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
              ("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 2}),
              ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("POST", "/tokenize", {"text": "hi"}),
              ("POST", "/chat", {"message": "hi", "max_tokens": 2})]
    with httpx.Client(base_url=server, timeout=30) as c:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": "Basic " + KEY}, {"Authorization": f"Bearer {KEY}x"}):
                assert_error_shape(c.request(method, path, headers=headers, json=body), 401, "invalid_api_key")
            r = c.request(method, path, headers=AUTH, json=body)
            assert r.status_code == 200, (path, r.text)
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


# ---- generation -------------------------------------------------------------------------------

def test_chat_completion_greedy_equals_model(client, model):
    prompt = chat_prompt("Tell me a story", system="You are terse.")
    want, n = greedy_reference(model, prompt, 20)
    assert len(want) > 10  # the test model says something
    r = client.post("/v1/chat/completions", json={"model": "anything", "temperature": 0, "max_tokens": 20, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]}).json()
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == "tiny"
    assert isinstance(r["created"], int)
    (choice,) = r["choices"]
    assert choice["message"] == {"role": "assistant", "content": want}
    assert choice["finish_reason"] == ("length" if n == 20 else "stop")
    cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]  # earlier tests' prompts may share a prefix
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                          "prompt_tokens_details": {"cached_tokens": cached}} and 0 <= cached < len(prompt)
    # max_completion_tokens is the same thing under its new name
    r2 = client.post("/v1/chat/completions", json={"temperature": 0, "max_completion_tokens": 20, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]}).json()
    assert r2["choices"][0]["message"]["content"] == want


def test_stream_shape_and_text(client, model):
    prompt = chat_prompt("Stream please")
    want, n = greedy_reference(model, prompt, 16)
    body = {"messages": [{"role": "user", "content": "Stream please"}], "temperature": 0, "max_tokens": 16,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, last = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == n
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == want
    assert len(chunks) > 4  # token by token, not all at once


def test_completions_raw_prompt(client, model):
    want, n = greedy_reference(model, encode("Once upon a time"), 12)
    r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want
    assert r["usage"]["prompt_tokens"] == len(encode("Once upon a time")) and r["usage"]["completion_tokens"] == n
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == want


def test_openai_client(server, model):
    import openai
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Hello there"}]
    want, _ = greedy_reference(model, chat_prompt("Hello there"), 10)
    r = oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.usage.completion_tokens >= 1
    stream = oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(chat_prompt("Hello there"))
    assert oa.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0).choices[0].text == \
        greedy_reference(model, encode("Hi"), 3)[0]
    assert [m.id for m in oa.models.list().data] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=1000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_seed_and_greedy_are_deterministic(client):
    def ask(**kw):
        body = {"messages": [{"role": "user", "content": "Pick words"}], "max_tokens": 12, **kw}
        return [c["message"]["content"] for c in client.post("/v1/chat/completions", json=body).json()["choices"]]

    assert ask(temperature=0) == ask(temperature=0) == ask(temperature=0, seed=5, top_p=0.5)
    a = ask(temperature=1.0, seed=7)
    assert a == ask(temperature=1.0, seed=7)
    assert a != ask(temperature=1.0, seed=8)
    two = ask(temperature=1.0, seed=7, n=2)
    assert len(two) == 2 and two[0] == a[0] and two[1] != two[0]  # choice i uses seed + i
    body = {"messages": [{"role": "user", "content": "Pick words"}], "max_tokens": 12, "temperature": 1.0, "seed": 7,
            "n": 2, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    streamed, finished = ["", ""], set()
    for e in events[:-1]:
        (choice,) = e["choices"]
        streamed[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert streamed == two and finished == {0, 1}
    assert ask(temperature=1.0, seed=7, top_k=1) == ask(temperature=0)  # top_k=1 is greedy
    # vLLM's "all tokens" is -1 (its default for long, and what clients written for it send), as 0 is here
    assert ask(temperature=1.0, seed=7, top_k=-1) == ask(temperature=1.0, seed=7, top_k=0) == a
    r = client.post("/chat", json={"message": "Pick words", "temperature": 1.0, "seed": 7, "top_k": -1})
    assert r.status_code == 200, r.text


def test_stop_strings_are_cut_and_not_returned(client):
    base = {"messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0, "max_tokens": 30}
    full = client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[: full.index(stop)]
    r = client.post("/v1/chat/completions", json={**base, "stop": [stop, "\x00never"]}).json()["choices"][0]
    assert r["message"]["content"] == want and r["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={**base, "stop": stop, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == want and stop not in text and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos_generates_max_tokens_past_the_end_of_the_reply():
    """vLLM's `ignore_eos`, which benchmarks send: a model that ends its reply after 'Hello' goes on to max_tokens."""
    script = encode("Hello") + [END]
    with in_process_server(ScriptedModel(script), max_batch=2) as (url, _), httpx.Client(base_url=url) as c:
        chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 10}
        done = c.post("/v1/chat/completions", json=chat).json()
        assert done["choices"][0]["message"]["content"] == "Hello" and done["choices"][0]["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] == len(script)
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hi", "max_tokens": 10})):
            r = c.post(path, json={**body, "ignore_eos": True}).json()
            assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 10, path
        assert c.post("/v1/completions", json={"prompt": "hi", "ignore_eos": 1}).status_code == 400  # strict bool


def test_context_limits_are_honest(client):
    msgs = [{"role": "user", "content": "hi"}]
    prompt_len = len(chat_prompt("hi"))
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 126})
    assert_error_shape(r, 400, "context_length_exceeded")
    assert "128" in r.json()["error"]["message"] and str(prompt_len + 126) in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 65})  # over the cap of 64
    assert_error_shape(r, 400, "invalid_value")
    assert r.json()["error"]["param"] == "max_tokens"
    long = " ".join(["word"] * 200)
    assert_error_shape(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]}),
                       400, "context_length_exceeded")
    # no max_tokens: what fits, capped at 64
    r = client.post("/v1/chat/completions", json={"messages": msgs, "temperature": 0}).json()
    assert 1 <= r["usage"]["completion_tokens"] <= 64
    near = " ".join(["word"] * 120)
    r = client.post("/v1/completions", json={"prompt": near, "temperature": 0, "ignore_eos": True}).json()
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 128  # what fits, under 16
    # legacy completions without max_tokens: 16 tokens, as OpenAI's and vLLM's; chat: what fits, up to the cap
    r = client.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 16
    r = client.post("/v1/chat/completions", json={"messages": msgs, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 64
    # the error names the request's field that holds the prompt
    for path, body, field in (("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
                              ("/v1/completions", {"prompt": long}, "prompt"), ("/chat", {"message": long}, "message")):
        r = client.post(path, json=body)
        assert_error_shape(r, 400, "context_length_exceeded")
        assert r.json()["error"]["param"] == field, path


def test_a_part_other_than_text_is_refused_in_one_clear_message(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, image]}]})
    assert_error_shape(r, 400)
    message = r.json()["error"]["message"]
    assert "content part of type 'image_url': this model reads text parts only" in message
    assert "more problems" not in message and "valid string" not in message
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]  # joined by a newline, as vLLM's
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2,
                                                   "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == len(chat_prompt("Say\nhi"))
    tokens = client.post("/tokenize", json={"messages": [{"role": "user", "content": parts}]}).json()["tokens"]
    assert tokens == chat_prompt("Say\nhi")


def test_chat_sessions_keep_the_conversation_and_drop_old_turns(client):
    r1 = client.post("/chat", json={"message": "Hello", "system": "Be brief.", "max_tokens": 8}).json()
    sid = r1["session_id"]
    assert r1["new_session"] and r1["dropped_messages"] == 0 and r1["usage"]["completion_tokens"] >= 1
    r2 = client.post("/chat", json={"message": "And then?", "session_id": sid, "max_tokens": 8}).json()
    assert r2["session_id"] == sid and not r2["new_session"]
    assert r2["usage"]["prompt_tokens"] > r1["usage"]["prompt_tokens"] + r1["usage"]["completion_tokens"]
    dropped = []
    for i in range(6):  # ~35-token messages with 30 tokens reserved: the context of 128 overflows
        r = client.post("/chat", json={"message": " ".join(["talk"] * 30) + f" {i}", "session_id": sid,
                                       "max_tokens": 30, "temperature": 0}).json()
        assert r["usage"]["prompt_tokens"] + 30 <= 128 and len(r["dropped"]) == r["dropped_messages"]
        dropped += r["dropped"]
    assert len(dropped) >= 4 and dropped[0] == {"role": "user", "content": "Hello"}  # oldest first
    assert [m["role"] for m in dropped[:4]] == ["user", "assistant"] * 2
    assert_error_shape(client.post("/chat", json={"message": " ".join(["x"] * 200), "max_tokens": 8}), 400,
                       "context_length_exceeded")


def test_fit_conversation_keeps_the_system_message():
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 5},
                 {"role": "assistant", "content": f"answer {i} " * 5}]
    msgs.append({"role": "user", "content": "last"})
    full = len(render(msgs, add_generation_prompt=True)[0])
    ids, kept, dropped = fit_conversation(msgs, reserve=3, block_size=full + 1)  # 2 tokens short: one pair goes
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert dropped == 2 and kept == [msgs[0]] + msgs[3:] and len(ids) + 3 <= full + 1
    assert fit_conversation(msgs, 0, full)[2] == 0


def test_fit_conversation_on_any_order_of_roles():
    """The greeting before the first question goes first; the leading system messages stay; when even the last
    exchange does not fit, it alone comes back (a prompt too long, which the caller refuses)."""
    def m(role, content):
        return {"role": role, "content": content}
    msgs = [m("system", "You are Ada."), m("system", "Be brief."), m("assistant", "Hi, I'm Ada. " * 5),
            m("user", "question " * 5), m("assistant", "answer " * 5), m("user", "last"), m("user", "one")]
    full = len(render(msgs, add_generation_prompt=True)[0])
    ids, kept, dropped = fit_conversation(msgs, reserve=1, block_size=full)  # one token short: the greeting goes
    assert (kept, dropped) == (msgs[:2] + msgs[3:], 1) and ids == render(kept, add_generation_prompt=True)[0]
    ids, kept, dropped = fit_conversation(msgs, reserve=full, block_size=full)  # nothing fits
    assert (kept, dropped) == (msgs[:2] + msgs[5:], 3) and ids == render(kept, add_generation_prompt=True)[0]


# Shapes that OpenAI's API and vLLM answer beside strict alternation (after an assistant message last, a new one).
SHAPES = {
    "assistant first": [{"role": "system", "content": "You are Ada."},
                        {"role": "assistant", "content": "Hi, I'm Ada, how can I help?"},
                        {"role": "user", "content": "My order is late."}],
    "two user messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Are you there?"}],
    "two assistant messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                               {"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "?"}],
    "a later system message": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                               {"role": "developer", "content": "Summary: the user said hi."},
                               {"role": "user", "content": "Again?"}],
    "assistant last": [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "Roses are"}],
    "system alone": [{"role": "system", "content": "Be brief."}],
}


@pytest.mark.parametrize("name", SHAPES)
def test_chat_completions_answer_any_order_of_roles(client, model, name):
    messages = SHAPES[name]
    prompt = render([{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages],
                    add_generation_prompt=True)[0]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    assert r.json()["choices"][0]["message"]["content"] == greedy_reference(model, prompt, 4)[0]
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == prompt


def test_bad_messages_get_a_400_naming_the_message(client):
    hi = {"role": "user", "content": "hi"}
    for messages, says in (([], "messages: expected a non-empty list of messages"),
                           ([hi, {"role": "robot", "content": "x"}], "messages.1.role: Input should be 'system'"),
                           ([hi, {"role": "user", "content": 5}], "messages.1.content"),
                           ([hi, {"role": "assistant"}], "messages.1.content: Field required")):
        r = client.post("/v1/chat/completions", json={"messages": messages})
        assert_error_shape(r, 400)
        assert r.json()["error"]["message"].startswith(says), r.text


def test_malformed_requests_get_4xx_in_the_error_shape(client):
    msgs = [{"role": "user", "content": "hi"}]
    valid = {"messages": msgs, "max_tokens": 2}
    bad_values = {
        "messages": [None, "hi", [], {}, [{}], [{"role": "robot", "content": "x"}], [{"role": "user"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": None}],
                     [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]],
        "max_tokens": [0, -1, "5", 2.5, True, 10**30, None if False else [], {}],
        "max_completion_tokens": [0, "x", 3.5],
        "temperature": [-0.1, 2.5, "hot", 1e309, [], True],
        "top_p": [0, -1, 1.5, "x"],
        "top_k": [-2, 1.5, "x"],
        "n": [0, -2, 5, 100, "2", 1.0],
        "stop": [5, [1], ["a", "b", "c", "d", "e"], "", [""], {"x": 1}],
        "seed": ["x", 1.5, 2**64, -2**63 - 1],
        "stream": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}],
        "logprobs": ["yes", 1],
        "top_logprobs": [21, -1, 2, "x", 1.5],  # 2: without logprobs
        "presence_penalty": [2.5, "x", []],
        "frequency_penalty": [-2.1, "x"],
        "repetition_penalty": [0, -1, 10.5, "x"],
        "logit_bias": [{"x": 1}, {"50256": 101}, {"99999": 1}, {"-1": 5}, {"5": "x"}, [5]],
        "tools": [[{"type": "function"}]],
    }
    cases = [("/v1/chat/completions", {**valid, k: v}) for k, values in bad_values.items() for v in values]
    cases += [("/v1/completions", {"prompt": p, "max_tokens": 2})
              for p in (None, 5, "", [], ["a", ""], [-1], [1.5], ["a", 1])]
    cases += [("/chat", b) for b in ({}, {"message": 5}, {"message": ""}, {"message": "hi", "session_id": "../x"},
                                     {"message": "hi", "session_id": "x" * 200}, {"message": "hi", "max_tokens": 0})]
    cases += [("/tokenize", b) for b in ({}, {"text": 5}, {"text": "a", "messages": msgs}, {"messages": []})]
    for path, body in cases:  # json.dumps writes inf as Infinity, which a strict client would refuse to send
        r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert_error_shape(r)
    raw_bodies = [b"", b"{", b"[]", b"null", b"42", b'"x"', b"\xff\xfe\x00", b'{"messages": NaN}',
                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                  b'{"messages": [], "top_p": Infinity}', b"[" * 5000 + b"]" * 5000, b'{"a": 1,}']
    for raw in raw_bodies:
        r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (raw[:40], r.text)
        assert_error_shape(r)
    # valid JSON with odd text in it: an unpaired surrogate is not text (echoed, it could not be written as UTF-8)
    for path, field in (("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\ud800b"}]'),
                        ("/v1/completions", '"prompt": "a\\uDC00b", "echo": true')):
        r = client.post(path, content=f'{{{field}, "max_tokens": 2}}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    pair = b'{"messages": [{"role": "user", "content": "a\\ud83d\\ude00b"}], "max_tokens": 2}'  # an escaped emoji
    r = client.post("/v1/chat/completions", content=pair, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(chat_prompt("a\U0001F600b")), r.text
    # random mutations of a valid request, bounded in number: never a 5xx
    rng = random.Random(0)
    junk = [None, True, -1, 0, 3, 1e308, float("-inf"), "", "x" * 50, [], {}, [None], {"role": "user"}, 2**70, -0.5]
    fields = list(bad_values) + ["model", "user", "messages.0.role", "messages.0.content"]
    for _ in range(120):
        body = json.loads(json.dumps(valid))
        for _ in range(rng.randint(1, 3)):
            field, value = rng.choice(fields), rng.choice(junk)
            if field.startswith("messages.0.") and isinstance(body.get("messages"), list) and body["messages"] \
                    and isinstance(body["messages"][0], dict):
                body["messages"][0][field.split(".")[-1]] = value
            else:
                body[field] = value
        r = client.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_error_shape(r)
    for path, method in (("/nowhere", "GET"), ("/v1/chat/completions", "GET"), ("/health", "POST")):
        assert_error_shape(client.request(method, path), 404 if path == "/nowhere" else 405)


def test_body_size_cap(client):
    big = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert_error_shape(client.post("/v1/chat/completions", json=big), 413, "body_too_large")


def test_32_concurrent_requests_equal_unbatched_greedy(server, model):
    prompts = [f"Question number {i}: what is {i * 7}?" for i in range(32)]
    want = [greedy_reference(model, chat_prompt(p), 16)[0] for p in prompts]
    assert len(set(want)) > 8  # the prompts lead to different answers, so a mix-up would show

    def ask(p):
        body = {"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16}
        return httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, prompts))
    assert [g["choices"][0]["message"]["content"] for g in got] == want


# ---- logprobs and conversation reuse ------------------------------------------------------------

def log_softmax_of(model: GPT, ids: list[int]):
    """The model's log-probabilities after each position of ids, (len(ids), V), from one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def top(logp_row, k: int) -> tuple[list[int], list[float]]:
    values, ids = torch.topk(logp_row[:N_VOCAB], k)
    return ids.tolist(), values.tolist()


def test_chat_logprobs_are_the_models_log_softmax(client, model):
    messages = [{"role": "user", "content": "Tell me about logprobs"}]
    prompt = chat_prompt("Tell me about logprobs")
    (ids,) = model.generate([prompt], 10, temperature=0, stop_tokens=STOP_IDS)
    text_ids = [t for t in ids if t not in STOP_IDS]  # a stop token ends the reply and is not part of it
    logp = log_softmax_of(model, prompt + text_ids)
    body = {"messages": messages, "temperature": 0, "max_tokens": 10, "logprobs": True, "top_logprobs": 3}
    r = client.post("/v1/chat/completions", json=body).json()
    (choice,) = r["choices"]
    content = choice["logprobs"]["content"]
    assert set(choice["logprobs"]) == {"content"} and len(content) == len(text_ids) > 5
    assert [bytes(c["bytes"]) for c in content] == [decode_bytes([t]) for t in text_ids]
    assert b"".join(bytes(c["bytes"]) for c in content).decode(errors="replace") == choice["message"]["content"]
    for position, (c, token) in enumerate(zip(content, text_ids), start=len(prompt) - 1):
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"}
        assert c["token"] == decode_bytes([token]).decode(errors="replace")
        assert c["logprob"] == pytest.approx(logp[position, token].item(), abs=1e-5)
        want_ids, want_values = top(logp[position], 3)
        assert [bytes(a["bytes"]) for a in c["top_logprobs"]] == [decode_bytes([i]) for i in want_ids]
        assert [a["logprob"] for a in c["top_logprobs"]] == pytest.approx(want_values, abs=1e-5)
        assert all(set(a) == {"token", "logprob", "bytes"} for a in c["top_logprobs"])
    # streamed: each chunk carries its tokens' entries, which add up to the same list
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = sse_events(s.iter_lines())[:-1]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk
    streamed = [e for c in chunks[1:] for e in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert [e["bytes"] for e in streamed] == [c["bytes"] for c in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-5)
    # without logprobs the field is null, as OpenAI's
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).json()
    assert r["choices"][0]["logprobs"] is None


def test_completions_echo_scores_the_prompt_as_lm_eval_asks(client, model):
    """max_tokens 0 with echo and logprobs: lm-evaluation-harness's loglikelihood request."""
    text = "The quick brown fox jumps over"
    prompt = encode(text)
    logp = log_softmax_of(model, prompt)
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == text and r["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before the first
    want = logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    for position in range(1, len(prompt)):
        ids, values = top(logp[position - 1], 2)
        assert lp["top_logprobs"][position] == pytest.approx(dict(zip(map(decode, ([i] for i in ids)), values)),
                                                             abs=1e-5)
    assert lp["text_offset"] == [len(decode(prompt[:j])) for j in range(len(prompt))]


def test_text_offsets_count_characters_where_tokens_split_them(client):
    text = "I 🐱 love 日本"  # the cat and the kanji are each split over several tokens
    prompt = encode(text)
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1})
    offsets = r.json()["choices"][0]["logprobs"]["text_offset"]
    assert len(offsets) == len(prompt) > len(text.split())
    for j, offset in enumerate(offsets):  # each token starts at the first character its bytes are part of
        before = decode_bytes(prompt[:j]).decode("utf-8", errors="ignore")
        assert offset == len(before), (j, offset, before)
    assert text[offsets[prompt.index(encode(" love")[0])]:] == " love 日本"


def test_a_one_token_prompt_is_echoed_with_nothing_to_score(client):
    for prompt in ("The", [464]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == ["The"] and lp["token_logprobs"] == [None] and lp["top_logprobs"] == [None]


def test_vanishing_temperature_or_top_p_is_greedy_and_harms_no_other_request(client):
    """A temperature of 1e-300 or a top_p that float32 reads as 0 once failed the whole batch's step."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    greedy = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(2)]
        odd = [pool.submit(client.post, "/v1/chat/completions", json={**body, **extra})
               for extra in ({"temperature": 1e-300}, {"temperature": 0.8, "top_p": 1e-300})]
        for f in others + odd:
            r = f.result()
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy, r.text


def test_completions_logprobs_with_and_without_echo(client, model):
    text = "Once upon a midnight"
    prompt = encode(text)
    (ids,) = model.generate([prompt], 5, temperature=0, stop_tokens=STOP_IDS)
    generated = [t for t in ids if t not in STOP_IDS]
    logp = log_softmax_of(model, prompt + generated)
    want = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(generated)]
    body = {"prompt": text, "max_tokens": 5, "temperature": 0, "logprobs": 1}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["text"] == decode(generated) and plain["logprobs"]["tokens"] == [decode([t]) for t in generated]
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-5)
    assert plain["logprobs"]["text_offset"][0] == len(text)  # offsets count the prompt's characters too
    assert [list(d.values())[0] for d in plain["logprobs"]["top_logprobs"]] == pytest.approx(want, abs=1e-5)  # greedy
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == text + plain["text"]
    assert echoed["logprobs"]["tokens"] == [decode([t]) for t in prompt + generated]
    assert echoed["logprobs"]["token_logprobs"][len(prompt):] == pytest.approx(want, abs=1e-5)
    with client.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as s:
        chunks = [c["choices"][0] for c in sse_events(s.iter_lines())[:-1]]
    assert chunks[0]["text"] == text and chunks[0]["logprobs"]["tokens"] == [decode([t]) for t in prompt]
    assert "".join(c["text"] for c in chunks) == echoed["text"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == echoed["logprobs"]["text_offset"]


def test_bad_logprobs_values_get_a_400_naming_the_field(client):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"prompt": "hi", "max_tokens": 2}
    cases = [("/v1/chat/completions", chat, {"top_logprobs": 2}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"logprobs": 3}, "logprobs"),
             ("/v1/chat/completions", chat, {"max_tokens": 0, "logprobs": True}, "max_tokens"),
             ("/v1/completions", completion, {"logprobs": 21}, "logprobs"),
             ("/v1/completions", completion, {"logprobs": -1}, "logprobs"),
             ("/v1/completions", completion, {"logprobs": True}, "logprobs"),
             ("/v1/completions", completion, {"max_tokens": 0, "logprobs": 1}, "max_tokens"),
             ("/v1/completions", completion, {"echo": "yes"}, "echo"),
             ("/v1/completions", completion, {"frequency_penalty": 3.0}, "frequency_penalty"),
             ("/v1/completions", completion, {"logit_bias": {"ab": 1}}, "logit_bias")]
    for path, base, extra, param in cases:
        r = client.post(path, json={**base, **extra})
        assert_error_shape(r, 400)
        assert r.json()["error"]["param"] == param, (extra, r.json())


def test_penalties_and_logit_bias_reach_the_engine(client):
    """OpenAI's frequency_penalty, presence_penalty and logit_bias, and vLLM's repetition_penalty, are applied
    (engine tests check the arithmetic): a bias of 100 makes one token all a greedy reply says, on both routes."""
    token = encode(" hello")[0]
    bias = {"logit_bias": {str(token): 100}, "temperature": 0, "max_tokens": 3, "frequency_penalty": 0.5,
            "presence_penalty": 0.5, "repetition_penalty": 1.2}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **bias})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == " hello" * 3
    r = client.post("/v1/completions", json={"prompt": "hi", **bias})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " hello" * 3


def test_unsupported_parameters_get_a_400_unless_neutral(client):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"prompt": "hi", "max_tokens": 2}
    cases = [("/v1/chat/completions", chat, {"response_format": {"type": "json_object"}}, "response_format"),
             ("/v1/chat/completions", chat, {"tool_choice": "required"}, "tool_choice"),
             ("/v1/completions", completion, {"suffix": "mat."}, "suffix"),
             ("/v1/completions", completion, {"best_of": 2}, "best_of")]
    for path, base, extra, param in cases:
        r = client.post(path, json={**base, **extra})
        assert_error_shape(r, 400)
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "unsupported_parameter"
    neutral = {"logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none", "presence_penalty": 0}
    assert client.post("/v1/chat/completions", json={**chat, **neutral}).status_code == 200
    assert client.post("/v1/completions", json={**completion, "suffix": "", "best_of": 1}).status_code == 200


def test_the_developer_role_is_the_system_role(client):
    def reply(role):
        body = {"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]
    assert reply("developer") == reply("system")
    assert reply("system")[1] == len(chat_prompt("hi", system="Be brief."))


def chat_turns(url: str, messages: list[str]) -> list[dict]:
    """A /chat conversation, greedy: each turn's response."""
    session, out = None, []
    for message in messages:
        body = {"message": message, "session_id": session, "max_tokens": 12, "temperature": 0}
        out.append(httpx.post(url + "/chat", json=body, headers=AUTH, timeout=60).json())
        session = out[-1]["session_id"]
    return out


def test_conversation_reuse_prefills_only_new_tokens_and_changes_no_reply(server, client, model):
    messages = ["Hi, who are you?", "Tell me more.", "And what then?"]
    turns = chat_turns(server, messages)
    history = []
    for message, turn in zip(messages, turns):
        history.append({"role": "user", "content": message})
        prompt = render(history, add_generation_prompt=True)[0]
        assert turn["reply"] == greedy_reference(model, prompt, 12)[0] and turn["dropped_messages"] == 0
        if len(history) > 1:  # the previous turn's prompt is cached, and at most all but the last prompt token
            assert previous_prompt_tokens <= turn["usage"]["prompt_tokens_details"]["cached_tokens"] < len(prompt)
        previous_prompt_tokens = len(prompt)
        history.append({"role": "assistant", "content": turn["reply"]})
    with in_process_server(model, prefix_cache_tokens=0) as (url, _):  # the same model without the prefix cache
        uncached = chat_turns(url, messages)
    assert [t["reply"] for t in uncached] == [t["reply"] for t in turns]
    assert [t["usage"]["prompt_tokens_details"]["cached_tokens"] for t in uncached] == [0, 0, 0]
    # a chat completion that repeats an earlier conversation and adds a message
    first = [{"role": "user", "content": "Name three colours."}]
    r1 = client.post("/v1/chat/completions", json={"messages": first, "max_tokens": 8, "temperature": 0}).json()
    second = first + [r1["choices"][0]["message"], {"role": "user", "content": "Why those?"}]
    prompt = render(second, add_generation_prompt=True)[0]
    r2 = client.post("/v1/chat/completions", json={"messages": second, "max_tokens": 8, "temperature": 0}).json()
    assert r1["usage"]["prompt_tokens"] <= r2["usage"]["prompt_tokens_details"]["cached_tokens"] < len(prompt)
    assert r2["choices"][0]["message"]["content"] == greedy_reference(model, prompt, 8)[0]
    reported = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (*turns, r2)]
    assert metric(client.get("/metrics").text, "parley_reused_prompt_tokens_total") >= sum(reported)


def test_the_prefix_cache_keeps_its_bound_dropping_the_least_recently_used(model):
    texts = ["Apples are red and sweet", "Bananas grow where it is warm", "Cherries come in June",
             "Dates are dried in the sun"]
    with in_process_server(model, prefix_cache_tokens=30) as (url, app):
        def cached(text):
            body = {"prompt": text, "max_tokens": 4, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
            assert app.state.engine.store.size <= 30
            return r["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert [cached(t) for t in texts] == [0, 0, 0, 0]
        assert cached(texts[0] + " today") == 0  # the oldest conversation was dropped to make room
        assert cached(texts[3] + " today") >= len(encode(texts[3]))  # the newest is still there


def test_the_mailbox_wakes_the_loop_once_per_batch_and_loses_no_event():
    loop = asyncio.new_event_loop()
    wakeups, call_soon = [], loop.call_soon_threadsafe

    def counted(*args):
        wakeups.append(args)
        return call_soon(*args)

    loop.call_soon_threadsafe = counted
    mailbox = Mailbox(loop)
    queues = [asyncio.Queue(), asyncio.Queue()]
    try:
        for i in range(6):  # one engine step's events, posted while the loop is busy elsewhere
            mailbox.post(queues[i % 2], i)
        assert len(wakeups) == 1
        loop.run_until_complete(asyncio.sleep(0))
        assert [q.get_nowait() for q in queues for _ in range(3)] == [0, 2, 4, 1, 3, 5]
        mailbox.post(queues[0], 6)  # the next step wakes it again
        assert len(wakeups) == 2

        # An engine thread posting while the loop delivers: every event arrives, in order.
        n, got = 20_000, []

        async def receive():
            while len(got) < n:
                got.append(await queues[1].get())

        poster = threading.Thread(target=lambda: [mailbox.post(queues[1], i) for i in range(n)])
        reader = loop.create_task(receive())
        poster.start()
        loop.run_until_complete(asyncio.wait_for(reader, 30))
        poster.join()
        assert got == list(range(n)) and len(wakeups) < n
    finally:
        loop.close()


def test_a_whole_response_reaches_the_loop_once_per_choice(monkeypatch):
    posted, post = [], Mailbox.post
    monkeypatch.setattr(Mailbox, "post", lambda self, queue, event: (posted.append(event), post(self, queue, event)))
    body = {"messages": [{"role": "user", "content": "Pick words"}], "max_tokens": 12, "temperature": 1.0, "seed": 7,
            "n": 2, "ignore_eos": True, "logprobs": True}
    with in_process_server(tiny_model()) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        posted.clear()  # the server's warm-up
        choices = client.post("/v1/chat/completions", json=body).json()["choices"]
        whole = list(posted)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.iter_lines())
    streamed, posted = posted[len(whole):], whole
    # Twelve tokens a choice, each told to the loop as one text event and the end, not one event per token.
    assert sorted((e.index, e.kind) for e in posted) == [(0, "done"), (0, "text"), (1, "done"), (1, "text")]
    texts = {e.index: e for e in posted if e.kind == "text"}
    assert [texts[c["index"]].text for c in choices] == [c["message"]["content"] for c in choices]
    assert [len(texts[c["index"]].logprobs) for c in choices] == [len(c["logprobs"]["content"]) for c in choices]
    assert [len(c["logprobs"]["content"]) for c in choices] == [12, 12]
    assert len(events) > 12 and sum(e.kind == "text" for e in streamed) > 12  # a stream still hears of every token


# ---- UTF-8, disconnects, floods, deadlines (the scripted model) ---------------------------------

def test_text_stream_holds_back_split_characters():
    emoji = encode("😀")
    assert len(emoji) == 2  # GPT-2 splits it over two byte tokens
    ts = TextStream([])
    assert ts.push(emoji[0]) == "" and ts.push(emoji[1]) == "😀"
    ts = TextStream([])
    assert "".join(ts.push(t) for t in encode("你好 🎉")) + ts.finish() == "你好 🎉"
    ts = TextStream([])
    assert ts.push(emoji[0]) == "" and ts.finish() == "\ufffd"  # cut mid-character: one replacement character
    # stop strings: held back while they might be starting, never returned
    ts = TextStream(["END"])
    out = [ts.push(t) for t in encode("abc EN")]
    assert "".join(out) == "abc " and not ts.stopped
    assert ts.push(encode("D")[0]) == "" and ts.stopped
    ts = TextStream(["xyz"])
    assert "".join(ts.push(t) for t in encode("say x then y")) + ts.finish() == "say x then y"


def test_utf8_characters_arrive_whole_in_the_stream(scripted):
    url, _ = scripted
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": len(UTF8_SCRIPT), "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = sse_events(r.iter_lines())
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == UTF8_TEXT
    assert "\ufffd" not in "".join(deltas)
    assert "😀" in deltas or any("😀" in d for d in deltas)
    assert not any(d and (0xD800 <= ord(d[-1]) <= 0xDFFF) for d in deltas)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": len(UTF8_SCRIPT)}, timeout=30).json()
    assert r["choices"][0]["text"] == UTF8_TEXT and r["choices"][0]["finish_reason"] == "length"


def test_disconnect_frees_the_slot(scripted):
    url, app = scripted
    engine = app.state.engine

    def cancelled():
        return metric(httpx.get(url + "/metrics").text, "parley_cancelled_total")

    before = cancelled()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}
    # streaming: read a bit, hang up
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert '"role"' in next(lines) and '"content"' in next(lines)  # generating
        assert engine.active
    # not streaming: send the request and hang up without reading
    raw = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        end = time.time() + 5
        while not engine.active and time.time() < end:
            time.sleep(0.01)
        assert engine.active
    end = time.time() + 5  # the counter proves it: a generation that runs to its end is not counted
    while (engine.active or cancelled() < before + 2) and time.time() < end:
        time.sleep(0.02)
    assert not engine.active and len(engine.free) == 2 and cancelled() == before + 2


def test_flood_gets_429_and_the_server_stays_healthy(scripted):
    url, app = scripted
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}  # 1 s per pair of requests
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=20)) as c, \
            httpx.Client(base_url=url, timeout=5) as probe, ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(c.post, "/v1/chat/completions", json=body) for _ in range(12)]
        time.sleep(0.3)
        t = time.time()
        assert probe.get("/health").status_code == 200  # the event loop is free while the model works
        assert time.time() - t < 1.0 and not all(f.done() for f in futures)
        results = [f.result() for f in futures]
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 2 and codes.count(429) >= 4 and set(codes) <= {200, 429}, codes  # 2 rows + 2 waiting
    for r in results:
        if r.status_code == 429:
            assert_error_shape(r, 429, "queue_full")
            assert r.headers["Retry-After"] == "1"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    # n choices wait in the queue together: more than its 2 places could never be served, so that is a 400, not a
    # 429 to retry forever (max_n is 4 here)
    r = httpx.post(url + "/v1/chat/completions", json={**body, "n": 3}, timeout=30)
    assert_error_shape(r, 400)
    assert r.json()["error"]["param"] == "n" and "limit of 2" in r.json()["error"]["message"]


def test_request_deadline():
    with in_process_server(ScriptedModel(UTF8_SCRIPT, delay=0.05), request_timeout=0.5) as (url, app):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
        t = time.time()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert_error_shape(r, 504, "timeout")
        assert time.time() - t < 2
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        assert not app.state.engine.active


# ---- the web page in a real browser --------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands in on
    fd 3, replies out on fd 4, each a JSON message ended by a NUL byte); no websocket library needed."""

    def __init__(self, profile: Path):
        import fcntl
        self.to_browser, browser_in = os.pipe()[::-1]
        self.from_browser, browser_out = os.pipe()

        def wire_fds():  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
            a, b = fcntl.fcntl(browser_in, fcntl.F_DUPFD, 10), fcntl.fcntl(browser_out, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--window-size=900,600", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=wire_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(browser_in)
        os.close(browser_out)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 30, **params):
        import select
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        end = time.time() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            assert select.select([self.from_browser], [], [], max(0.0, end - time.time()))[0], f"{method}: no reply"
            self.buffer += os.read(self.from_browser, 1 << 20)

    def open(self, url: str):
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        end = time.time() + timeout
        while not self.js(expression):
            assert time.time() < end, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.to_browser)
        os.close(self.from_browser)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (make chromium)")
def test_web_page_in_headless_chromium(scripted, tmp_path):
    url, _ = scripted
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(url + "/?q=Hello%20there")  # ?q= sends a first message on load
        bubbles = ("[...document.querySelectorAll('.msg')]"
                   ".map(e => [e.className, e.firstChild ? e.firstChild.textContent : ''])")
        browser.wait_for("document.querySelector('.assistant .meta') !== null")  # the reply has finished
        assert browser.js(bubbles) == [["msg user", "Hello there"], ["msg assistant", scripted_text(100)]]
        # a second turn through the form: the conversation is kept and sent again
        browser.js("document.getElementById('max_tokens').value = '5';"
                   "document.getElementById('input').value = 'More please';"
                   "document.getElementById('form').requestSubmit()")
        browser.wait_for("document.querySelectorAll('.assistant .meta').length === 2")
        got = browser.js(bubbles)
        assert got[2:] == [["msg user", "More please"], ["msg assistant", scripted_text(5)]]
        assert browser.js("conversation.length") == 4
        # a third turn with room for 20 tokens outgrows the 128-token context (its prompt is 120): the oldest
        # exchange is dropped, as the server's /tokenize counts it, and the page says so
        browser.js("document.getElementById('max_tokens').value = '20';"
                   "document.getElementById('input').value = 'Again';"
                   "document.getElementById('form').requestSubmit()")
        browser.wait_for("document.querySelectorAll('.assistant .meta').length === 3")
        assert browser.js(bubbles)[4:] == [["msg user", "Again"], ["msg assistant", scripted_text(20)]]
        assert browser.js("document.querySelectorAll('.assistant .meta')[2].textContent") == \
            "(dropped the 2 oldest messages to fit the context of 128 tokens) (cut at max tokens)"
        assert browser.js("conversation.map(m => m.content)")[::2] == ["More please", "Again"]
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        # a server with a key: the page opens, its API call fails visibly until the key is entered
        with in_process_server(ScriptedModel(UTF8_SCRIPT), api_key="page-key", max_tokens_cap=5) as (key_url, _):
            browser.open(key_url + "/?q=Hi")
            browser.wait_for("document.querySelector('.msg.error') !== null")
            assert "API key" in browser.js("document.querySelector('.msg.error').textContent")
            assert browser.js("conversation.length") == 0  # the failed turn is not kept
            browser.js("document.getElementById('key').value = 'page-key';"
                       "document.getElementById('input').value = 'Hi again';"
                       "document.getElementById('form').requestSubmit()")
            browser.wait_for("document.querySelector('.assistant .meta') !== null")
            assert browser.js(bubbles)[-2:] == [["msg user", "Hi again"], ["msg assistant", scripted_text(5)]]
    finally:
        browser.close()
    import base64
    png = base64.b64decode(shot)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    if os.environ.get("PARLEY_SCREENSHOT"):  # to look at it: PARLEY_SCREENSHOT=/tmp/chat.png pytest -k chromium
        Path(os.environ["PARLEY_SCREENSHOT"]).write_bytes(png)


# ---- the DNS-rebinding guard ---------------------------------------------------------------------

def test_a_loopback_server_refuses_other_host_headers():
    with in_process_server(ScriptedModel(UTF8_SCRIPT), allowed_hosts=["chat.home.arpa"]) as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.2",
                     f"chat.home.arpa:{port}", "CHAT.home.arpa"):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com", "localhostx"):
            r = httpx.post(url + "/v1/chat/completions", headers={"Host": host},
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 403, host
            assert r.json()["error"]["code"] == "host_not_allowed" and "--allowed-hosts" in r.json()["error"]["message"]
        for hosts in (("evil.example.com", "localhost"), ("localhost", "evil.example.com")):  # either may be read
            with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\n" + b"".join(b"Host: %s\r\n" % h.encode() for h in hosts)
                             + b"Connection: close\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 403"), hosts


def test_a_server_bound_to_all_interfaces_serves_any_host_as_before():
    with in_process_server(ScriptedModel(UTF8_SCRIPT), host="0.0.0.0") as (url, _):
        assert httpx.get(url + "/health", headers={"Host": "chat.example.com"}).status_code == 200


class DeviceErrorModel(ScriptedModel):
    """A scripted model whose forward fails as a CUDA device-side assert does, once `broken` is set."""
    broken = False

    def hidden_states(self, idx, cache=None, pos=None, prev=None):
        if self.broken:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().hidden_states(idx, cache, pos, prev)


def test_a_device_error_turns_health_and_ready_red_and_refuses_new_work():
    """A CUDA error poisons the device: the request fails, then /health and /ready answer 503 and every later
    request is refused, so that a supervisor (or a load balancer) sees the server is gone."""
    model = DeviceErrorModel(UTF8_SCRIPT)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with in_process_server(model) as (url, app):
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        model.broken = True
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert_error_shape(r, 500)
        for path in ("/health", "/ready"):
            assert_error_shape(httpx.get(url + path), 503, "engine_failed")
        assert "device-side assert" in httpx.get(url + "/health").json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and "engine failed" in r.json()["error"]["message"]
        assert app.state.engine.failure.startswith("RuntimeError: CUDA error")


def test_a_device_error_stops_the_server_process(monkeypatch):
    """Started by main(), the server stops itself after a device error (SIGTERM to its own process; main then
    exits with code 1), since only a new process gets a working device."""
    import serve
    killed = []
    monkeypatch.setattr(serve.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    model = DeviceErrorModel(UTF8_SCRIPT)
    server = serve.Server(ServeConfig(checkpoint="scripted"), model, exit_on_failure=True)
    model.broken = True
    server.engine.submit([serve.Sequence([1, 2, 3], serve.SamplingParams(max_tokens=2), index=0)])
    server.engine.step()
    assert killed == [(os.getpid(), serve.signal.SIGTERM)] and not server.ready
    with pytest.raises(serve.EngineStopped, match="engine failed"):
        server.engine.submit([serve.Sequence([1, 2, 3], serve.SamplingParams(max_tokens=2), index=0)])


def test_completions_take_token_ids(client, model):
    """A prompt of token ids, alone or as the one list in a list (OpenAI's shapes; lm-evaluation-harness sends
    them): the same completion and prompt log-probabilities as the text they decode to; bad ids get a 400."""
    text = "Once upon a time"
    ids = encode(text)
    want = client.post("/v1/completions", json={"prompt": text, "max_tokens": 6, "temperature": 0, "echo": True,
                                                "logprobs": 1}).json()["choices"][0]
    for prompt in (ids, [ids]):
        got = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                   "echo": True, "logprobs": 1}).json()["choices"][0]
        assert got["text"] == want["text"] and got["text"].startswith(text)
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-6)
    for prompt, says in (([5, 70000], "token id 70000"), ([[1, 2], [70000]], "token id 70000"), ([], "must not be"),
                         ([[]], "must not be"), (["Hi", ""], "must not be")):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_completions_take_a_list_of_prompts(client):
    """A list of prompts (LangChain's OpenAI.batch, litellm, lm-evaluation-harness with a batch size send one) gets
    n choices per prompt, prompt i's at indices i*n..i*n+n-1 as in OpenAI's and vLLM's answers, each the completion
    that prompt gets alone; usage adds the prompts up. Too many sequences for the queue is a 400, not a 429 that
    no retry would ever get past."""
    texts = ["Once upon a time", "The cat sat"]
    base = {"max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 1}
    alone = [client.post("/v1/completions", json={**base, "prompt": t}).json() for t in texts]
    for prompts in (texts, [encode(t) for t in texts]):
        r = client.post("/v1/completions", json={**base, "prompt": prompts, "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        for c in body["choices"]:
            want = alone[c["index"] // 2]["choices"][0]
            assert c["text"] == want["text"] and c["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]
        assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
        assert body["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)
        with client.stream("POST", "/v1/completions", json={**base, "prompt": prompts, "n": 2, "stream": True}) as resp:
            events = sse_events(resp.iter_lines())
        streamed = ["", "", "", ""]
        for e in events[:-1]:
            streamed[e["choices"][0]["index"]] += e["choices"][0]["text"]
        assert streamed == [c["text"] for c in body["choices"]]
    r = client.post("/v1/completions", json={"prompt": ["Hi"] * 40, "n": 2, "max_tokens": 2})
    assert_error_shape(r, 400, "invalid_value")
    assert "prompt" == r.json()["error"]["param"]


def test_stream_events_survive_line_readers_that_split_at_unicode_line_breaks(client):
    """str.splitlines() ends lines at U+0085, U+2028 and U+2029 too, and so do httpx's iter_lines and requests'
    iter_lines(decode_unicode=True), common ways to read the stream: raw in an event's JSON they cut it in two.
    Escaped, every event is one line to any reader, and the text is the same."""
    prompt = "one\u2028two\u2029three\x85four"
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True}
    want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    events = sse_events(lines)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want and want.startswith(prompt)


@pytest.mark.parametrize("option, says", [(["--max_batch", "0"], "field 'max_batch' expects a value >= 1, got 0"),
                                          (["--max_queue", "-1"], "field 'max_queue' expects a value >= 1"),
                                          (["--request_timeout", "0"], "field 'request_timeout' expects a number"),
                                          (["--port", "70000"], "field 'port' expects a value <= 65535")])
def test_limits_the_server_cannot_run_with_are_refused_before_it_starts(option, says, monkeypatch, capsys):
    import serve
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    monkeypatch.setattr(serve, "create_app", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit:
        serve.main(["--checkpoint", "unused", *option])
    assert exit.value.code == 2 and says in capsys.readouterr().err


def test_the_model_is_named_after_its_run_folder(tmp_path):
    from serve import model_id
    run = tmp_path / "support-bot"
    assert model_id(str(run)) == model_id(str(run / "best")) == model_id(str(run / "best") + "/") == "support-bot"
    assert model_id(str(run / "step_0001533")) == "support-bot/step_0001533"
    assert model_id("") == "parley"
