"""A GPT-2-style decoder, written from its parts; its attention reads and writes engine.py's KV cache when decoding.

Module names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, ...) so weights map one to one;
we use nn.Linear where GPT-2 used Conv1D, so those matrices are transposed on import and export.

One departure is optional: `rope` replaces the learned position embeddings (wpe) with rotary ones, which
rotate queries and keys by their position so that attention scores depend on relative distance. Small models
trained briefly learn to look back and copy ("induction") far sooner with it. The other, `smear`, adds to each
token's input embedding a learned share (per channel) of the previous token's: the first layer can then match
"the token before this one" directly, the half of induction a model otherwise has to learn first
(previous-token attention), and the tiny model's pretraining loss falls further once it leaves its plateau.
BENCHMARKS.md has the measurements ("Training throughput" for rope, "Demo" for smear). Models with either have no
GPT-2 equivalent, so they cannot be exported to Hugging Face.

The training loss is the plain cross-entropy of GPT.forward; `faster_loss`, below the model, computes the same
loss faster where it can (a restricted output layer, GPT.restrict_output; skipped masked rows and a chunked
output layer on the CPU).
"""

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, ModelConfig
from tokenizer import N_VOCAB

# A temperature under this samples as greedy: dividing logits by it would overflow float32, and the distribution
# is already the argmax's (vLLM draws the same line).
MIN_TEMPERATURE = 1e-5


