"""Serve a checkpoint behind an OpenAI-compatible HTTP API, with continuous batching.

  python serve.py --checkpoint checkpoints/chat [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--prefix-cache-tokens 8192]

Routes: POST /v1/chat/completions and /v1/completions (OpenAI shape, streaming as server-sent events),
GET /v1/models, POST /tokenize, POST /chat (a conversation kept on the server, for curl), GET /health
(liveness), GET /ready (503 until the warm-up generation is done), GET /metrics (Prometheus text) and
GET / (a single-page web chat, web/chat.html).

How it works: one engine thread owns the model and a KV cache of `max_batch` rows. Requests wait in a
bounded queue (full: 429 with Retry-After). Each step the engine admits waiting requests into free
rows and runs one forward over all active rows, each row at its own position, with the new requests'
prompts packed after them, then samples each row with its own parameters and seed. Text goes back to
the request's asyncio task token by token; a client that goes away (or a request past its deadline)
frees its row at the next step. Generation never runs on the event loop, so /health answers while the
model works.
A finished sequence's keys and values stay in a bounded prefix cache, so the next turn of a conversation
prefills only its new tokens (usage.prompt_tokens_details.cached_tokens counts the reused ones). Token
log-probabilities (logprobs, top_logprobs, echo) come in OpenAI's response shapes.
"""

import asyncio
import codecs
import collections
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from chat_format import ASSISTANT, ChatFormatError, join_text_parts, leading_system, render, validate
from config import ConfigError, ServeConfig, check_minimums, cli, fail
from engine import (MAX_LOGPROBS, MAX_REPETITION_PENALTY, STOP_IDS, ContextTooLong, DeadlineExceeded, Engine,
                    EngineError, EngineStopped, Event, Logprob, QueueFull, SamplingParams, Sequence, fit_conversation)
from model import pick_device
from tokenizer import N_VOCAB, TokenizerNotFound, decode, decode_bytes, encode, get_encoding

log = logging.getLogger("parley.serve")
WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


# ---- errors: one shape for every 4xx/5xx ------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type_, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


LEGACY_MAX_TOKENS = 16


def context_error(prompt_tokens: int, max_tokens: int, block_size: int, param: str) -> ApiError:
    """OpenAI's error for a prompt and completion over the context; param: the request's field of the prompt."""
    return ApiError(400, f"This model's maximum context length is {block_size} tokens. However, you requested "
                         f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                         "completion). Shorten the prompt or lower max_tokens.",
                    param=param, code="context_length_exceeded")


# ---- metrics ------------------------------------------------------------------------------------

# No `_created` series (a timestamp next to every counter and histogram): /metrics keeps exactly the series it had
# before prometheus_client, which dashboards already read. The switch is process-wide, the only one on offer.
disable_created_metrics()


class Metrics:
    """The server's Prometheus metrics, in a registry of its own so that several apps in one process do not clash.
    prometheus_client's metrics are thread-safe: the event loop and the engine thread update them directly."""

    def __init__(self):
        self.registry = CollectorRegistry()
        # A counter named `x_total` is exposed as `x_total` (prometheus_client adds the suffix only when missing).
        self.requests = Counter("parley_requests_total", "HTTP requests by route and status.", ["route", "status"],
                                registry=self.registry)
        self.errors = Counter("parley_errors_total", "HTTP responses with status >= 400.", ["status"],
                              registry=self.registry)
        self.engine_counters = {  # engine.Engine's `observe` kinds
            "prompt_tokens": Counter("parley_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                     registry=self.registry),
            "reused_tokens": Counter("parley_reused_prompt_tokens_total",
                                     "Prompt tokens whose keys and values came from the prefix cache (not prefilled).",
                                     registry=self.registry),
            "completion_tokens": Counter("parley_completion_tokens_total", "Tokens generated.", registry=self.registry),
            "cancelled": Counter("parley_cancelled_total",
                                 "Generations stopped because the client went away or ran past its deadline.",
                                 registry=self.registry),
        }
        self.histograms = {
            "ttft": Histogram("parley_time_to_first_token_seconds", "From arrival to the first generated token.",
                              buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], registry=self.registry),
            "tpot": Histogram("parley_time_per_output_token_seconds",
                              "Mean time between tokens after the first, per request.",
                              buckets=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
                              registry=self.registry),
        }

    def watch(self, engine: Engine, max_batch: int):
        """The gauges, read from the engine at each scrape."""
        Gauge("parley_queue_depth", "Sequences waiting for a batch row.",
              registry=self.registry).set_function(engine.queue_depth)
        Gauge("parley_active_sequences", "Sequences being generated.",
              registry=self.registry).set_function(lambda: len(engine.active))
        Gauge("parley_batch_slots", "Rows of the batch (max_batch).", registry=self.registry).set(max_batch)

    def observe(self, kind: str, value: float):
        """What the engine reports (engine.Engine's `observe`)."""
        if kind in self.histograms:
            self.histograms[kind].observe(value)
        elif kind in self.engine_counters:
            self.engine_counters[kind].inc(value)

    def count_response(self, route: str, status: int):
        self.requests.labels(route=route, status=str(status)).inc()
        if status >= 400:
            self.errors.labels(status=str(status)).inc()


