"""The decode engine: one loop that turns prompts into tokens, for the server, the terminal chat, evaluation and
GPT.generate. A library: no web framework here.

  params = SamplingParams(max_tokens=64, temperature=0)
  generate(model, [prompt_ids], params)                        # -> [[new ids]], batched, continuous
  for text in stream(Engine(model, max_batch=1), prompt, params): print(text, end="")
  engine = Engine(model, max_batch=16, max_queue=64, reuse_tokens=16384); engine.start()  # a server's thread

Decoding runs in named phases, as in gpt-fast: `step_forward` (one forward for a step: a token for every active
row, each at its own position, and the prompts of newly admitted sequences packed after them, so that a prefill
rides with the decode step instead of taking a forward of its own), `decode_one_step` (the decode rows alone
at fixed shapes, for torch.compile and CUDA graphs), `sample` (the output layer, then each row's choice with its
own parameters and generator) and the scheduler, `Engine.step`, which at each step admits waiting sequences into
free rows of the cache (continuous batching) and drops the ones whose client went away.

The KV cache is allocated once, (layers, rows, heads, context, head size), and a row keeps its place for the
whole sequence: a decode step writes one key and value per row at the row's position and attends to a view of
the cache (the first rows, up to the longest position), with no gathers and no host syncs inside the model.
Rows are handed out lowest first, so a lone sequence decodes as a batch of one. On the CPU the output layer
multiplies by a transposed copy of the embedding matrix, which a single row reads far faster than the
(vocabulary, width) layout (BENCHMARKS.md, "Serving"), and a group of equal rows (a --data_vocab model's ids that
never occurred) is computed once; on CUDA decoding runs in bf16 with the cache in bf16.
Greedy steps on a CPU skip most of the fp32 output layer, and their tokens are still the fp32 logits' argmax
(`greedy_ids`): where the layer has few distinct rows (a --data_vocab model) their exact logits decide; elsewhere,
on a CPU with bf16 dot products, a bf16 product screens the vocabulary and only the few ids its error bound leaves
get their fp32 logits. Sampled rows take each sequence's uniform number from its own generator, so a seeded
sequence draws the same whatever shares its batch, and are sampled where the logits are (`model.sample`); where
the layer has few distinct rows, over those rows, the group standing for its ids (`sample_distinct_rows`).
A step with penalties or a logit_bias takes the whole output layer and adjusts a copy of its logits
(`adjust_logits`).

Conversation reuse (`reuse_tokens`): when a sequence ends, the keys and values of its tokens go to a bounded
store (least recently used dropped first); a new prompt that starts with stored tokens (the next turn of a
conversation) copies them back and prefills only the rest. The engine raises its own errors (EngineError and
subclasses), which serve.py maps to HTTP statuses.
"""

import codecs
import collections
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from chat_format import cut_points, latest_turns, leading_system, render
from model import enable_tf32, inference_autocast, sample as sample_logits
from tokenizer import EOT_ID, N_VOCAB, decode_bytes

log = logging.getLogger("parley.engine")
# Any special token (<|endoftext|>, <|system|>, <|user|>, <|assistant|>, <|end|>) ends a reply.
STOP_IDS = frozenset(range(EOT_ID, N_VOCAB))
MAX_LOGPROBS = 20
MAX_REPETITION_PENALTY = 10


# ---- errors --------------------------------------------------------------------------------------------------

class EngineError(Exception):
    """A sequence the engine could not finish; the subclass says why."""


class QueueFull(EngineError):
    pass


class ContextTooLong(EngineError, ValueError):
    pass


class DeadlineExceeded(EngineError):
    pass


class EngineStopped(EngineError):
    pass


class GenerationFailed(EngineError):
    pass


def is_device_error(e: BaseException) -> bool:
    """A CUDA (accelerator) error: it poisons the device's context, so every later step would fail as well, and an
    asynchronous one may surface in another request's step."""
    return isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e)


# ---- what to generate ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it ends. temperature 0 is greedy; seed None draws from the global RNG.
    logprobs: None, or k (0-20): each generated token's log-probability and the k most likely alternatives';
    prompt_logprobs: the prompt tokens' too (the whole prompt is prefilled, no reuse), and max_tokens may be 0
    (score a text without generating: lm-evaluation-harness's loglikelihood)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one, which is never returned
    stop_tokens: frozenset[int] = STOP_IDS  # ids that end the sequence (kept in `tokens`, not in the text)
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # OpenAI's penalties on the ids generated so far: minus frequency_penalty times an id's count, minus
    # presence_penalty once it occurred. repetition_penalty (vLLM's and Hugging Face's): the logits of ids in the
    # prompt or the output divided by it where positive, multiplied where negative. logit_bias: (id, bias) pairs
    # added to those ids' logits. Logprobs are the model's own, before any of these.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise ValueError(f"max_tokens must be at least 1 (0 with prompt_logprobs), not {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling parameters: temperature {self.temperature} (>= 0), top_p {self.top_p} "
                             f"(0 < top_p <= 1), top_k {self.top_k} (>= 0)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, not {self.logprobs}")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2
                and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(f"bad penalties: frequency_penalty {self.frequency_penalty} and presence_penalty "
                             f"{self.presence_penalty} (-2 to 2), repetition_penalty {self.repetition_penalty} "
                             f"(above 0, at most {MAX_REPETITION_PENALTY})")
        for token, bias in self.logit_bias:
            if not (0 <= token < N_VOCAB and -100 <= bias <= 100):
                raise ValueError(f"bad logit_bias entry {token}: {bias} (ids 0 to {N_VOCAB - 1}, biases -100 to 100)")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1
                    or self.logit_bias)