def rotary_tables(head_dim: int, max_len: int, base: float = 10000.0):
    """cos and sin of position * frequency, (max_len, head_dim // 2) each: the angles rope rotates by."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotate the pairs (first half, second half) of x (B, T, nh, hs) by the angles cos/sin (B, T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def dropout(x, p: float, training: bool):
    """F.dropout, without its call where it changes nothing (evaluation, p 0): decoding runs many small steps."""
    return F.dropout(x, p) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head)
        k = k.view(B, T, self.n_head, C // self.n_head)
        v = v.view(B, T, self.n_head, C // self.n_head)
        if rope is not None:  # (cos, sin) at each token's position; cached keys are stored rotated
            q, k = rotate(q, *rope), rotate(k, *rope)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # decoding (engine.py): this step's keys and values go into the cache, q attends to the cache
            y = cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.dropout = cfg.dropout

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new"); matching it keeps HF interop exact.
        return dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


def check_shape(cfg: ModelConfig) -> None:
    """Refuse a shape the model cannot have, naming the field (ValueError, which the scripts print)."""
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"field '{name}' expects a value >= 1, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head or (cfg.rope and cfg.n_embd // cfg.n_head % 2):
        raise ValueError(f"field 'n_head': n_embd {cfg.n_embd} must split into {cfg.n_head} heads of a whole"
                         f"{' and even (rope rotates pairs)' if cfg.rope else ''} number of dimensions")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"field 'dropout' expects a value in [0, 1), got {cfg.dropout}")
    if cfg.vocab_size < N_VOCAB:
        raise ValueError(f"field 'vocab_size' {cfg.vocab_size} is smaller than the tokenizer's {N_VOCAB} ids")


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_shape(cfg)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)
        self.smear = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.smear else None  # starts as a no-op
        if cfg.rope:
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived, not saved in checkpoints
            self.register_buffer("rope_sin", sin, persistent=False)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        for name in ("output_ids", "rest_ids", "target_index", "output_bias", "token_map"):  # restrict_output's
            self.register_buffer(name, None, persistent=False)  # buffers: they follow .to(device)
        self.apply(self._init_weights)
        self.register_state_dict_post_hook(_full_embedding_rows)
        self.register_load_state_dict_pre_hook(_compact_embedding_rows)
        self.decode_weights = None  # engine.decode_copies: the output layer laid out for decoding

    def train(self, mode: bool = True):
        if mode:  # training changes the weights, not always visibly (a fused optimizer keeps their _version)
            self.decode_weights = None
        return super().train(mode)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_projection", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (tied weights), one embedding row per id (restrict_output or not);
        non_embedding leaves out the position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if self.token_map is not None:  # the ids that share the last row
            n += (len(self.rest_ids) - 1) * self.config.n_embd
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) at sequences of seq_len tokens (default: the context): 6N
        for the matmuls plus attention's 12*L*C*T. N counts the output layer as wide as restrict_output left it."""
        cfg, T = self.config, seq_len or self.config.block_size
        n = self.num_params()
        if self.output_ids is not None:
            n -= (cfg.vocab_size - len(self.output_ids) - 1) * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T

    def embed(self, idx):
        """The token embeddings of ids idx (any shape): through token_map after restrict_output."""
        return self.wte(idx if self.token_map is None else self.token_map[idx])

    def hidden_states(self, idx, cache=None, pos=None, prev=None):
        """Final-LayerNorm hidden states (B, T, C). With a cache (engine.KVCache), `pos` (B, T) gives each token's
        position and `prev` (B, T) the token before each (for smear): a step of the engine may pack the tokens of
        several sequences into one row."""
        if pos is None:
            if idx.size(1) > self.config.block_size:
                raise ValueError(f"sequence of {idx.size(1)} tokens is longer than the context ({self.config.block_size})")
            pos = torch.arange(idx.size(1), device=idx.device)[None].expand(idx.size(0), -1)
        x = self.embed(idx)
        if self.smear is not None:
            # Each position also sees the previous token (none at position 0): within idx, or with a cache the
            # token `prev` names.
            if cache is None:
                before = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
            else:
                before = self.embed(prev) * (pos[..., None] > 0)
            x = x + self.smear * before
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = self.rope_cos[pos], self.rope_sin[pos]
        x = dropout(x, self.config.dropout, self.training)
        for i, block in enumerate(self.h):
            x = block(x, rope, cache, i)
        return self.ln_f(x)

    def restrict_output(self, ids) -> None:
        """Train over the token ids `ids` only (None: over all ids again, the default).

        For a corpus that uses a small part of the 50K ids this makes the embedding and the output layer, most of a
        small model's cost, far cheaper, and the loss stays the exact full-vocabulary cross-entropy. All other ids
        share one embedding row (set to the mean of their rows here), so their logits are one logit plus
        log(their number): the embedding becomes a table of len(ids) + 1 rows, `token_map` gives each id its row,
        and the optimizer updates only those rows. state_dict() still has one row per id (the shared row
        repeated), and load_state_dict() takes such a state: checkpoints, fine-tuning, evaluation and generation
        need to know nothing of this.
        """
        weight = self.full_embedding()
        if ids is None:
            self.output_ids = self.rest_ids = self.target_index = self.output_bias = self.token_map = None
            self._set_embedding(weight)
            return
        device, vocab = weight.device, self.config.vocab_size
        keep = torch.zeros(vocab, dtype=torch.bool, device=device)
        keep[torch.as_tensor(ids, device=device)] = True
        self.output_ids, self.rest_ids = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        n = len(self.output_ids)
        # target id -> its row in the restricted output; -2 for the shared ids, which are never targets
        self.target_index = torch.full((vocab,), -2, dtype=torch.long, device=device)
        self.target_index[self.output_ids] = torch.arange(n, device=device)
        self.token_map = self.target_index.clamp(min=0)
        self.token_map[self.rest_ids] = n
        self.output_bias = torch.zeros(n + 1, device=device)
        self.output_bias[-1] = math.log(len(self.rest_ids))  # the one logit stands for that many equal ones
        self._set_embedding(torch.cat([weight[self.output_ids], weight[self.rest_ids].mean(0, keepdim=True)]))

    def full_embedding(self) -> torch.Tensor:
        """The embedding with one row per id (detached), restricted (restrict_output) or not."""
        weight = self.wte.weight.detach()
        return weight if self.token_map is None else weight[self.token_map]

    def _set_embedding(self, rows) -> None:
        """A new embedding table (tied to the output layer) holding `rows`."""
        self.wte = nn.Embedding(len(rows), self.config.n_embd, device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            self.wte.weight.copy_(rows)
        self.lm_head = nn.Linear(self.config.n_embd, len(rows), bias=False, device=rows.device, dtype=rows.dtype)
        self.lm_head.weight = self.wte.weight
        self.decode_weights = None

    def shared_rows(self) -> torch.Tensor:
        """The ids of the largest group of identical embedding rows, if it has at least two (else empty): after a
        --data_vocab pretraining, the ids that never occurred, which restrict_output set equal and training kept
        equal. Fine-tuning restricts its loss to the other ids (finetune.py): the same loss, far cheaper."""
        _, group, counts = torch.unique(self.full_embedding(), dim=0, return_inverse=True, return_counts=True)
        rows = (group == counts.argmax()).nonzero().squeeze(1)
        return rows if len(rows) > 1 else rows[:0]

    def forward(self, idx, targets=None):
        """Logits (B, T, V), or with targets (B, T) the mean cross-entropy over the targets that are not -1."""
        x = self.hidden_states(idx)
        if targets is None:
            logits = self.lm_head(x)
            return logits if self.token_map is None else logits[..., self.token_map]  # one logit per id
        if self.output_ids is not None or cpu_speedups(x):
            return faster_loss(self, x, targets)  # the same loss, computed faster
        logits = self.lm_head(x).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_tokens=(), seed: int | None = None, max_batch: int = 64) -> list[list[int]]:
        """Continue each prompt (a list of ids; prompts may differ in length) with engine.py's decode loop.

        temperature 0 is greedy; prompt i samples with seed + i. Returns the new tokens of each prompt, ending at
        (and including) the first stop token, or after max_new_tokens, or when the context is full.
        """
        from engine import SamplingParams, generate
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_tokens=frozenset(stop_tokens))
        return generate(self, prompts, params, max_batch)


