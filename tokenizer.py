"""GPT-2 BPE through tiktoken, working offline, plus the chat special tokens.

tiktoken normally downloads its BPE file on first use, which fails on air-gapped machines. We build the
encoding ourselves from a local copy of the `r50k_base` ranks (byte-identical to GPT-2's), looked up in:
  1. $PARLEY_BPE_FILE,
  2. .cache/tiktoken/r50k_base.tiktoken in this project (written by `make setup`),
  3. tiktoken's own cache ($TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or the temp dir; name = sha1 of the URL),
and only then let tiktoken try the network. `python tokenizer.py --fetch` (what `make setup` runs) obtains the
file: from tiktoken's download if the network allows, else from the `openai-whisper` source distribution on
PyPI, which carries the same file as whisper/assets/gpt2.tiktoken. The sha256 is always checked.
"""

import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
PROJECT_BPE_FILE = Path(__file__).resolve().parent / ".cache" / "tiktoken" / "r50k_base.tiktoken"
WHISPER_SDIST = "openai-whisper==20250625"
# The regex that splits text before BPE merges, identical to tiktoken's r50k_base / gpt2.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

TOKENIZER_NAME = "gpt2"
EOT = "<|endoftext|>"
EOT_ID = 50256
# Chat special tokens sit right above GPT-2's vocabulary, inside the model's padded vocabulary (50304).
CHAT_SPECIAL_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
N_VOCAB = 50261  # real token ids are 0..N_VOCAB-1; ids above that are padding and never sampled


class TokenizerNotFound(RuntimeError):
    pass


def _tiktoken_cache_file() -> Path:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache) / hashlib.sha1(BPE_URL.encode()).hexdigest()


def _candidates() -> list[Path]:
    found = [Path(os.environ["PARLEY_BPE_FILE"])] if os.environ.get("PARLEY_BPE_FILE") else []
    return found + [PROJECT_BPE_FILE, _tiktoken_cache_file()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_ranks() -> dict[bytes, int]:
    for path in _candidates():
        if path.is_file():
            # Read, checked and parsed here, once: tiktoken's loader would hash it again and copy it to a cache.
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != BPE_SHA256:
                raise TokenizerNotFound(f"{path} is not the GPT-2 BPE file (sha256 mismatch); delete it and run `make setup`")
            lines = (line.split() for line in data.splitlines() if line)
            return {base64.b64decode(token): int(rank) for token, rank in lines}
    try:  # last resort: tiktoken's own download
        return load_tiktoken_bpe(BPE_URL, expected_hash=BPE_SHA256)
    except Exception as e:
        where = "\n  ".join(str(p) for p in _candidates())
        raise TokenizerNotFound(
            f"GPT-2 BPE file not found and could not be downloaded ({type(e).__name__}).\n"
            f"Looked in:\n  {where}\n"
            "Fix: run `make setup` (or `python tokenizer.py --fetch`), which gets it from PyPI when the web is closed; "
            f"or copy r50k_base.tiktoken (sha256 {BPE_SHA256}) to {PROJECT_BPE_FILE}, or point $PARLEY_BPE_FILE at it."
        ) from None


_RANKS, _ENCODING = None, None
_RANKS_LOCK = threading.Lock()
_THREAD = threading.local()


def _ranks() -> dict[bytes, int]:
    """The BPE file's ranks, read once: threads that ask while the first one reads wait for its result."""
    global _RANKS
    with _RANKS_LOCK:
        if _RANKS is None:
            _RANKS = _load_ranks()
        return _RANKS


def _new_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(name=TOKENIZER_NAME, pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID, **CHAT_SPECIAL_TOKENS})


def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding with <|endoftext|> and the chat special tokens; cached per process."""
    global _ENCODING
    if _ENCODING is None:
        _ENCODING = _new_encoding(_ranks())
    return _ENCODING


def thread_encoding() -> tiktoken.Encoding:
    """The calling thread's own copy of get_encoding(), for encoding in several threads at once. tiktoken's regex
    keeps its scratch space in a pool that only one thread reads without a lock: threads sharing one Encoding take
    the pool's locked path for every piece of text, and two of them run little faster than one (BENCHMARKS.md,
    Tokenizer). The BPE file is read once, by the first thread that asks; the others build theirs from its ranks."""
    enc = getattr(_THREAD, "encoding", None)
    if enc is None:
        enc = _THREAD.encoding = _new_encoding(_ranks())
    return enc


def encode(text: str) -> list[int]:
    """Plain text to ids. Special-token strings in the text stay ordinary text (no prompt injection)."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """Ids to text; ids outside the real vocabulary are dropped, invalid UTF-8 becomes U+FFFD."""
    return get_encoding().decode([int(i) for i in ids if 0 <= int(i) < N_VOCAB])


def decode_bytes(ids) -> bytes:
    """Ids to raw bytes, for streaming: a multi-byte character may be split across tokens."""
    return get_encoding().decode_bytes([int(i) for i in ids if 0 <= int(i) < N_VOCAB])


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: vocab.json and merges.txt spell tokens in these characters.
    Printable Latin-1 bytes stand for themselves; the others are moved to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _split_by_earlier_merges(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """BPE of `token` with only the merges ranked below its own: the two parts its last merge joined."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while True:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs, default=(limit, 0))
        if rank >= limit:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json (token -> id) and merges.txt lines ("a b", in merge order), rebuilt from the local
    ranks: tiktoken keeps only the ranks, and a token's merge is recovered by re-running BPE on its bytes."""
    ranks, spell = _load_ranks(), byte_to_unicode()
    text = {token: "".join(spell[b] for b in token) for token in ranks}
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        left, right = _split_by_earlier_merges(token, ranks)
        merges.append(f"{text[left]} {text[right]}")
    return {text[t]: rank for t, rank in ranks.items()}, merges


def fetch(dest: Path = PROJECT_BPE_FILE) -> Path:
    """Make sure the BPE file is on disk at `dest`; returns its path."""
    if dest.is_file() and _sha256(dest) == BPE_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for path in _candidates():
        if path.is_file() and path != dest and _sha256(path) == BPE_SHA256:
            data = path.read_bytes()
            break
    else:
        data = _download() or _from_whisper_sdist()
    if hashlib.sha256(data).hexdigest() != BPE_SHA256:
        raise TokenizerNotFound("the BPE file obtained has the wrong sha256; refusing to use it")
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def _download() -> bytes | None:
    try:
        from tiktoken.load import read_file
        return read_file(BPE_URL)
    except Exception as e:
        print(f"tokenizer: direct download failed ({type(e).__name__}); trying the PyPI source of {WHISPER_SDIST}")
        return None


def _from_whisper_sdist() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, WHISPER_SDIST]
        if subprocess.run(cmd).returncode != 0:
            raise TokenizerNotFound(f"could not download {WHISPER_SDIST} from PyPI either; see the message above. "
                                    f"Copy r50k_base.tiktoken (sha256 {BPE_SHA256}) to {PROJECT_BPE_FILE} by hand.")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            return tar.extractfile(member).read()


if __name__ == "__main__":
    if sys.argv[1:] != ["--fetch"]:
        sys.exit("usage: python tokenizer.py --fetch   (puts the GPT-2 BPE file where this project finds it offline)")
    try:
        print(f"tokenizer: GPT-2 BPE file ready at {fetch()}")
    except TokenizerNotFound as e:
        sys.exit(f"error: {e}")