@dataclass
class Logprob:
    """A token's log-probability under the model (log_softmax of its logits) and the `top` most likely ids'."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a sequence reports to its owner, in order: "prompt" (prompt_logprobs: `logprobs` of the prompt tokens,
    None for the first), "text" (new `text` and the `logprobs` of the tokens it completes), then "done" (`reason`
    "stop" or "length", `tokens` generated, the last `logprobs`) or "error" (`error`, an EngineError)."""
    kind: str
    index: int
    text: str = ""
    logprobs: list = field(default_factory=list)
    reason: str | None = None
    tokens: int = 0
    error: EngineError | None = None


class TextStream:
    """Token ids in, text out, for one generated sequence.

    GPT-2's byte-level BPE splits many characters (emoji, CJK) over several tokens, so each token's bytes
    (tokenizer.decode_bytes) go through an incremental UTF-8 decoder, which holds back an incomplete
    multi-byte sequence until its last byte arrives. Text that could be the start of a stop string is held
    back too, so a stop string is never sent, not even in part.
    """

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.pending = ""
        self.stopped = False  # a stop string was found: nothing more comes out

    def push(self, token: int) -> str:
        return self._feed(self.decoder.decode(decode_bytes([token])))

    def finish(self) -> str:
        """The rest of the text: an incomplete character at the very end becomes U+FFFD."""
        out = self._feed(self.decoder.decode(b"", final=True))
        if not self.stopped:
            out, self.pending = out + self.pending, ""
        return out

    def _feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out


