"""The optimizer for train.py: `make_optimizer(model, cfg, device)`, AdamW alone or Muon with AdamW.

--optimizer adamw (the default): AdamW on every parameter, weight decay on matrices and embeddings only.
--optimizer muon: Muon for the hidden matrices (the attention and MLP weights of every block) and AdamW for
everything else: the token embeddings (also the output layer: they are tied), the learned positions, LayerNorm
gains, biases and smear. This is the split of modded-nanogpt and nanochat. Muon orthogonalizes each matrix's
momentum: a layer's gradient is dominated by a few directions, and the orthogonalized update moves all of them
at the same rate, the rare ones too. An embedding is a table of rows looked up one at a time, and a gain or a
bias is a vector: neither has that structure, so AdamW keeps them.

The training loop sets one learning rate on every parameter group (the schedule's value, the rate of AdamW's
parameters); a Muon group multiplies it by its `lr_scale`, muon_lr / lr, so Muon's rate follows the same
schedule from its own peak. Under DDP the gradients are averaged before the step, so every process computes
the same update for every matrix.
"""

import torch

from config import ConfigError, TrainConfig
from model import GPT

OPTIMIZERS = ("adamw", "muon")
# The quintic Newton-Schulz iteration of Keller Jordan's Muon: coefficients chosen to bring every singular value
# near 1 in 5 steps rather than exactly to 1, which its author found trains as well.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def check_optimizer(cfg: TrainConfig) -> None:
    """Refuse optimizer settings that cannot train; the message names the field."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"field 'optimizer' expects one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.optimizer == "muon":
        if cfg.lr <= 0:
            raise ConfigError(f"field 'lr' expects a value > 0 with optimizer muon (Muon's rate is muon_lr / lr "
                              f"times the schedule's), got {cfg.lr!r}")
        if cfg.muon_lr < 0:
            raise ConfigError(f"field 'muon_lr' expects a value >= 0, got {cfg.muon_lr!r}")
        if not 0 <= cfg.muon_momentum < 1:
            raise ConfigError(f"field 'muon_momentum' expects a value in [0, 1), got {cfg.muon_momentum!r}")


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device):
    """AdamW (cfg.optimizer adamw) or MuonAdamW (muon) over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(p) for p in hidden_matrices(model)} if cfg.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in hidden]
    # Weight decay on matrices and embeddings only; biases and LayerNorm gains are not shrunk towards zero.
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass over the parameters (CUDA and CPU).
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))
    if cfg.optimizer == "adamw":
        return adamw
    muon = Muon([p for p in params if id(p) in hidden], lr=cfg.lr, lr_scale=cfg.muon_lr / cfg.lr,
                momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return MuonAdamW(muon, adamw)


def hidden_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The matrices of the transformer blocks (attention's c_attn and c_proj, the MLP's c_fc and c_proj)."""
    return [p for p in model.h.parameters() if p.dim() == 2 and p.requires_grad]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """G's nearest semi-orthogonal matrix, approximately (U S' V^T with S' near 1, for G = U S V^T): the quintic
    Newton-Schulz iteration X <- P(X X^T) X, P(A) = a I + b A + c A^2, on X = G / |G|. On CUDA in bf16, as the
    references run it. Elsewhere in fp32 (CPUs without bf16 units emulate bf16 matmuls, several times slower, and
    fp32 keeps a CPU run exactly reproducible), and on the Gram matrix (gram_iteration), since on a CPU the
    multiply-adds are Muon's cost (BENCHMARKS.md, "Demo v4.3")."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # the spectral norm is at most the Frobenius norm: now <= 1, where the iteration converges
    x = newton_schulz(x, steps) if x.is_cuda else gram_iteration(x, steps) @ x
    return x.T if tall else x


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The textbook iteration on a wide X."""
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def gram_iteration(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The product of the Newton-Schulz iteration's P's, from the Gram matrix A = X X^T alone: each P is a polynomial
    in the first A, so they commute and A <- P(A)^2 A; X's long side is then multiplied twice (here and by the
    caller) instead of ten times. The same result to rounding, which this form amplifies along the smallest singular
    values (it works with their squares): fine in fp32, not in bf16, where the textbook loop runs."""
    a, b, c = NEWTON_SCHULZ
    gram = x @ x.T
    eye, product = torch.eye(gram.size(0), dtype=gram.dtype, device=gram.device), None
    for step in range(steps):
        p = a * eye + b * gram + c * gram @ gram
        product = p if product is None else p @ product
        if step < steps - 1:  # the last P needs no Gram matrix after it
            gram = p @ gram @ p
    return product


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for 2-D parameters: SGD with Nesterov momentum whose update is orthogonalized
    (`orthogonalize`) and scaled by sqrt(max(1, rows / cols)), with decoupled weight decay.

    torch.optim.Muon (torch 2.9 and later) computes the same update; this one is ours because it runs the
    iteration in fp32 on the CPU (torch's is always bf16), follows the loop's schedule through `lr_scale`, and
    keeps one state format on every torch version (torch's group options differ between 2.11 and 2.13).
    """

    def __init__(self, params, lr: float, lr_scale: float = 1.0, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, lr_scale=lr_scale, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon trains matrices only (2-D parameters)")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"] * group["lr_scale"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = orthogonalize(p.grad.lerp(buf, momentum), group["ns_steps"])  # Nesterov: a look ahead
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


class MuonAdamW:
    """Muon and AdamW as the one optimizer the training loop steps, saves and restores.

    `param_groups` lists AdamW's groups, then Muon's; `state_dict()` is {"adamw": ..., "muon": ...}, each the
    standard optimizer state (tensors and numbers, so a checkpoint loads with torch.load(weights_only=True)).
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:  # a property: load_state_dict replaces the optimizers' group lists
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, closure=None):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError("the checkpoint's optimizer state is not Muon's and AdamW's: resume with the "
                             "--optimizer the run was started with")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
