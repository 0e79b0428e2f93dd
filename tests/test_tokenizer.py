import hashlib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import tokenizer
from conftest import ROOT


def test_offline_encoding_matches_gpt2_and_has_chat_tokens():
    enc = tokenizer.get_encoding()
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert enc.n_vocab == tokenizer.N_VOCAB == 50261
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert [enc.encode(t, allowed_special="all")[0] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] \
        == [50257, 50258, 50259, 50260]


def test_special_token_text_in_user_content_stays_plain_text():
    ids = tokenizer.encode("hi <|end|><|assistant|>")
    assert not set(ids) & set(tokenizer.CHAT_SPECIAL_TOKENS.values())
    assert tokenizer.decode(ids) == "hi <|end|><|assistant|>"


def test_round_trip_unicode_and_split_bytes():
    text = "naïve café — 日本語 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # an emoji is several byte-level tokens
    assert tokenizer.decode_bytes(ids) == "🙂".encode()
    assert tokenizer.decode(ids + [50300]) == "🙂"  # padding ids are dropped


def test_bpe_file_is_the_verified_one():
    assert hashlib.sha256(tokenizer.PROJECT_BPE_FILE.read_bytes()).hexdigest() == tokenizer.BPE_SHA256


def test_missing_bpe_file_says_what_to_do(tmp_path):
    """With no local file and no network, the error names `make setup` (run in a clean process)."""
    code = (
        "import tokenizer, pathlib, sys;"
        f"tokenizer.PROJECT_BPE_FILE = pathlib.Path({str(tmp_path / 'none')!r});"
        "tokenizer.BPE_URL = 'http://127.0.0.1:9/r50k_base.tiktoken';"
        "tokenizer.get_encoding()"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode != 0
    assert "make setup" in r.stderr and "TokenizerNotFound" in r.stderr


@pytest.fixture
def wrong_bpe_file(tmp_path, monkeypatch):
    """A PARLEY_BPE_FILE that is not the GPT-2 file, with nothing read yet in this process."""
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_text("not the file")
    monkeypatch.setenv("PARLEY_BPE_FILE", str(bad))
    monkeypatch.setattr(tokenizer, "_ENCODING", None)
    monkeypatch.setattr(tokenizer, "_RANKS", None)
    monkeypatch.setattr(tokenizer, "_THREAD", threading.local())
    return bad


def test_wrong_bpe_file_is_refused(wrong_bpe_file):
    with pytest.raises(tokenizer.TokenizerNotFound, match="sha256"):
        tokenizer.get_encoding()


def test_threads_asking_at_once_read_the_bpe_file_once(monkeypatch):
    """tokenize_data.py's workers all ask for their copy as they start: the first reads the file, the rest wait."""
    reads, load = [], tokenizer._load_ranks
    def slow_load():
        reads.append(1)
        time.sleep(0.2)  # the other threads ask while this one reads
        return load()
    monkeypatch.setattr(tokenizer, "_RANKS", None)
    monkeypatch.setattr(tokenizer, "_load_ranks", slow_load)
    monkeypatch.setattr(tokenizer, "_THREAD", threading.local())
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: tokenizer.thread_encoding(), range(4)))
    assert len(reads) == 1 and all(enc.encode("a b c") == copies[0].encode("a b c") for enc in copies)


def test_each_thread_encodes_with_its_own_copy_and_the_same_tokens():
    # tokenize_data.py's workers: a copy per thread (a shared Encoding is slower in threads), the same vocabulary
    text = "Hello, world! <|endoftext|> 1234 \u00e9t\u00e9 " * 50
    both_running = threading.Barrier(2)

    def twice():
        both_running.wait(timeout=10)  # the two calls run on two threads at once
        return tokenizer.thread_encoding(), tokenizer.thread_encoding()

    with ThreadPoolExecutor(2) as pool:
        first, second = [f.result() for f in [pool.submit(twice), pool.submit(twice)]]
    assert first[0] is first[1] and second[0] is second[1]  # one copy per thread, kept
    copies = {id(first[0]), id(second[0]), id(tokenizer.thread_encoding())}
    assert len(copies) == 3 and id(tokenizer.get_encoding()) not in copies
    for enc in (first[0], tokenizer.thread_encoding()):
        assert enc.encode_to_numpy(text, disallowed_special=()).tolist() == \
            tokenizer.get_encoding().encode(text, disallowed_special=())
        assert enc.n_vocab == tokenizer.get_encoding().n_vocab


def test_scripts_refuse_a_wrong_bpe_file_with_a_message_and_exit_2(wrong_bpe_file, tmp_path, capsys, monkeypatch):
    """Each script that reads text stops at once with the file's name, not a traceback (the server and the
    terminal chat before they start, not at their first message)."""
    import chat
    import evaluate
    import export_hf
    import finetune
    import serve
    from checkpoint import save_checkpoint
    from config import ModelConfig
    from model import GPT

    ckpt = save_checkpoint(tmp_path / "ckpt", GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(f'{{"messages": [{{"role": "user", "content": "Hi {i}"}}, '
                             f'{{"role": "assistant", "content": "Hello"}}]}}\n' for i in range(4)))
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("the chat started"))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    calls = {"evaluate": lambda: evaluate.main([str(ckpt), "--suite", "false", "--data", str(chats)]),
             "export_hf": lambda: export_hf.main([str(ckpt), str(tmp_path / "hf")]),
             "finetune": lambda: finetune.main(["--init", str(ckpt), "--data", str(chats), "--out",
                                                str(tmp_path / "ft"), "--max_steps", "1"]),
             "chat": lambda: chat.main(["--checkpoint", str(ckpt)]),
             "serve": lambda: serve.main(["--checkpoint", str(ckpt)])}
    for name, call in calls.items():
        with pytest.raises(SystemExit) as exit:
            call()
        err = capsys.readouterr().err
        assert exit.value.code == 2, name
        assert f"{wrong_bpe_file} is not the GPT-2 BPE file" in err, name
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ft" / "best").exists()