class Sequence:
    """One sequence being generated. `emit(event)` hands its Events to the owner (from the engine's thread)."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit=None, index: int = 0,
                 deadline: float = float("inf")):
        self.prompt, self.params, self.index, self.deadline = list(prompt), params, index, deadline
        self.emit = emit or (lambda event: None)
        # Each sequence samples from its own generator, so a seeded request gives the same text whatever else
        # shares the batch. Choice i of a request with seed s uses seed s + i.
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2**64)
        self.text = TextStream(list(params.stop))
        self.tokens: list[int] = []  # generated ids
        self.pending_logprobs: list[Logprob] = []  # of tokens whose text is held back
        self.row = None
        self.reused = 0  # prompt tokens whose keys and values came from the prefix store
        self.budget = params.max_tokens  # tokens it may generate (set to what fits by Engine.submit)
        self.finish_reason = None
        self.cancelled = False  # set from another thread when the owner goes away
        self.arrived, self.first_token_at = time.monotonic(), None


# ---- the phases ----------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for `rows` sequences of up to `max_len` tokens, allocated once:
    (n_layer, rows, n_head, max_len, head size). Before each forward the engine sets where the new tokens' keys
    and values go (`write_rows` and `pos`, the same shape as the tokens) and what each query attends to: the first
    `n` rows of the cache, one query each, up to `kv_len` positions under `mask` ((n, 1, 1, kv_len), None: all of
    them), then each of `chunks`, (offset, length, row, end, mask): a prompt's tokens packed after the decode
    rows' (a step of `step_forward`), attending to their row's first `end` positions under a causal (length, end)
    mask. Without chunks the tokens are (n, T), row i's in row i (a step of decode rows alone)."""

    def __init__(self, cfg, rows: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, rows, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, not a select per access
        self.row_ids = torch.arange(rows, device=device)[:, None]
        self.rows, self.max_len = rows, max_len
        self.n, self.write_rows, self.pos, self.kv_len, self.mask, self.chunks = 0, None, None, 0, None, []

    def attend(self, layer: int, q, k, v):
        """Write the new tokens' keys and values k, v (B, T, nh, hs) at their positions, then attend with q
        (B, nh, T, hs) to the cached ones: (B, nh, T, hs)."""
        k_cache, v_cache = self.layers[layer]
        if k.dtype != k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache[self.write_rows, :, self.pos] = k
        v_cache[self.write_rows, :, self.pos] = v
        if not self.chunks:
            return attend_rows(q, k_cache, v_cache, slice(0, self.n), self.kv_len, self.mask)
        parts = []
        if self.n:  # the decode rows' queries, one a row: (n, nh, 1, hs) and back
            y = attend_rows(q[0, :, : self.n].transpose(0, 1)[:, :, None], k_cache, v_cache, slice(0, self.n),
                            self.kv_len, self.mask)
            parts.append(y[:, :, 0].transpose(0, 1)[None])
        for offset, length, row, end, mask in self.chunks:
            parts.append(attend_rows(q[:, :, offset: offset + length], k_cache, v_cache, slice(row, row + 1), end,
                                     mask))
        return torch.cat(parts, dim=2)


def attend_rows(q, k_cache, v_cache, rows: slice, end: int, mask):
    """q attending to the first `end` cached positions of the cache rows `rows` of one layer, under `mask`."""
    keys, values = k_cache[rows, :, :end], v_cache[rows, :, :end]
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def decode_precision(device: torch.device, weight_dtype: torch.dtype):
    """(the KV cache's dtype, the autocast decoding runs under): on CUDA bf16 autocast (TF32 for what it leaves in
    fp32) and a bf16 cache, the dtype the forward pass emits, so that attention never casts the cache; elsewhere the
    weights' dtype, without autocast."""
    if device.type != "cuda":
        return weight_dtype, inference_autocast(device)
    enable_tf32()
    return torch.bfloat16, inference_autocast(device)


def output_layer(model):
    """The output layer as a function of hidden states (rows, C). On the CPU, from copies of the weights laid out
    for it (decode_copies): one row (a single stream) reads W.T stored contiguous, several times faster than
    nn.Linear's layout; several rows go through oneDNN with W packed for its kernel, where x @ W.T's matrix product
    on a few rows is much slower (BENCHMARKS.md, Serving)."""
    weight, token_map = model.lm_head.weight, getattr(model, "token_map", None)
    if token_map is not None:  # a model in training (GPT.restrict_output): one row per id again
        return lambda x: model.lm_head(x)[..., token_map]
    if weight.device.type != "cpu":
        return model.lm_head
    copies = decode_copies(model)

    def logits(x):
        out = distinct_logits(copies, x)
        return out if copies.expand is None else out.index_select(1, copies.expand)
    return logits


@dataclass
class DecodeCopies:
    """The output layer's distinct rows W[ids] (decode_copies), laid out for decoding."""
    weight_t: torch.Tensor  # W[ids].T, contiguous: one row's logits
    packed: torch.Tensor | None  # W[ids] packed for oneDNN's fp32 kernel: several rows' logits
    expand: torch.Tensor | None  # each id's row among W[ids] (None: all of W): every id's logit from those of ids
    screen: torch.Tensor | None  # the rows of the real ids among ids, in bf16, packed for oneDNN: greedy_ids's screen
    screen_ids: np.ndarray  # the id of each real row among ids (the first rows, and the screen's)
    max_norm: float  # the largest norm of those rows: the screen's error bound
    # With a group kept as one row (expand): how many real ids each of the rows stands for (the group's first: all
    # of the group's), and those ids row after row, model.sample's positions over the rows (sample_distinct_rows)
    counts: torch.Tensor | None
    spread_ids: np.ndarray | None
    key: tuple


def decode_copies(model) -> DecodeCopies:
    """The CPU's copies of the output layer for decoding, made once and kept on the model until its weights change
    (their version or storage; GPT.train drops them, as an optimizer may update them without a version).

    Equal rows have equal logits, so where the largest group of them is most of the vocabulary (a --data_vocab
    model's ids that never occurred in its data, GPT.shared_rows) it keeps only its first: the output layer then
    costs what the ids the model was trained on cost, and the argmax's ties still go to the first id. A small group
    (a random model's zeroed special tokens) is kept whole: spreading the logits back to every id costs more than a
    few rows save (BENCHMARKS.md, Serving)."""
    weight = model.lm_head.weight
    key = (weight.data_ptr(), weight._version)
    if getattr(model, "decode_weights", None) is None or model.decode_weights.key != key:
        w = weight.detach()
        ids, expand = torch.arange(len(w)), None
        shared = model.shared_rows()
        if 2 * len(shared) > len(w):
            keep = torch.ones(len(w), dtype=torch.bool)
            keep[shared[1:]] = False
            ids, expand = keep.nonzero().squeeze(1), keep.cumsum(0) - 1
            expand[shared] = int(expand[shared[0]])  # every id of the group reads its first's row
            w = w[ids]
        real = ids < N_VOCAB
        counts = spread_ids = None
        if expand is not None:
            first, group = int(expand[shared[0]]), shared[shared < N_VOCAB].numpy()
            counts = real.double()
            counts[first] = len(group)
            spread_ids = np.concatenate([ids[:first][real[:first]], group, ids[first + 1:][real[first + 1:]]])
        model.decode_weights = DecodeCopies(w.t().contiguous(), packed_for_onednn(w), expand,
                                            packed_for_onednn(w[real], bf16=True), ids[real].numpy(),
                                            w[real].norm(dim=1).max().item(), counts, spread_ids, key)
    return model.decode_weights


def cpu_decode_copies(model, x) -> DecodeCopies | None:
    """decode_copies where the choice of tokens from hidden states x may use them: an fp32 model on the CPU, not in
    training (restrict_output); None elsewhere."""
    if x.device.type != "cpu" or getattr(model, "token_map", None) is not None or x.dtype != torch.float32:
        return None
    return decode_copies(model)


def distinct_logits(copies: DecodeCopies, x):
    """The logits of the output layer's distinct rows (copies.weight_t's columns) for hidden states x (rows, C)."""
    return onednn_linear(x, copies.packed) if copies.packed is not None and len(x) > 1 else x @ copies.weight_t


ONEDNN_ROWS = 16  # the batch size oneDNN lays the packed weights out for; any number of rows can use them


def fast_bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX) and this torch has oneDNN: greedy_ids's screen."""
    return torch.backends.mkldnn.is_available() and any(
        getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)() for isa in ("avx512_bf16", "amx_tile"))


