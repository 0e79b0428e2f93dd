"""Saving and loading checkpoints: ours, and Hugging Face GPT-2 directories (import and export).

A checkpoint is a directory:
  config.json        model config, tokenizer, provenance (step, tokens, data fingerprint, git commit),
                     and the size and sha256 of every other file, so truncation or corruption is caught;
  model.safetensors  the weights (no pickle);
  train_state.pt     optional: the optimizer's and the gradient scaler's state and the run's counters (step,
                     tokens, elapsed time, pace: train.TrainState) for an exact resume (the data order and the
                     dropout RNG are functions of the seed and the step), loaded with torch.load(weights_only=True).
A directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint under a real name. A training run keeps its checkpoints as RUN/step_NNNNNNN and
RUN/best; every loader also accepts the run folder and picks `best`, else the newest step.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils._pytree import tree_map_only

from atomic import replace_dir
from config import ModelConfig, ConfigError, model_config_from_dict, to_dict
from model import GPT
from tokenizer import CHAT_SPECIAL_TOKENS, EOT_ID, N_VOCAB, TOKENIZER_NAME

FORMAT = "parley-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and what is wrong."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_weights(state: dict, path: Path, metadata: dict | None = None) -> None:
    """save_file, leaving the file with the permissions of any other file written here: safetensors writes a
    private temporary file (readable by its owner only) and renames it into place."""
    with open(path, "wb") as f:  # a file created as usual gets the mode the umask allows
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    save_file(state, path, metadata=metadata)
    os.chmod(path, mode)


def save_checkpoint(path, model: GPT, provenance: dict | None = None, train_state: dict | None = None) -> Path:
    """Write `model` (unwrapped, not DDP/compiled) and optionally the training state to directory `path`. (Training
    writes through write_checkpoint, from weights gathered on the CPU, which a background thread may save.)"""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_checkpoint(path, model.config, weights, provenance, train_state)


def cpu_copy(tree):
    """`tree` (dicts, lists and tuples of tensors and other values) with every tensor copied to the CPU, a tensor
    that appears twice (the tied wte and lm_head) copied once: training can go on changing the originals while
    write_checkpoint writes the copy in the background."""
    copies = {}

    def copy(t):
        if id(t) not in copies:
            copies[id(t)] = t.detach().to("cpu", copy=True)
        return copies[id(t)]
    return tree_map_only(torch.Tensor, copy, tree)


def write_checkpoint(path, model_config: ModelConfig, weights: dict, provenance: dict | None = None,
                     train_state: dict | None = None, extra: dict | None = None) -> Path:
    """save_checkpoint's writing, from a model's config and its weights and training state on the CPU."""
    final = Path(path)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}
    _save_weights(state, tmp / "model.safetensors")  # lm_head is tied to wte: stored once
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    config = {
        "format": FORMAT, "version": VERSION,
        "model": to_dict(model_config),
        "tokenizer": {"name": TOKENIZER_NAME, "eot_id": EOT_ID, "special_tokens": CHAT_SPECIAL_TOKENS},
        "provenance": {"git_commit": git_commit(), **(provenance or {})},
        **(extra or {}),
        "files": files,
    }
    _write_json(tmp / "config.json", config)
    replace_dir(tmp, final)
    return final


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and ".tmp-" not in d.name and ".old-" not in d.name


def step_number(path) -> int | None:
    """N of a periodic checkpoint's folder name step_N (ASCII digits only), else None."""
    match = re.fullmatch(r"step_([0-9]+)", Path(path).name)
    return int(match[1]) if match else None


def step_checkpoints(run_dir) -> list[Path]:
    """The run's periodic checkpoints (RUN/step_NNNNNNN), oldest first: by the number, which from step 10,000,000 on
    is longer than the names' padding."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    steps = [d for d in run.glob("step_*") if step_number(d) is not None and d.is_dir() and _is_checkpoint(d)]
    return sorted(steps, key=step_number)


def resolve(path) -> Path:
    """A checkpoint directory from a checkpoint or a run folder (best, else newest step)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if _is_checkpoint(p):
        return p
    if _is_checkpoint(p / "best"):
        return p / "best"
    steps = step_checkpoints(p)
    if steps:
        return steps[-1]
    raise CheckpointError(f"{p} is neither a checkpoint (no config.json) nor a run folder with checkpoints in it")


def read_config(ckpt: Path) -> dict:
    try:
        with open(ckpt / "config.json") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _verify_files(ckpt: Path, config: dict) -> None:
    for name, expect in config.get("files", {}).items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
        if p.stat().st_size != expect["bytes"]:
            raise CheckpointError(f"{p} is truncated or altered: {p.stat().st_size} bytes, expected {expect['bytes']}")
        if _sha256(p) != expect["sha256"]:
            raise CheckpointError(f"{p} is corrupted: its sha256 does not match the one recorded in config.json")