class MetricsMiddleware:
    """Counts responses by route and status (plain ASGI, so streaming and disconnects pass through untouched)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]  # a route's own path, a template's (/v1/models/{model_id}) for its paths, or other
        route = path if path in self.routes else next(
            (r for r in self.routes if r and "{" in r and path.startswith(r.split("{")[0])), "other")

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.metrics.count_response(route, message["status"])
            await send(message)

        await self.app(scope, receive, send_counted)


# ---- a request on the event loop ----------------------------------------------------------------

def api_error(e: EngineError) -> ApiError:
    """The HTTP form of an engine's error."""
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, ContextTooLong):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, DeadlineExceeded):
        return ApiError(504, "the request ran past its deadline (request_timeout)", "server_error", code="timeout")
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), "server_error", code="server_error")
    return ApiError(500, "internal error during generation", "server_error", code="server_error")


class Mailbox:
    """Events from the engine's thread to the event loop's queues. A decode step emits an event for every active
    row: the loop is woken once for those that arrive together, not once per event, so that at many concurrent
    requests the loop's thread takes the interpreter from the engine's less often."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.letters, self.woken = loop, collections.deque(), False

    def post(self, queue: asyncio.Queue, event: Event):  # on the engine's thread
        self.letters.append((queue, event))
        if not self.woken:
            self.woken = True
            try:
                self.loop.call_soon_threadsafe(self.deliver)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def deliver(self):  # on the loop; cleared first, so a letter posted meanwhile is delivered now or wakes it again
        self.woken = False
        while self.letters:
            queue, event = self.letters.popleft()
            queue.put_nowait(event)


class Job:
    """A request's choices on the event-loop side: submits them to the engine and receives their Events. n choices
    per prompt; prompt k's are choices k*n to k*n+n-1 (OpenAI's order), each sampled as if its prompt came alone."""

    def __init__(self, engine: Engine, mailbox: Mailbox, prompts: list[list[int]], params: list[SamplingParams],
                 n: int, timeout: float, whole: bool = False):
        self.events: asyncio.Queue = asyncio.Queue()
        held: dict[int, list[Event]] = {}  # a whole response's text so far, per choice

        def emit(event):  # on the engine's thread
            # A whole response needs its text only at the end: the loop hears of a choice once, not once a token.
            if whole and event.kind == "text":
                held.setdefault(event.index, []).append(event)
                return
            texts = held.pop(event.index, [])
            if texts:
                mailbox.post(self.events, Event("text", event.index, "".join(e.text for e in texts),
                                                [lp for e in texts for lp in e.logprobs]))
            mailbox.post(self.events, event)

        def emitter(first: int):
            # A sequence's index is its choice among its prompt's n (which its seed follows); the request's choice
            # index counts the choices of the prompts before it too.
            return emit if not first else lambda event: emit(dataclasses.replace(event, index=first + event.index))

        deadline = time.monotonic() + timeout
        self.engine, self.n = engine, n
        self.prompt_tokens = sum(len(prompt) for prompt in prompts)
        self.seqs = [Sequence(prompt, p, emitter(k * n), i, deadline)
                     for k, (prompt, p) in enumerate(zip(prompts, params)) for i in range(n)]
        self.open = len(self.seqs)  # choices not finished yet
        try:
            engine.submit(self.seqs)
        except EngineError as e:
            raise api_error(e) from None

    async def next(self) -> Event:
        """The next Event ("prompt", "text" or "done"); raises ApiError on an error."""
        event = await self.events.get()
        if event.kind == "error":
            self.cancel()
            raise api_error(event.error)
        if event.kind == "done":
            self.open -= 1
        return event

    def cancel(self):
        if self.open:
            self.engine.cancel(self.seqs)

    def usage(self, completion_tokens: int) -> dict:
        """OpenAI's usage: each prompt counted once, whatever its n (as its reuse, from its first choice)."""
        return usage(self.prompt_tokens, completion_tokens, sum(seq.reused for seq in self.seqs[::self.n]))

    async def collect(self, request: Request | None) -> list[dict]:
        """Wait for the whole result: per choice {"text", "reason", "tokens", "logprobs", "prompt_logprobs"}; a
        client that disconnects meanwhile cancels it."""
        choices = [{"text": "", "reason": None, "tokens": 0, "logprobs": [], "prompt_logprobs": None}
                   for _ in self.seqs]

        async def gather():
            while self.open:
                event = await self.next()
                choice = choices[event.index]
                if event.kind == "prompt":
                    choice["prompt_logprobs"] = event.logprobs
                    continue
                choice["text"] += event.text
                choice["logprobs"] += event.logprobs
                if event.kind == "done":
                    choice["reason"], choice["tokens"] = event.reason, event.tokens

        async def disconnected():
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(disconnected()) if request is not None else None
        try:
            await asyncio.wait([t for t in (work, watch) if t], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise ApiError(499, "client disconnected", code="client_disconnected")
            work.result()
            return choices
        finally:
            self.cancel()
            work.cancel()
            if watch:
                watch.cancel()


# ---- response shapes ---------------------------------------------------------------------------

# Characters at which str.splitlines() ends a line although SSE does not (only CR and LF end its lines): httpx's
# iter_lines and requests' iter_lines(decode_unicode=True) split there, cutting an event's JSON in two. JSON may
# write any character escaped, so events carry these escaped and stay one line to every reader.
SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def token_logprob(token: int, logprob: float) -> dict:
    """A token in chat's logprobs: its text, log-probability and UTF-8 bytes (a token may hold part of a character,
    whose text alone shows U+FFFD)."""
    raw = decode_bytes([token])
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


class ChoiceShape:
    """A request's choices in OpenAI's shapes: chat (a message or a delta; logprobs {"content": [...]}) or legacy
    completions (text; logprobs {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, the prompt's first
    with echo). As in OpenAI's, text offsets count characters of the prompt and the completion together. Choice i
    continues prompt i // n."""

    def __init__(self, chat: bool, logprobs: bool, prompts: list[list[int]], prompt_texts: list[str], n: int,
                 echo: bool):
        self.chat, self.logprobs, self.echo = chat, logprobs, echo
        self.prompts, self.prompt_texts, self.n = prompts, prompt_texts, n
        self.offsets: dict[int, int] = {}  # choice -> the next offset
        # choice -> the characters of its bytes so far, a token that ends inside a character holding it back
        self.decoders = collections.defaultdict(lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def whole(self, i: int, result: dict) -> dict:
        """Choice i of a finished request, from Job.collect's result."""
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": result["text"]},
                    "logprobs": self.format(i, result["logprobs"]), "finish_reason": result["reason"]}
        text, entries = result["text"], result["logprobs"]
        tokens = [e.token for e in entries]
        if self.echo:
            prompt, prompt_text = self.prompts[i // self.n], self.prompt_texts[i // self.n]
            text, tokens, entries = prompt_text + text, prompt + tokens, result["prompt_logprobs"] + entries
        return {"index": i, "text": text, "logprobs": self.format(i, entries, tokens),
                "finish_reason": result["reason"]}

    def chunk(self, event: Event) -> dict:
        """The choice of a streamed chunk: a "prompt" (echo), "text" or "done" event."""
        if event.kind == "prompt":
            text, tokens = self.prompt_texts[event.index // self.n], self.prompts[event.index // self.n]
        else:
            text, tokens = event.text, [e.token for e in event.logprobs]
        logprobs = self.format(event.index, event.logprobs, tokens)
        if self.chat:
            delta = {"content": text} if text else {}
            return {"index": event.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.reason}
        return {"index": event.index, "text": text, "logprobs": logprobs, "finish_reason": event.reason}

    def format(self, i: int, entries: list[Logprob | None], tokens: list[int] = ()) -> dict | None:
        """Choice i's logprobs of these tokens (entries: their Logprobs; None for the first prompt token)."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [{**token_logprob(e.token, e.logprob),
                                 "top_logprobs": [token_logprob(t, lp) for t, lp in e.top]} for e in entries]}
        texts, offsets = [decode([t]) for t in tokens], []
        self.offsets.setdefault(i, 0 if self.echo else len(self.prompt_texts[i // self.n]))
        for t in tokens:  # a token's offset: where its character starts, if it completes one begun before it
            offsets.append(self.offsets[i])
            self.offsets[i] += len(self.decoders[i].decode(decode_bytes([t])))
        return {"tokens": texts, "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [{decode([t]): lp for t, lp in e.top} if e else None for e in entries],
                "text_offset": offsets}


# ---- request schemas --------------------------------------------------------------------------

class Strict(BaseModel):
    # Strict types: "5" is not an int, true is not 1; unknown fields are ignored (clients send many).
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def text_parts_only(cls, content):
        """An image or audio part is refused in a message of its own (the union's errors would say that the
        content is not a string, and that the part is not a text part, and more)."""
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r}: this model reads text parts only "
                                 '({"type": "text", "text": ...})')
        return content


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # -1: all tokens, as 0 (vLLM's and llama.cpp's way to say it)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)  # vLLM's
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias, -100 to 100
    # Accepted only at their neutral values: the server does not implement them, and says so.
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (lm-evaluation-harness sends both)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    suffix: str | None = None  # accepted only empty, as the Sampling fields above
    best_of: int | None = None  # accepted only equal to n


class ChatRequest(Strict):
    message: str
    session_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    system: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # -1: all tokens, as 0 (vLLM's and llama.cpp's way to say it)
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)


class TokenizeRequest(Strict):
    text: str | None = None
    messages: list[Message] | None = None


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, schema: type[BaseModel], max_bytes: int):
    """The body parsed and validated; 413 past max_bytes, 400 for anything malformed."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {max_bytes}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {max_bytes} bytes", code="body_too_large")
    try:
        obj = json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    if re.search(rb"\\u[dD][89a-fA-F]", body):  # a surrogate escape: unpaired ones are not text (nor UTF-8)
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the body has an unpaired surrogate (\\ud800-\\udfff) in a string: not valid "
                                "Unicode text", code="invalid_json") from None
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors) -> ApiError:
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param=param,
                    code="invalid_value")