def packed_for_onednn(weight, bf16: bool = False):
    """weight (V, C) packed for oneDNN's linear kernel, in fp32, or in bf16 for greedy_ids's screen; None where this
    torch has no oneDNN, bf16 where the CPU has no bf16 dot products (AVX512-BF16 or AMX: elsewhere oneDNN converts
    to fp32 and gains little). The ops are private (torch.compile's CPU backend uses them), so the packed copy is
    checked on a probe before it is trusted: fp32 must equal x @ W.T, bf16 stay within SCREEN_ERROR's bound."""
    if weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available() or (bf16 and not fast_bf16_cpu()):
        return None
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), ONEDNN_ROWS)
        probe = torch.linspace(-1, 1, 2 * weight.size(1)).view(2, -1)
        got, want = onednn_linear(probe.to(dtype), packed).float(), probe @ weight.t()
        if bf16:
            ok = bool(((got - want).abs() <= SCREEN_ERROR * probe.norm(dim=1, keepdim=True) * weight.norm(dim=1)).all())
        else:
            ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        return packed if ok else None
    except (AttributeError, RuntimeError):  # a build without the ops
        return None


def onednn_linear(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# bf16 keeps 8 significant bits: rounding x, a row w of W and the result to it each err by at most 2^-8 of
# sum |x_i w_i|, and the kernel's fp32 accumulation by far less, so a bf16 logit is within 3 * 2^-8 * |x| |w| <
# SCREEN_ERROR * |x| |w| of the fp32 one (Cauchy-Schwarz). The winner's bf16 logit is then within twice that of
# the best bf16 logit.
SCREEN_ERROR = 2.0 ** -6
SCREEN_MAX_CANDIDATES = 64  # per row on average; past that the screen saves nothing and the fp32 logits decide
# Up to this many distinct real rows (a --data_vocab model's, decode_copies) their exact fp32 product costs less
# than the screen's product and candidates, and it never leaves a step to the caller's fp32 logits.
EXACT_MAX_ROWS = 4096


def greedy_ids(model, x) -> list[int] | None:
    """Each row's most likely real id from its hidden state x (n, C): the argmax of the fp32 logits, ties to the
    first, found without computing all of them. On the CPU, where the output layer has few distinct rows, their
    exact fp32 logits decide (each kept row is the first id of its group). Otherwise a bf16 product (half the
    bytes, twice the arithmetic rate) screens the vocabulary: every id whose bf16 logit is within twice the error
    bound of the row's best may be the winner, and only those get their fp32 logit. None where there is neither
    (CUDA, a model in training, a CPU without fast bf16) or the screen leaves too many candidates (the caller then
    takes the fp32 logits)."""
    copies = cpu_decode_copies(model, x)
    if copies is None:
        return None
    real = len(copies.screen_ids)  # the real ids come first among the kept rows, in id order
    if real <= EXACT_MAX_ROWS:
        return copies.screen_ids[distinct_logits(copies, x)[:, :real].numpy().argmax(axis=1)].tolist()
    if copies.screen is None:
        return None
    approx = onednn_linear(x.to(torch.bfloat16), copies.screen).float().numpy()
    hidden = x.detach().numpy()
    margin = (2 * SCREEN_ERROR * copies.max_norm) * np.linalg.norm(hidden, axis=1)
    rows, cols = np.divmod(np.flatnonzero(approx >= (approx.max(axis=1) - margin)[:, None]), approx.shape[1])
    ids = copies.screen_ids[cols]
    counts = np.bincount(rows, minlength=len(x))
    if counts.min() == 0 or len(ids) > SCREEN_MAX_CANDIDATES * len(x):  # NaN, or logits too close to screen
        return None
    exact = np.einsum("ij,ij->i", model.lm_head.weight.detach().numpy()[ids], hidden[rows])
    order = np.lexsort((ids, -exact, rows))  # by row, then the highest logit, then the lowest id
    firsts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return ids[order[firsts]].tolist()


def step_forward(model, cache: KVCache, decode: list[tuple[int, int, int] | None],
                 chunks: list[tuple[int, list[int], int, int]]):
    """One forward over every new token of a step, packed into one row of the batch when prompts join (else each
    decode row is a row of the batch): a token for each of the first len(decode) rows of the cache ((token,
    position, prev), or None for a free row among them, which computes padding), then each prompt chunk (row,
    tokens, start, prev) at positions start.. of its row (prev: the token before the chunk, for smear). The chunks
    ride with the decode rows instead of taking a forward of their own, and packing pads none of them. Returns the
    final hidden states (N, C), decode rows first."""
    device = cache.k.device
    kv_len = max((d[1] + 1 for d in decode if d is not None), default=0)
    # Padding writes past any prompt's end (a prompt leaves room for a token), where nothing reads before a write.
    decode = [d or (0, cache.max_len - 1, 0) for d in decode]
    tokens, positions, prevs = [t for t, _, _ in decode], [p for _, p, _ in decode], [b for _, _, b in decode]
    rows = list(range(len(decode)))
    for row, chunk, start, prev in chunks:
        tokens += chunk
        positions += range(start, start + len(chunk))
        prevs += [prev] + chunk[:-1]
        rows += [row] * len(chunk)
    # One host-to-device copy (each is a sync on CUDA)
    table = torch.tensor([tokens, positions, prevs, rows], device=device)
    idx, pos, prev, write_rows = (table[:, None] if chunks else table[:, :, None]).unbind(0)
    n, flat = len(decode), table[1]
    cache.n, cache.write_rows, cache.pos, cache.kv_len = n, write_rows, pos, kv_len
    # One row attending to everything up to its own position needs no mask.
    cache.mask = None if n <= 1 else (torch.arange(kv_len, device=device) <= flat[:n, None])[:, None, None]
    cache.chunks, offset = [], n
    for row, chunk, start, _ in chunks:
        end = start + len(chunk)
        mask = torch.arange(end, device=device) <= flat[offset: offset + len(chunk), None]
        cache.chunks.append((offset, len(chunk), row, end, mask))
        offset += len(chunk)
    try:
        return model.hidden_states(idx, cache, pos, prev).flatten(0, 1)
    finally:
        cache.chunks = []


def decode_one_step(model, cache: KVCache, decode: list[tuple[int, int, int]]):
    """The static engine's step: a new token (token, position, prev) for each of the first len(decode) rows of the
    cache, as in `step_forward`, computed over all rows and the whole context, so that every step has the same
    shapes (for torch.compile and CUDA graphs); rows past len(decode) compute padding. Returns the hidden state of
    every row's new token (rows, C), from which `sample` chooses."""
    decode = decode + [(0, 0, 0)] * (cache.rows - len(decode))
    idx, pos, prev = torch.tensor(decode, device=cache.k.device).T[:, :, None].unbind(0)  # one copy
    cache.n, cache.pos, cache.kv_len, cache.write_rows = cache.rows, pos, cache.max_len, cache.row_ids
    cache.mask = (torch.arange(cache.max_len, device=cache.k.device) <= pos)[:, None, None]
    return model.hidden_states(idx, cache, pos, prev)[:, -1]


def token_logprobs(logits, tokens: list[int], top: int) -> list[Logprob]:
    """Each row's log_softmax value of its token and its `top` most likely (real) ids, from logits (n, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()  # long: [] too
    if top:
        values, ids = torch.topk(logp[:, :N_VOCAB], top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [Logprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops)]


def most_likely(logits) -> list[int]:
    """Each row's most likely real id (the first of equal ones, as torch.argmax) from logits (n, V). On the CPU
    through NumPy, whose argmax over one row is several times faster than torch's."""
    real = logits[:, :N_VOCAB]
    if real.device.type == "cpu":
        return real.numpy().argmax(axis=-1).tolist()
    return real.argmax(dim=-1).tolist()


def sampled_together(device) -> bool:
    """Whether a step's sampled rows go through one call of model.sample (a GPU: one launch for all) or a row at a
    time (a CPU, where one row's logits stay in its cache and a batch's do not: BENCHMARKS.md, Serving)."""
    return device.type != "cpu"


def uniforms(seqs: list[Sequence]) -> torch.Tensor:
    """Each sequence's number in [0, 1) to sample with (float64, on the CPU), from its own generator, a CPU one: a
    seeded sequence draws the same numbers on every device and whatever shares its batch. A greedy sequence draws
    none (its number is 0)."""
    return torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float64) if s.params.temperature > 0
                      else torch.zeros(1, dtype=torch.float64) for s in seqs])