def load_checkpoint(path, device="cpu", train_state: bool = False):
    """(model, config dict, train_state dict or None) from a checkpoint of ours or a Hugging Face GPT-2 dir."""
    ckpt = resolve(path)
    config = read_config(ckpt)
    if config.get("model_type") == "gpt2":
        return load_hf(ckpt, device), {"model": to_dict(_hf_model_config(config)), "source": "huggingface"}, None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a {FORMAT} or Hugging Face GPT-2 config")
    tok = config.get("tokenizer", {})
    if tok.get("name") != TOKENIZER_NAME or {k: int(v) for k, v in tok.get("special_tokens", {}).items()} != CHAT_SPECIAL_TOKENS:
        raise CheckpointError(f"{ckpt}: made for tokenizer {tok.get('name')!r} with special tokens "
                              f"{tok.get('special_tokens')}, but this code uses {TOKENIZER_NAME!r} with {CHAT_SPECIAL_TOKENS}")
    _verify_files(ckpt, config)
    try:
        cfg = model_config_from_dict(config["model"], f"{ckpt / 'config.json'} 'model'")
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: bad model config: {e}") from None
    model = GPT(cfg)
    try:
        state = load_file(ckpt / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: unreadable ({e})") from None
    state["lm_head.weight"] = state.get("wte.weight")
    _load_state(model, state, ckpt / "model.safetensors")
    model.to(device)
    ts = None
    if train_state:
        if not (ckpt / "train_state.pt").is_file():
            raise CheckpointError(f"{ckpt} has no train_state.pt: it cannot be resumed")
        ts = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    return model, config, ts


def wrong_shapes(expected: dict, state: dict) -> list[str]:
    """'key: (shape) (expected (shape))' for each tensor of `state` whose shape differs from `expected`'s."""
    return [f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
            if torch.is_tensor(state.get(k)) and state[k].shape != v.shape]


def _load_state(model: GPT, state: dict, source) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = wrong_shapes(expected, state)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: does not match the model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state)


# ---- Hugging Face GPT-2 interop ---------------------------------------------------------------
# HF GPT-2 uses Conv1D layers whose weights are stored (in, out): these are transposed against nn.Linear.
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_model_config(hf: dict) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"unsupported GPT-2 activation {hf['activation_function']!r} (expected gelu_new)")
    vocab = max(hf.get("vocab_size", EOT_ID + 1), N_VOCAB)  # GPT-2's own ids, and room for the chat tokens
    return ModelConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                       vocab_size=(vocab + 63) // 64 * 64, dropout=0.0, bias=True)


def load_hf(path, device="cpu") -> GPT:
    """Our model from a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).
    GPT-2's 50257-token vocabulary is padded; the new rows (chat special tokens) get the usual init."""
    path = Path(path)
    cfg = _hf_model_config(read_config(path))
    if (path / "model.safetensors").is_file():
        hf_state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        hf_state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    model = GPT(cfg)
    state = {}
    for k, v in hf_state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers, and the tied output layer
        state[k] = v.t() if k.endswith(_HF_TRANSPOSED) else v
    wte = model.wte.weight.detach().clone()
    if "wte.weight" in state:
        wte[: state["wte.weight"].shape[0]] = state["wte.weight"]
    state["wte.weight"] = wte
    state["lm_head.weight"] = wte
    _load_state(model, state, path)
    return model.to(device)


EVAL_FILES = {"eval.json", "eval.md"}  # evaluate.py's report, written into the folder it evaluates


def _check_export_target(out: Path, names: set[str]) -> None:
    """Refuse to replace anything at `out` but an empty folder or an earlier export (files of exactly these names,
    perhaps with an evaluation's report, config.json a GPT-2 one): never a checkpoint of ours, a run folder, or a
    plain file."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder: export into a new or empty folder")
    found = sorted(p.name for p in out.iterdir())
    if not found or (names <= set(found) <= names | EVAL_FILES and all((out / n).is_file() for n in found)
                     and _is_gpt2_config(out)):
        return
    raise CheckpointError(f"{out} is neither empty nor an earlier export (it holds {', '.join(found[:4])}"
                          f"{', ...' if len(found) > 4 else ''}): export into a new or empty folder")


def _is_gpt2_config(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def export_hf(model: GPT, out_dir, extra_files: dict | None = None) -> Path:
    """Write `model` as a Hugging Face GPT2LMHeadModel directory (vocabulary kept at our padded size), plus
    `extra_files` (name -> text, or an object written as JSON). Only GPT-2's own parts can be exported. `out_dir`
    must be new, an empty folder or an earlier export, which is replaced."""
    cfg = model.config
    extras = [name for name, used in (("rotary position embeddings (rope)", cfg.rope), ("smear", cfg.smear)) if used]
    if extras:
        raise CheckpointError(f"this model uses {' and '.join(extras)}, which GPT-2 does not have: "
                              "it cannot be exported as a Hugging Face GPT-2 model")
    out = Path(out_dir).resolve()  # "." has no name to put a temporary one beside
    _check_export_target(out, {"model.safetensors", "config.json", *(extra_files or {})})
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.detach().cpu()
        state["transformer." + k] = (v.t() if k.endswith(_HF_TRANSPOSED) else v).contiguous()
    if not cfg.bias:  # GPT-2 always has biases: zeros are equivalent
        for k in list(state):
            if k.endswith(".weight") and ("ln_" in k or k.endswith(_HF_TRANSPOSED)):
                bias = k[:-len("weight")] + "bias"
                n = state[k].shape[-1] if k.endswith(_HF_TRANSPOSED) else state[k].shape[0]
                state.setdefault(bias, torch.zeros(n, dtype=state[k].dtype))
    _save_weights(state, tmp / "model.safetensors", metadata={"format": "pt"})
    _write_json(tmp / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "tie_word_embeddings": True,
    })
    for name, content in (extra_files or {}).items():
        if isinstance(content, str):
            (tmp / name).write_text(content, encoding="utf-8")
        else:
            _write_json(tmp / name, content)
    replace_dir(tmp, out)
    return out