# ---- the loss, computed faster ---------------------------------------------------------------------------

def _full_embedding_rows(model: "GPT", state: dict, prefix: str, local_metadata) -> None:
    """state_dict() after restrict_output: one embedding row per id again (the shared ids' row repeated)."""
    if model.token_map is not None:
        state[prefix + "wte.weight"] = state[prefix + "lm_head.weight"] = model.full_embedding()


def _compact_embedding_rows(model: "GPT", state: dict, prefix: str, *args) -> None:
    """load_state_dict() after restrict_output takes one row per id (a checkpoint's) and keeps the model's rows:
    the output ids', then the shared ids' (the first of them: in such a state they are all equal)."""
    if model.token_map is None or state.get(prefix + "wte.weight") is None:
        return
    full = state[prefix + "wte.weight"]
    if len(full) == model.config.vocab_size:
        rows = torch.cat([full[model.output_ids.to(full.device)], full[model.rest_ids[:1].to(full.device)]])
        state[prefix + "wte.weight"] = rows
        if prefix + "lm_head.weight" in state:
            state[prefix + "lm_head.weight"] = rows


def cpu_speedups(x) -> bool:
    """Whether the loss skips the rows without a target and (training) chunks the output layer: on the CPU, eagerly.
    Picking the rows reads the target mask on the host: on a GPU that is a sync, under torch.compile a graph break
    and a data-dependent shape, so there every row goes through one full-shape cross-entropy (as in nanoGPT)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def faster_loss(model: "GPT", x, targets):
    """GPT.forward's loss for hidden states x (B, T, C), computed faster: with a restricted output (restrict_output),
    over the output ids' logits and one that stands for all the other (equal) rows; on the CPU (cpu_speedups),
    over the rows whose target is set, training through LinearCrossEntropy. No host sync off the CPU."""
    x, targets = x.flatten(0, 1), targets.flatten()
    weight, bias = model.lm_head.weight, None
    if model.output_ids is not None:  # the output ids' rows, then the shared row
        bias = model.output_bias
        targets = torch.where(targets != -1, model.target_index[targets.clamp(min=0)], -1)
        if cpu_speedups(x):
            if bool((targets < -1).any()):
                raise ValueError("a target token is not among the ids the loss is restricted to (restrict_output)")
        else:  # checked on the device, without waiting for it
            torch._assert_async((targets >= -1).all(), "a target token is not among the ids of restrict_output")
    if cpu_speedups(x):
        keep = targets != -1
        if not bool(keep.all()):
            x, targets = x[keep], targets[keep]
        if torch.is_grad_enabled():
            return LinearCrossEntropy.apply(x, weight, targets, bias)
    logits = (x @ weight.t()).float()
    return F.cross_entropy(logits if bias is None else logits + bias, targets, ignore_index=-1)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T + bias (x: (N, C), weight: (V, C), bias: constant (V,) or None)
    against targets (N,), for training
    on the CPU: a chunk of rows at a time, with the gradients computed in the forward pass. The (N, V) logits and
    their gradient never exist in full: each chunk's stay in cache instead of streaming gigabytes through memory,
    and allocations stay small enough to be reused (see BENCHMARKS.md, training throughput)."""

    CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 logits per chunk

    @staticmethod
    def forward(ctx, x, weight, targets, bias=None):
        xf, wf = x.float(), weight.float()
        n, chunk = x.size(0), max(1, LinearCrossEntropy.CHUNK_ELEMENTS // weight.size(0))
        grad_x, grad_w = torch.empty_like(xf), torch.zeros_like(wf)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for i in range(0, n, chunk):
                xc, tc = xf[i:i + chunk], targets[i:i + chunk]
                logits = xc @ wf.t()
                logp = torch.log_softmax(logits if bias is None else logits.add_(bias), dim=1)
                loss -= logp.gather(1, tc[:, None]).sum()
                probs = logp.exp_()  # d(sum of losses)/d(logits) = softmax - one_hot(target)
                probs[torch.arange(len(tc), device=x.device), tc] -= 1
                torch.mm(probs, wf, out=grad_x[i:i + chunk])
                grad_w.addmm_(probs.t(), xc)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.n, ctx.dtypes = n, (x.dtype, weight.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None


def enable_tf32() -> None:
    """Let fp32 matmuls on CUDA use TF32 (bf16 autocast leaves some in fp32; cuDNN's convolutions use it by default).
    Through set_float32_matmul_precision, which keeps torch's two sets of settings in step: setting only the newer
    fp32_precision ones makes every later read of the legacy ones (allow_tf32, get_float32_matmul_precision) a
    mixed-API error, and Inductor still reads them when it compiles a matmul."""
    torch.set_float32_matmul_precision("high")


def inference_autocast(device: torch.device):
    """The precision of decoding and evaluation: bf16 autocast on CUDA, as training uses there; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def pick_device(name: str = "auto") -> torch.device:
    """The device for `--device`: auto is CUDA when available, else Apple's MPS, else the CPU. A name that is not
    one of those, or a device this machine lacks, is a ConfigError naming the field."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"field 'device' expects auto, cpu, cuda, cuda:N or mps, got {name!r}")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus <= (device.index or 0):
        seen = f"only {gpus} CUDA GPU(s), numbered from 0" if gpus else "no CUDA GPU (a CPU build, or no driver)"
        raise ConfigError(f"field 'device' is {name!r}, but this torch sees {seen}; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"field 'device' is {name!r}, but MPS is not available here; use --device auto or cpu")
    return device


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, uniform=None, counts=None):
    """Next token ids (B,) from logits (B, V). temperature, top_k and top_p are one value for every row or a list of
    one per row (a row at temperature 0 is greedy); uniform (B,), each row's number in [0, 1) to draw with, else
    drawn from generator. Padding ids of the vocabulary are never chosen.

    counts (V,): the logits are those of distinct rows, row j standing for counts[j] ids that share its logit (0:
    never chosen), and the result is a position among all those ids, listed row after row (ties go to the first).
    The ids are sampled as if each had its own logit: a --data_vocab model's never-seen ids, most of the vocabulary,
    then cost one logit (engine.sample)."""
    B, V = logits.shape
    temps, ks, ps = ([x] * B if isinstance(x, (int, float)) else list(x) for x in (temperature, top_k, top_p))
    logits = logits.float().clone()
    if counts is None:  # each id is its own row, and the padding ids are none
        logits[:, N_VOCAB:] = float("-inf")
        starts = None
    else:
        counts = counts.to(device=logits.device, dtype=torch.float64)
        logits.masked_fill_(counts == 0, float("-inf"))
        starts = (counts.cumsum(0) - counts).long()  # the position of each row's first id
    greedy = [t < MIN_TEMPERATURE for t in temps]
    if all(greedy):
        return _position(logits.argmax(dim=-1), None, starts)
    logits = logits / torch.tensor([1.0 if g else t for g, t in zip(greedy, temps)], device=logits.device)[:, None]
    if any(ks):
        # kth: the logit of the k-th likeliest id, found as the first of the sorted rows by which k ids are counted;
        # where there is none (top_k 0, or fewer ids than k), every id stays
        kmax = min(max(ks), V)
        values, best = torch.topk(logits, kmax, dim=-1)
        counted = torch.arange(1.0, kmax + 1, dtype=torch.float64, device=logits.device).repeat(B, 1) \
            if counts is None else counts[best].cumsum(dim=-1)
        want = torch.tensor([[k or float("inf")] for k in ks], dtype=torch.float64, device=logits.device)
        at = torch.searchsorted(counted, want)
        kth = values.gather(1, at.clamp(max=kmax - 1)).masked_fill_(at == kmax, float("-inf"))
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits if counts is None else logits + counts.log().float(), dim=-1)  # a row's ids' mass
    kept = None if counts is None else counts.expand(B, -1)
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if rows:
        top_p = torch.tensor([ps[i] for i in rows], device=probs.device)[:, None]
        probs[rows], n = nucleus(probs[rows], top_p, counts)
        if kept is not None:
            kept = kept.clone()
            kept[rows] = n.to(kept.dtype)
    if uniform is None:
        uniform = torch.rand(B, generator=generator, dtype=torch.float64,
                             device=generator.device if generator is not None else probs.device)
    drawn, offset = draw(probs, uniform, kept)
    if any(greedy):
        is_greedy = torch.tensor(greedy, device=drawn.device)
        drawn, offset = torch.where(is_greedy, logits.argmax(dim=-1), drawn), offset.masked_fill(is_greedy, 0)
    return _position(drawn, offset, starts)


def _position(rows, offset, starts):
    """sample's result: row `rows` itself where each id is its own row, else the position of its ids' offset-th."""
    if starts is None:
        return rows
    return starts[rows] + (0 if offset is None else offset)


def nucleus(probs, top_p, counts=None):
    """(probs, kept): probs (B, V) kept on each row's smallest set of likeliest ids whose mass reaches top_p (a
    number, or (B, 1): one per row), zero elsewhere (not renormalised); the likeliest entry is always kept, however
    small top_p (one under float32's range reads as 0). With counts (V,), entry j is the mass of
    counts[j] equally likely ids (sample), of which the nucleus may keep a part, and kept says how many; else each
    entry is one id, and kept is None. A trained model's nucleus is usually a small part of the vocabulary, so the
    top few hundred entries are sorted first, and all of them only where they fall short: sorting all of GPT-2's
    vocabulary costs more than the rest of a sampled decode step (BENCHMARKS.md, Serving)."""
    per_id = probs if counts is None else probs / counts.clamp(min=1).to(probs.dtype)  # in the logits' order
    for k in (min(probs.size(-1), 256), probs.size(-1)):
        _, ids = torch.topk(per_id, k, dim=-1)  # largest first
        top = probs.gather(-1, ids)
        before = top.cumsum(dim=-1) - top  # the mass of the likelier ids
        if bool((before[:, -1:] >= top_p).all()):  # every row's nucleus ends within the top k
            break
    first = torch.arange(ids.size(-1), device=ids.device) == 0
    if counts is None:
        return torch.zeros_like(probs).scatter_(-1, ids, torch.where((before < top_p) | first, top, 0.0)), None
    each = per_id.gather(-1, ids)  # the probability of one of the entry's ids
    # the i-th id of an entry (i = 0, 1, ...) is kept while before + i * each < top_p
    n = torch.where(each > 0, torch.ceil((top_p - before) / each.clamp(min=1e-30)), 0.0)
    n = torch.minimum(n.clamp(min=first.to(n.dtype)), counts[ids].to(probs.dtype))
    return torch.zeros_like(probs).scatter_(-1, ids, n * each), torch.zeros_like(probs).scatter_(-1, ids, n)


def draw(probs, uniform, counts=None):
    """(entry, offset): one entry per row with probability probs (B, V) (not necessarily summing to 1), as
    torch.multinomial draws, by inverting the cumulative sum at the row's uniform number in [0, 1) (B,): several
    times faster on a CPU at GPT-2's vocabulary (BENCHMARKS.md, Serving); and, where an entry stands for
    counts (B, V) equally likely ids, which of them (0 where it is one id). An entry of probability 0 is never
    drawn: the point stays under the total."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.minimum(uniform.to(cdf)[:, None] * total, total * (1 - 2.0 ** -52))
    entry = torch.searchsorted(cdf, u, right=True)
    if counts is None:
        return entry.squeeze(-1), torch.zeros_like(entry.squeeze(-1))
    n = counts.gather(-1, entry).clamp(min=1)
    mass = probs.double().gather(-1, entry)
    into = (u - (cdf.gather(-1, entry) - mass)) / mass  # how far into the entry's mass, in [0, 1)
    offset = torch.minimum((into * n).floor(), n - 1).clamp(min=0).long()
    return entry.squeeze(-1), offset.squeeze(-1)