def sample_distinct_rows(model, hidden, seqs: list[Sequence]) -> list[int] | None:
    """Each sequence's next token from the output layer's distinct rows, where they are few (decode_copies: a
    --data_vocab model's, on the CPU): model.sample over those rows, each standing for the ids that share it, draws
    from the same distribution as over every id's logit, at a fraction of the cost (BENCHMARKS.md, Serving). All
    rows in one call: their logits fit in the cache. None elsewhere."""
    copies = cpu_decode_copies(model, hidden)
    if copies is None or copies.counts is None:
        return None
    positions = sample_logits(distinct_logits(copies, hidden), *knobs(seqs), uniform=uniforms(seqs),
                              counts=copies.counts)
    return copies.spread_ids[positions.numpy()].tolist()


def knobs(seqs: list[Sequence]) -> tuple[list[float], list[int], list[float]]:
    """The sequences' temperatures, top_k and top_p, one per row, as model.sample takes them."""
    return ([s.params.temperature for s in seqs], [s.params.top_k for s in seqs], [s.params.top_p for s in seqs])


def adjust_logits(logits, seqs: list[Sequence]) -> torch.Tensor:
    """A copy of logits (n, V) with each sequence's penalties and logit_bias applied (SamplingParams), or logits
    itself when no sequence has any."""
    adjusting = [i for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if not adjusting:
        return logits
    logits = logits.clone()
    for i in adjusting:
        p, row, seq = seqs[i].params, logits[i], seqs[i]
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.prompt).union(seq.tokens)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if seq.tokens and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(seq.tokens).unique(return_counts=True)
            row[ids.to(row.device)] -= (p.frequency_penalty * counts + p.presence_penalty).to(row.device, row.dtype)
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            row[list(ids)] += torch.tensor(biases, device=row.device, dtype=row.dtype)
    return logits