def as_dict(m: Message) -> dict:
    """The message as chat_format takes it: its text (text parts joined by newlines, as vLLM joins them), and the
    role system for developer."""
    text = m.content if isinstance(m.content, str) else join_text_parts(p.text for p in m.content)
    return {"role": "system" if m.role == "developer" else m.role, "content": text}


# ---- /chat sessions -----------------------------------------------------------------------------

class Sessions:
    """Conversations of /chat: at most max_sessions, each forgotten `ttl` seconds after its last use."""

    def __init__(self, max_sessions: int, ttl: float):
        self.max, self.ttl = max_sessions, ttl
        self.items: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def get(self, session_id: str | None) -> tuple[str, dict, bool]:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))["used"] < now - self.ttl:
            self.items.popitem(last=False)
        created = session_id is None or session_id not in self.items
        session_id = session_id or uuid.uuid4().hex
        if created:
            self.items[session_id] = {"messages": [], "lock": asyncio.Lock(), "used": now}
            while len(self.items) > self.max:
                self.items.popitem(last=False)
        session = self.items[session_id]
        session["used"] = now
        self.items.move_to_end(session_id)
        return session_id, session, created


def is_loopback(host: str | None) -> bool:
    """Whether a host name or address (no port) names this machine only: localhost, 127.0.0.0/8, ::1."""
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware refusing (403) what a web page the user opens could otherwise make this server do:
    - DNS rebinding (`allowed_hosts` given: the server is bound to a loopback address). A page of evil.example.com
      can resolve its own name to 127.0.0.1 and call the API; its requests still say `Host: evil.example.com`,
      so a Host that is neither a loopback name nor allowed is refused (Ollama refuses them for the same reason).
    - Another origin. Browsers add an Origin header to a page's cross-origin requests (and to every POST); one
      that is neither this server's own (its page, `/`) nor trusted (--cors-origins) is refused. CORS alone only
      keeps such a page from reading the reply: a form or a simple fetch would still reach the model, or write
      into a /chat conversation. Requests without an Origin (curl, SDKs, servers) pass.
    Plain ASGI, not an http middleware function: those hide a client's hang-up from the handler."""

    def __init__(self, app, trusted_origins: set[str], allowed_hosts: set[str] | None):
        self.app, self.trusted, self.allowed_hosts = app, trusted_origins, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refusal := self.refusal(scope["headers"])):
            message, code = refusal
            return await ApiError(403, message, "permission_error", code=code).response()(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
        """(message, code) of a request to refuse, or None."""
        hosts = [v.decode("latin-1") for k, v in headers if k == b"host"]
        host = hosts[0] if len(hosts) == 1 else ""  # none, or two that may disagree
        name = urlsplit("//" + host).hostname
        if self.allowed_hosts is not None and not (is_loopback(name) or name in self.allowed_hosts):
            return (f"Host {host!r} is not allowed: this server is bound to a loopback address and serves only "
                    "localhost (add a name with --allowed-hosts)", "host_not_allowed")
        origin = next((v.decode("latin-1") for k, v in headers if k == b"origin"), "")
        if origin and not (urlsplit(origin).netloc.lower() == host.lower() or origin in self.trusted
                           or "*" in self.trusted):
            return (f"Origin {origin!r} is not allowed: this server answers only its own page and the origins "
                    "given with --cors-origins", "origin_not_allowed")
        return None


# ---- the app ------------------------------------------------------------------------------------

class Server:
    """What the routes share: the config, the engine, the /chat sessions and the metrics. Each route is a method."""

    def __init__(self, cfg: ServeConfig, model, exit_on_failure: bool = False):
        model.eval()
        self.cfg, self.model = cfg, model
        self.block = model.config.block_size
        self.model_id = model_id(cfg.checkpoint)
        self.created_at = int(time.time())
        self.metrics = Metrics()
        self.exit_on_failure = exit_on_failure
        self.engine = Engine(model, cfg.max_batch, cfg.max_queue, reuse_tokens=cfg.prefix_cache_tokens,
                             observe=self.metrics.observe, on_failure=self.on_engine_failure)
        self.metrics.watch(self.engine, cfg.max_batch)
        self.sessions = Sessions(cfg.max_sessions, cfg.session_ttl)
        self.mailbox: Mailbox | None = None  # made on the event loop, when the app starts (lifespan)
        self.ready = False

    async def warm_up(self):
        try:
            job = Job(self.engine, self.mailbox, [[ASSISTANT]], [SamplingParams(max_tokens=2, temperature=0)], 1,
                      self.cfg.request_timeout)
            await job.collect(None)
            self.ready = True
            log.info("ready: %s (%s parameters, context %d, batch %d) on %s", self.model_id,
                     f"{self.model.num_params():,}", self.block, self.cfg.max_batch, self.engine.device)
        except Exception:
            log.exception("warm-up failed; /ready stays 503")

    def on_engine_failure(self, failure: str):
        """A device error left the engine unusable: /health and /ready now answer 503, and a server started by
        main() shuts down (exit code 1) so that its supervisor starts a new process with a working device."""
        self.ready = False
        if self.exit_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)

    async def check_key(self, request: Request):
        if not self.cfg.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- requests to the engine
    def sampling(self, body: Sampling | ChatRequest, prompt_tokens: int, max_tokens: int | None, stop=(),
                 logprobs: int | None = None, prompt_logprobs: bool = False) -> SamplingParams:
        block, cap = self.block, self.cfg.max_tokens_cap
        field = "prompt" if isinstance(body, CompletionRequest) else "message" if isinstance(body, ChatRequest) \
            else "messages"
        if max_tokens is None:  # what fits; legacy completions 16 at most, OpenAI's and vLLM's default there
            if prompt_tokens >= block:
                raise context_error(prompt_tokens, 1, block, field)
            max_tokens = min(block - prompt_tokens, cap, LEGACY_MAX_TOKENS if field == "prompt" else cap)
        elif prompt_tokens + max_tokens > block:
            raise context_error(prompt_tokens, max_tokens, block, field)
        elif max_tokens > cap:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {cap}", param="max_tokens",
                           code="invalid_value")
        temperature = 1.0 if body.temperature is None else body.temperature
        stop_tokens = frozenset() if isinstance(body, Sampling) and body.ignore_eos else STOP_IDS
        adjust = self.logit_adjustments(body) if isinstance(body, Sampling) else {}
        return SamplingParams(max_tokens, temperature, body.top_p or 1.0, max(body.top_k or 0, 0), body.seed,
                              tuple(stop), stop_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **adjust)

    @staticmethod
    def logit_adjustments(body: Sampling) -> dict:
        """The request's penalties and logit_bias as SamplingParams fields; logit_bias's keys are token ids."""
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if re.fullmatch(r"[0-9]{1,6}", key) else -1
            if not (0 <= token < N_VOCAB and -100 <= value <= 100):
                raise ApiError(400, f"logit_bias {{{key!r}: {value}}}: expected a token id from 0 to {N_VOCAB - 1} "
                                    "and a bias from -100 to 100", param="logit_bias", code="invalid_value")
            bias[token] = value
        return dict(frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
                    repetition_penalty=body.repetition_penalty or 1.0, logit_bias=tuple(sorted(bias.items())))

    def check_sampling(self, body: Sampling) -> tuple[int, list[str]]:
        neutral = {"tools": not body.tools, "tool_choice": body.tool_choice in (None, "none", "auto"),
                   "response_format": body.response_format in (None, {"type": "text"}),
                   "suffix": not getattr(body, "suffix", None),
                   "best_of": getattr(body, "best_of", None) in (None, body.n or 1)}
        unsupported = [name for name, ok in neutral.items() if not ok]
        if unsupported:
            raise ApiError(400, f"{unsupported[0]} is not supported by this server", param=unsupported[0],
                           code="unsupported_parameter")
        n, limit = body.n or 1, min(self.cfg.max_n, self.cfg.max_queue)  # n choices wait in the queue together
        if n > limit:
            raise ApiError(400, f"n={n} is over this server's limit of {limit}", param="n", code="invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings",
                           param="stop", code="invalid_value")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens",
                           code="invalid_value")
        return n, stop

    @staticmethod
    def check_logprobs(body: ChatCompletionRequest | CompletionRequest) -> tuple[int | None, bool]:
        """(how many alternatives each token's log-probability comes with, None for no logprobs; echo)."""
        if isinstance(body, ChatCompletionRequest):
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
            return (body.top_logprobs or 0) if body.logprobs else None, False
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens may be 0 only with echo (to score the prompt)", param="max_tokens",
                           code="invalid_value")
        return body.logprobs, bool(body.echo)

    async def generate(self, request: Request, body: ChatCompletionRequest | CompletionRequest,
                       prompts: list[list[int]], prompt_texts: list[str] = ("",)):
        """n choices for each prompt (a chat's one, or completions' list) and their texts (for echo)."""
        chat = isinstance(body, ChatCompletionRequest)
        n, stop = self.check_sampling(body)
        if n * len(prompts) > self.cfg.max_queue:  # could never be queued at once: a 429 would be retried in vain
            raise ApiError(400, f"{len(prompts)} prompts with n={n} are {n * len(prompts)} sequences, over this "
                                f"server's queue of {self.cfg.max_queue}", param="prompt", code="invalid_value")
        top, echo = self.check_logprobs(body)
        # With echo the engine reports the prompt (a prefill of all of it, no reuse) as an event of its own, which
        # the choice starts with, and its log-probabilities when asked.
        params = [self.sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens, stop, top, echo)
                  for prompt in prompts]
        if self.cfg.log_prompts:
            for prompt in prompts:
                log.info("prompt (%d tokens): %r", len(prompt), decode(prompt))
        job = Job(self.engine, self.mailbox, prompts, params, n, self.cfg.request_timeout, whole=not body.stream)
        shape = ChoiceShape(chat, top is not None, prompts, list(prompt_texts), n, echo)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(job, head, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await job.collect(request)
        choices = [shape.whole(i, c) for i, c in enumerate(results)]
        return {**head, "choices": choices,
                "usage": job.usage(sum(c["tokens"] for c in results))}

    async def stream(self, job: Job, head: dict, shape: ChoiceShape, include_usage: bool):
        """Server-sent events; when the client goes away Starlette cancels this generator, which cancels the job."""
        head = {**head, "object": "chat.completion.chunk" if shape.chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def sse(choice: dict) -> str:
            data = json.dumps({**head, "choices": [choice], **extra}, ensure_ascii=False)
            return f"data: {data.translate(SPLITLINES_BREAKS)}\n\n"

        completion_tokens = 0
        try:
            if shape.chat:
                for seq in job.seqs:
                    yield sse({"index": seq.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})
            while job.open:
                try:
                    event = await job.next()
                except ApiError as e:  # the status line has gone out: the error travels as an event
                    error = {"message": e.message, "type": e.type, "param": None, "code": e.code}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                completion_tokens += event.tokens
                yield sse(shape.chunk(event))
            if include_usage and not job.open:
                final = {**head, "choices": [], "usage": job.usage(completion_tokens)}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    # -- routes
    async def health(self):
        if self.engine.failure:
            raise ApiError(503, f"the engine failed: {self.engine.failure}", "server_error", code="engine_failed")
        return {"status": "ok"}

    async def page(self):
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    async def ready_route(self):
        await self.health()
        if not self.ready:
            raise ApiError(503, "warming up", "server_error", code="not_ready", headers={"Retry-After": "1"})
        return {"status": "ready", "model": self.model_id}

    async def metrics_text(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        return {"object": "list", "data": [await self.model_card(self.model_id)]}

    async def model_card(self, model_id: str):
        if model_id != self.model_id:
            raise ApiError(404, f"model {model_id!r} not found: this server serves {self.model_id!r}", param="model",
                           code="model_not_found")
        return {"id": self.model_id, "object": "model", "created": self.created_at, "owned_by": "parley",
                "context_length": self.block}

    async def chat_completions(self, request: Request):
        body = await read_json(request, ChatCompletionRequest, self.cfg.max_body_bytes)
        messages = [as_dict(m) for m in body.messages]
        try:  # any order of roles, as OpenAI's and vLLM's; after an assistant message last, a new one starts
            validate(messages, "messages")
        except ChatFormatError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        prompt, _ = render(messages, add_generation_prompt=True)
        return await self.generate(request, body, [prompt])

    async def completions(self, request: Request):
        body = await read_json(request, CompletionRequest, self.cfg.max_body_bytes)
        # One prompt (a string, or token ids) or a list of them, which batching clients send.
        one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if one else body.prompt
        if not prompts or not all(prompts):
            raise ApiError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
        ids = [encode(p) if isinstance(p, str) else p for p in prompts]
        if bad := next((t for p in ids for t in p if not 0 <= t < N_VOCAB), None):
            raise ApiError(400, f"prompt: token id {bad} is not a GPT-2 token id (0 to {N_VOCAB - 1})",
                           param="prompt", code="invalid_value")
        return await self.generate(request, body, ids, [p if isinstance(p, str) else decode(p) for p in prompts])

    async def tokenize(self, request: Request):
        body = await read_json(request, TokenizeRequest, self.cfg.max_body_bytes)
        if (body.text is None) == (body.messages is None):
            raise ApiError(400, "send either 'text' or 'messages'", param="text", code="invalid_value")
        if body.text is not None:
            ids = encode(body.text)
        else:
            try:
                ids, _ = render([as_dict(m) for m in body.messages],
                                add_generation_prompt=True)
            except ChatFormatError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        return {"tokens": ids, "count": len(ids), "max_context": self.block}

    async def chat(self, request: Request):
        body = await read_json(request, ChatRequest, self.cfg.max_body_bytes)
        if not body.message:
            raise ApiError(400, "message: must not be empty", param="message", code="invalid_value")
        session_id, session, created = self.sessions.get(body.session_id)
        async with session["lock"]:  # one turn at a time per conversation
            history = session["messages"]
            if body.system is not None:  # replaces the system message that opens the conversation
                history = ([{"role": "system", "content": body.system}] if body.system else []) + \
                          history[leading_system(history):]
            conversation = history + [{"role": "user", "content": body.message}]
            reserve = body.max_tokens or min(self.cfg.max_tokens_cap, self.block // 4)
            prompt, kept, dropped = fit_conversation(conversation, reserve, self.block)
            params = self.sampling(body, len(prompt), body.max_tokens)
            job = Job(self.engine, self.mailbox, [prompt], [params], 1, self.cfg.request_timeout, whole=True)
            (result,) = await job.collect(request)
            session["messages"] = kept + [{"role": "assistant", "content": result["text"]}]
        first = leading_system(conversation)
        return {"session_id": session_id, "new_session": created, "reply": result["text"],
                "finish_reason": result["reason"], "dropped_messages": dropped,
                "dropped": conversation[first: first + dropped],
                "usage": job.usage(result["tokens"])}


def model_id(checkpoint: str) -> str:
    """The model's name in the API: its run folder's (a run's best checkpoint is that run's model; a step
    checkpoint is named run/step_N), else "parley"."""
    from checkpoint import step_number
    path = Path(checkpoint).resolve() if checkpoint else Path()
    if path.name == "best":
        path = path.parent
    elif step_number(path) is not None:
        return f"{path.parent.name}/{path.name}"
    return path.name or "parley"


def usage(prompt_tokens, completion_tokens, cached_tokens):
    """OpenAI's usage; cached_tokens: prompt tokens taken from the prefix cache instead of prefilled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the one shape, and never a stack trace."""
    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        return validation_error(exc.errors() or [{"msg": "invalid request"}]).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return error_response(exc.status_code, str(exc.detail), code=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal server error", "server_error", code="internal_error")


def create_app(cfg: ServeConfig, model=None, exit_on_failure: bool = False) -> FastAPI:
    """The FastAPI app; `model` (a GPT) is loaded from cfg.checkpoint when not given. exit_on_failure: a device
    error stops the process (Server.on_engine_failure)."""
    if model is None:
        from checkpoint import load_checkpoint
        model, _, _ = load_checkpoint(cfg.checkpoint, device=pick_device(cfg.device))
    server = Server(cfg, model, exit_on_failure)

    @asynccontextmanager
    async def lifespan(app):
        server.mailbox = Mailbox(asyncio.get_running_loop())
        server.engine.start()
        warm = asyncio.ensure_future(server.warm_up())
        yield
        warm.cancel()
        server.engine.stop()

    app = FastAPI(title="parley", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.get("/health")(server.health)
    app.get("/", response_class=HTMLResponse)(server.page)
    api = APIRouter(dependencies=[Depends(server.check_key)])
    api.get("/ready")(server.ready_route)
    api.get("/metrics")(server.metrics_text)
    api.get("/v1/models")(server.models)
    api.get("/v1/models/{model_id:path}")(server.model_card)
    api.post("/v1/chat/completions")(server.chat_completions)
    api.post("/v1/completions")(server.completions)
    api.post("/tokenize")(server.tokenize)
    api.post("/chat")(server.chat)
    app.include_router(api)
    if cfg.cors_origins:  # any request header: the origins are trusted, and SDKs add their own (x-stainless-*)
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(RequestGuard, trusted_origins=set(cfg.cors_origins),
                       allowed_hosts={h.lower() for h in cfg.allowed_hosts} if is_loopback(cfg.host) else None)
    routes = {getattr(r, "path", None) for r in [*app.routes, *api.routes]}
    app.add_middleware(MetricsMiddleware, metrics=server.metrics, routes=routes)
    app.state.engine = server.engine  # for main's exit status after a device error, and for the tests
    return app


def check_config(cfg: ServeConfig) -> None:
    """Refuse limits the server cannot run with (a batch of 0 would start a server that never answers); the
    message names the field."""
    check_minimums(cfg, {"max_batch": 1, "max_queue": 1, "max_tokens_cap": 1, "max_n": 1, "max_body_bytes": 1,
                         "max_sessions": 1, "prefix_cache_tokens": 0, "port": 0})
    for name in ("request_timeout", "session_ttl"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"field '{name}' expects a number of seconds > 0, got {getattr(cfg, name)!r}")
    if cfg.port > 65535:
        raise ConfigError(f"field 'port' expects a value <= 65535, got {cfg.port}")


def main(argv: list[str]) -> None:
    cfg = ServeConfig()
    cli(argv, [cfg], usage=__doc__)
    cfg.api_key = cfg.api_key or os.environ.get("PARLEY_API_KEY", "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", cfg.host)
    from checkpoint import CheckpointError
    try:
        check_config(cfg)
        get_encoding()  # a missing or wrong BPE file stops the start, not every request after it
        app = create_app(cfg, exit_on_failure=True)
    except (CheckpointError, ConfigError, TokenizerNotFound) as e:  # ConfigError: a limit or --device, say
        fail(str(e))
    import uvicorn
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    if app.state.engine.failure:
        sys.exit(f"error: the engine failed ({app.state.engine.failure}); start the server again")


if __name__ == "__main__":
    main(sys.argv[1:])