def sample(model, hidden, seqs: list[Sequence]) -> tuple[list[int], list[Logprob | None]]:
    """The next token of each sequence from the hidden state of its last token (n, C), greedy rows together, and
    its Logprob where the sequence asked for logprobs. Without logprobs and penalties, greedy_ids (all greedy) or
    sample_distinct_rows, where they can."""
    if all(s.params.logprobs is None and not s.params.adjusts_logits for s in seqs):
        greedy = all(s.params.temperature == 0 for s in seqs)
        tokens = greedy_ids(model, hidden) if greedy else sample_distinct_rows(model, hidden, seqs)
        if tokens is not None:
            return tokens, [None] * len(seqs)
    logits = output_layer(model)(hidden).float()
    scores = adjust_logits(logits, seqs)
    tokens = [0] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    if len(greedy) == len(seqs):
        tokens = most_likely(scores)
    elif greedy:
        for i, t in zip(greedy, most_likely(scores[greedy])):
            tokens[i] = t
    drawn = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if drawn:
        uniform = uniforms([seqs[i] for i in drawn])  # the rows are sampled where the logits are
        rows = scores if len(drawn) == len(seqs) else scores[drawn]
        parts = [slice(None)] if sampled_together(rows.device) else [slice(j, j + 1) for j in range(len(drawn))]
        for part in parts:
            ids = sample_logits(rows[part], *knobs([seqs[i] for i in drawn[part]]),
                                uniform=uniform[part].to(rows.device))
            for i, t in zip(drawn[part], ids.tolist()):
                tokens[i] = t
    logprobs: list[Logprob | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        top = max(seqs[i].params.logprobs for i in wanted)
        for i, lp in zip(wanted, token_logprobs(logits[wanted], [tokens[i] for i in wanted], top)):
            lp.top = lp.top[: seqs[i].params.logprobs]
            logprobs[i] = lp
    return tokens, logprobs


# ---- conversation reuse --------------------------------------------------------------------------------------

def common_prefix(a: tuple, b: tuple) -> int:
    """Length of the common prefix of two tuples (binary search over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixStore:
    """Keys and values of finished sequences, for prompts that start with the same tokens: at most `max_tokens`
    tokens in all, the least recently used entry dropped first. An entry that a newer one extends is dropped."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.size = max_tokens, 0
        self.entries: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()  # tokens -> (k, v)

    def put(self, tokens: tuple, k, v) -> None:
        """k, v: (n_layer, n_head, len(tokens), head size), copied by the caller."""
        if len(tokens) > self.max_tokens:
            return
        for old in [t for t in self.entries if t == tokens[: len(t)]]:
            self._drop(old)
        # Room is made before the entry goes in, so that `size` keeps its bound at every moment, also for a
        # reader on another thread while the stepping thread puts.
        while self.size + len(tokens) > self.max_tokens:
            self._drop(next(iter(self.entries)))
        self.entries[tokens] = (k, v)
        self.size += len(tokens)

    def match(self, prompt: tuple) -> tuple[int, tuple | None]:
        """(n, (k, v)) of the entry sharing the longest prefix with prompt, n <= len(prompt) - 1 (the last prompt
        token is always prefilled, for its logits); (0, None) when none shares a token."""
        best, entry = 0, None
        for tokens in self.entries:
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > best:
                best, entry = n, tokens
        if entry is None:
            return 0, None
        self.entries.move_to_end(entry)
        return best, self.entries[entry]

    def _drop(self, tokens: tuple) -> None:
        del self.entries[tokens]
        self.size -= len(tokens)


# ---- the scheduler -------------------------------------------------------------------------------------------

class Engine:
    """Continuous batching over a KV cache of `max_batch` rows. Callers `submit` sequences (thread-safe); each
    `step` drops cancelled or overdue sequences, admits waiting ones into free rows and, in one forward,
    prefills them and decodes one token for every active row. `start` runs the steps on a thread of its own (a
    server); `generate` and `stream` call `step` themselves. `observe(kind, value)` hears of "prompt_tokens",
    "reused_tokens", "completion_tokens", "cancelled", "ttft" and "tpot" (seconds). After a device error the
    engine stops for good (`failure` says why) and calls `on_failure(failure)`: only a new process has a working
    device again."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 1 << 30, reuse_tokens: int = 0,
                 static: bool = False, observe=None, on_failure=None):
        model.eval()
        self.model, self.max_queue, self.static = model, max_queue, static
        self.observe = observe or (lambda kind, value: None)
        self.on_failure = on_failure or (lambda failure: None)
        self.failure: str | None = None
        self.device = model.wte.weight.device
        dtype, self.autocast = decode_precision(self.device, model.wte.weight.dtype)
        self.max_len = model.config.block_size
        self.cache = KVCache(model.config, max_batch, self.max_len, self.device, dtype)
        self.free = list(range(max_batch))  # a heap: the lowest free row first
        self.context: list[list[int]] = [[] for _ in range(max_batch)]  # each row's tokens in the cache
        self.active: dict[int, Sequence] = {}  # row -> sequence; touched only by the stepping thread
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.store = PrefixStore(reuse_tokens) if reuse_tokens > 0 else None
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = None

    # -- the callers' side
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences; raises ContextTooLong if a prompt leaves no room, QueueFull past max_queue."""
        for seq in seqs:
            # A sequence that generates needs a position for its first new token; a scored one (max_tokens 0) not.
            if not seq.prompt or len(seq.prompt) + min(seq.params.max_tokens, 1) > self.max_len:
                raise ContextTooLong(f"a prompt of {len(seq.prompt)} tokens leaves no room in the context "
                                     f"({self.max_len})")
            seq.budget = min(seq.params.max_tokens, self.max_len - len(seq.prompt))
        with self.cond:
            if self.stopping:
                raise EngineStopped(f"the engine failed ({self.failure})" if self.failure
                                    else "the engine is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting")
            self.waiting.extend(seqs)
            self.cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences at the next step (thread-safe)."""
        for seq in seqs:
            seq.cancelled = True
        with self.cond:
            self.cond.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="parley-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- the stepping side
    @torch.inference_mode()
    def step(self) -> None:
        """Drop what is gone, admit what fits, decode one token for every active row. A failure (a bug, out of
        memory) ends the sequences involved with GenerationFailed and the engine goes on; a device error stops it."""
        with self.cond:
            self._drop_gone()
            new = [self.waiting.popleft() for _ in range(min(len(self.free), len(self.waiting)))]
        try:
            with self.autocast:
                self._forward(new)
                if self.static and self.active:
                    self._decode_static()
        except Exception as e:
            log.exception("engine step failed")
            for seq in {*new, *self.active.values()}:
                self._finish(seq, error=GenerationFailed("internal error during generation"))
            if is_device_error(e):
                self._fail(f"{type(e).__name__}: {e}")

    def _fail(self, failure: str):
        """Stop for good after a device error: refuse new work, end the waiting sequences, tell the owner."""
        log.critical("device error, the engine stops: %s", failure)
        with self.cond:
            self.failure, self.stopping = failure, True
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.cond.notify()
        for seq in waiting:
            seq.emit(Event("error", seq.index, error=EngineStopped(f"the engine failed ({failure})")))
        self.on_failure(failure)

    def _run(self):
        while True:
            with self.cond:
                while not self.waiting and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    break
            self.step()
        for seq in list(self.waiting) + list(self.active.values()):
            seq.emit(Event("error", seq.index, error=EngineStopped("the server is shutting down")))

    def _drop_gone(self):
        """End sequences that were cancelled or ran past their deadline (lock held)."""
        now = time.monotonic()
        for seq in list(self.active.values()) + list(self.waiting):
            if seq.cancelled or now > seq.deadline:
                error = None if seq.cancelled else DeadlineExceeded("the request ran past its deadline")
                self.observe("cancelled", 1)
                if seq.row is None:
                    self.waiting.remove(seq)
                    if error:
                        seq.emit(Event("error", seq.index, error=error))
                else:
                    self._finish(seq, error=error, keep=False)

    def _forward(self, new: list[Sequence]):
        """One forward for the step: the next token of every active row and the prompts of the new sequences
        (with a static cache the active rows decode apart, in `_decode_static`), then each one's choice."""
        decoding = [] if self.static else list(self.active.values())
        decode = [None] * (max(self.active) + 1 if decoding else 0)
        for seq in decoding:
            decode[seq.row] = self._feed(seq)
        chunks = [self._place(seq) for seq in new]
        if not decode and not chunks:
            return
        x = step_forward(self.model, self.cache, decode, chunks)
        rows = [seq.row for seq in decoding]
        hidden = [x[: len(rows)] if rows == list(range(len(rows))) else x[rows]] if decoding else []
        offset = len(decode)
        for seq, (_, chunk, _, _) in zip(new, chunks):
            if seq.params.prompt_logprobs:  # the whole prompt was prefilled (no reuse)
                logits = output_layer(self.model)(x[offset: offset + len(chunk) - 1]).float()
                entries = [None] + token_logprobs(logits, seq.prompt[1:], seq.params.logprobs or 0)
                seq.emit(Event("prompt", seq.index, logprobs=entries))
            offset += len(chunk)
            hidden.append(x[offset - 1: offset])
            if seq.budget == 0:
                seq.finish_reason = "length"
                self._finish(seq)
        generating = [i for i, seq in enumerate(decoding + new) if seq.budget > 0]
        if generating:
            x = torch.cat(hidden)
            self._advance([(decoding + new)[i] for i in generating],
                          x if len(generating) == len(x) else x[generating])

    def _place(self, seq: Sequence) -> tuple[int, list[int], int, int]:
        """Give seq a free row, with the stored keys and values of its prompt's longest stored prefix; the chunk
        left to prefill: (row, tokens, start, the token before them)."""
        seq.row = heapq.heappop(self.free)
        self.active[seq.row] = seq
        seq.reused = self._reuse(seq) if self.store and not seq.params.prompt_logprobs else 0
        self.context[seq.row] = list(seq.prompt)
        self.observe("prompt_tokens", len(seq.prompt))
        return seq.row, seq.prompt[seq.reused:], seq.reused, seq.prompt[seq.reused - 1] if seq.reused else 0

    def _reuse(self, seq: Sequence) -> int:
        """Copy the longest stored prefix of seq's prompt into its row; the number of tokens reused."""
        n, kv = self.store.match(tuple(seq.prompt))
        if n:
            self.cache.k[:, seq.row, :, :n] = kv[0][:, :, :n]
            self.cache.v[:, seq.row, :, :n] = kv[1][:, :, :n]
            self.observe("reused_tokens", n)
        return n

    def _feed(self, seq: Sequence) -> tuple[int, int, int]:
        """seq's next input, (token, position, prev), now part of its row's context."""
        context = self.context[seq.row]
        entry = (seq.tokens[-1], len(context), context[-1])
        context.append(seq.tokens[-1])
        return entry

    def _decode_static(self):
        decode = [(0, 0, 0)] * (max(self.active) + 1)
        for seq in self.active.values():
            decode[seq.row] = self._feed(seq)
        hidden = decode_one_step(self.model, self.cache, decode)
        self._advance(list(self.active.values()), hidden[list(self.active)])

    def _advance(self, seqs: list[Sequence], hidden):
        now = time.monotonic()
        tokens, logprobs = sample(self.model, hidden, seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.tokens.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.observe("ttft", now - seq.arrived)
            if token in seq.params.stop_tokens:
                text, reason = seq.text.finish(), "stop"
            else:
                if logprob is not None:
                    seq.pending_logprobs.append(logprob)
                text = seq.text.push(token)
                reason = "stop" if seq.text.stopped else "length" if len(seq.tokens) >= seq.budget else None
                if reason == "length":
                    text += seq.text.finish()
            if text:
                seq.emit(Event("text", seq.index, text, seq.pending_logprobs))
                seq.pending_logprobs = []
            if reason:
                seq.finish_reason = reason
                self._finish(seq)
        self.observe("completion_tokens", len(seqs))

    def _finish(self, seq: Sequence, error: EngineError | None = None, keep: bool = True):
        """Free seq's row (its tokens kept for reuse), then report its end (done, or `error` if given): the row is
        free before the client hears, so a reader on another thread never sees a finished request still active."""
        row, seq.row = seq.row, None
        if row is not None and self.active.get(row) is seq:
            del self.active[row]
            heapq.heappush(self.free, row)
            context = self.context[row]
            if self.store is not None and keep and error is None:
                n = len(context)
                self.store.put(tuple(context), self.cache.k[:, row, :, :n].clone(),
                               self.cache.v[:, row, :, :n].clone())
        if error is not None:
            seq.emit(Event("error", seq.index, error=error))
        elif seq.finish_reason:
            seq.emit(Event("done", seq.index, logprobs=seq.pending_logprobs, reason=seq.finish_reason,
                           tokens=len(seq.tokens)))
            if len(seq.tokens) > 1:
                self.observe("tpot", (time.monotonic() - seq.first_token_at) / (len(seq.tokens) - 1))


# ---- synchronous use -----------------------------------------------------------------------------------------

def generate(model, prompts: list[list[int]], params: SamplingParams, max_batch: int = 64) -> list[list[int]]:
    """The new tokens of each prompt (ending with its stop token, if one came), decoded with continuous batching
    over at most max_batch rows. A sequence stops at the end of the context too. Sequence i samples with seed
    params.seed + i."""
    if not prompts:
        return []
    engine = Engine(model, max_batch=min(max_batch, len(prompts)))
    seqs = [Sequence(p, params, index=i) for i, p in enumerate(prompts)]
    engine.submit(seqs)
    while engine.busy():
        engine.step()
    if engine.failure:
        raise GenerationFailed(engine.failure)
    return [s.tokens for s in seqs]


def stream(engine: Engine, prompt: list[int], params: SamplingParams):
    """Text pieces of one sequence as they are decoded, on an engine nobody else steps (no thread)."""
    events = []
    seq = Sequence(prompt, params, emit=events.append)
    engine.submit([seq])
    try:
        while engine.busy():
            engine.step()
            for event in events:
                if event.kind == "error":
                    raise event.error
                yield event.text
            events.clear()
    finally:  # the caller stopped early (Ctrl-C): the next step drops the sequence
        engine.cancel([seq])


def fit_conversation(messages: list[dict], reserve: int, block_size: int):
    """(prompt ids, messages kept, number dropped): the oldest messages dropped (chat_format.latest_turns) until the
    prompt leaves `reserve` tokens of the context for the reply. When even the last exchange does not fit, it alone
    (with the leading system messages): a prompt too long, which the caller refuses."""
    fitted = latest_turns(messages, block_size - reserve, add_generation_prompt=True)
    if fitted is None:
        head, last = leading_system(messages), cut_points(messages)[-1]
        fitted = messages[:head] + messages[last:], last - head
    kept, dropped = fitted
    return render(kept, add_generation_prompt=True)[0], kept, dropped
