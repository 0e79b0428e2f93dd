"""chat.py: against a recording fake server (what it sends), a real server, and a local checkpoint."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import save_checkpoint  # noqa: E402
from test_serve import chat_prompt, greedy_reference, in_process_server, tiny_model  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_chat(args: list[str], stdin: str, timeout: float = 60) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


FAKE_CONTEXT = 160  # a reply is left a quarter: a prompt fits in 120 characters


@pytest.fixture
def fake_server():
    """Answers every chat request with a fixed reply streamed in pieces or, for the message "fail", a 400
    error, and /tokenize with a count of one token a character in a context of FAKE_CONTEXT; records what it was
    sent."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if self.path == "/tokenize":
                count = sum(len(m["content"]) for m in body["messages"])
                payload = json.dumps({"tokens": [], "count": count, "max_context": FAKE_CONTEXT}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if body["messages"][-1]["content"] == "fail":
                payload = json.dumps({"error": {"message": "too long", "type": "invalid_request_error",
                                                "param": None, "code": "context_length_exceeded"}}).encode()
                self.send_response(400)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for delta in ({"role": "assistant", "content": ""}, {"content": "Hello "}, {"content": "friend 😀"}, {}):
                choice = {"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}
                chunk = {"id": "x", "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def test_remote_multi_turn_commands_and_errors(fake_server):
    url, received = fake_server
    out = run_chat(["--url", url, "--api-key", "k1", "--temperature", "0", "--seed", "3",
                    "--repetition_penalty", "1.2"],
                   "Hi\n/system Be brief.\nHow are you?\nfail\n/reset\nAgain\n/quit\nnever sent\n")
    assert out.count("bot> Hello friend 😀") == 3
    assert "[system message set]" in out and "[conversation cleared]" in out and "[error: 400: too long]" in out
    assert all(r["auth"] == "Bearer k1" for r in received)
    bodies = [r["body"] for r in received if r["path"] == "/v1/chat/completions"]
    # every prompt of more than one turn is counted first (one turn is sent as it is: there is nothing to drop)
    assert [r["body"] for r in received if r["path"] == "/tokenize"] == [{"messages": b["messages"]} for b in bodies[1:3]]
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hi"}]
    assert bodies[0]["stream"] is True and bodies[0]["temperature"] == 0 and bodies[0]["seed"] == 3
    assert bodies[0]["repetition_penalty"] == 1.2
    assert "max_tokens" not in bodies[0]  # 0 = let the server fit the context
    assert bodies[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello friend 😀"},
                                     {"role": "user", "content": "How are you?"}]
    assert bodies[2]["messages"][-1] == {"role": "user", "content": "fail"}
    # the failed turn is forgotten, and /reset keeps the system message but drops the turns
    assert bodies[3]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again"}]
    assert len(bodies) == 4 and len(received) == 6


def test_remote_drops_the_oldest_turns_to_fit_the_servers_context(fake_server):
    url, received = fake_server
    out = run_chat(["--url", url], "a" * 50 + "\n" + "b" * 50 + "\n" + "c" * 50 + "\n")
    bodies = [r["body"] for r in received if r["path"] == "/v1/chat/completions"]
    assert [len(b["messages"]) for b in bodies] == [1, 3, 3]  # the third: 178 characters, 58 too many
    assert bodies[2]["messages"][0] == {"role": "user", "content": "b" * 50}
    assert out.count("[dropped the 2 oldest messages to fit the context of 160 tokens]") == 1
    assert out.count("Hello friend 😀") == 3


def test_remote_unreachable_server_is_an_error_not_a_crash():
    out = run_chat(["--url", "http://127.0.0.1:9", "--timeout", "5"], "Hi\n")
    assert "[error: cannot reach http://127.0.0.1:9" in out


def test_needs_exactly_one_of_checkpoint_and_url():
    r = subprocess.run([sys.executable, str(ROOT / "chat.py")], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 2 and "--checkpoint" in r.stderr


@pytest.mark.parametrize("option, says", [(["--top_p", "0"], "field 'top_p' expects a value in (0, 1], got 0.0"),
                                          (["--temperature", "-1"], "field 'temperature' expects a value >= 0"),
                                          (["--repetition_penalty", "0"], "field 'repetition_penalty' expects"),
                                          (["--device", "gpu"], "field 'device' expects auto, cpu, cuda")])
def test_bad_options_are_refused_before_the_first_message(option, says, model_and_ckpt, monkeypatch, capsys):
    import chat
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("the chat started"))
    with pytest.raises(SystemExit) as exit:
        chat.main(["--checkpoint", str(model_and_ckpt[1]), *option])
    assert exit.value.code == 2 and says in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_and_ckpt(tmp_path_factory):
    model = tiny_model().eval()
    return model, save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", model)


def test_remote_against_a_real_server(model_and_ckpt):
    model, _ = model_and_ckpt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs in this process and shares 2 cores with the client
    try:
        want = greedy_reference(model, chat_prompt("Hello"), 8)[0]
        with in_process_server(model, api_key="s3cret") as (url, _):
            out = run_chat(["--url", url, "--api-key", "s3cret", "--temperature", "0", "--max-tokens", "8"], "Hello\n")
            assert f"bot> {want}\n" in out
            out = run_chat(["--url", url, "--api-key", "wrong"], "Hello\n")
            assert "[error: 401:" in out
            long = " ".join(["story"] * 40)  # three of these overflow the tiny model's 128 tokens
            out = run_chat(["--url", url, "--api-key", "s3cret", "--temperature", "0", "--max-tokens", "8"],
                           f"{long} 1\n{long} 2\n{long} 3\n")
            assert "[dropped the 2 oldest messages to fit the context of 128 tokens]" in out and "error" not in out
    finally:
        torch.set_num_threads(threads)


def test_local_checkpoint_streams_greedy_text_and_drops_old_turns(model_and_ckpt):
    model, ckpt = model_and_ckpt
    want = greedy_reference(model, chat_prompt("Hello"), 8)[0]
    long = " ".join(["story"] * 40)
    out = run_chat(["--checkpoint", str(ckpt), "--temperature", "0", "--max-tokens", "8"],
                   f"Hello\n/reset\n{long} 1\n{long} 2\n{long} 3\n")
    assert out.split("you> ")[1] == f"bot> {want}\n"
    assert "[dropped the 2 oldest messages to fit the context of 128 tokens]" in out


def test_unknown_commands_are_not_sent_and_a_double_slash_sends_a_slash(fake_server):
    url, received = fake_server
    out = run_chat(["--url", url], "/help\n/rest\n//etc/hosts is a file\n/quit\n")
    assert "[unknown command /help; commands: /reset, /system TEXT, /quit]" in out
    assert "[unknown command /rest; commands: /reset, /system TEXT, /quit]" in out
    assert [r["body"]["messages"] for r in received] == [[{"role": "user", "content": "/etc/hosts is a file"}]]


@pytest.fixture
def local_reply(model_and_ckpt, one_torch_thread):
    """reply(system, messages) of chat.py's local mode on the tiny checkpoint (128 tokens), greedy."""
    import chat
    return lambda **kwargs: chat.local_replier(chat.ChatConfig(checkpoint=str(model_and_ckpt[1]), temperature=0,
                                                               device="cpu", **kwargs))


def exchanges(*questions):
    return [m for q in questions for m in ({"role": "user", "content": q}, {"role": "assistant", "content": "Ok."})]


def test_local_a_turn_refused_as_too_long_keeps_the_conversation(local_reply, capsys):
    import chat
    from chat_format import render
    reply = local_reply(max_tokens=8)
    long = {"role": "user", "content": "story " * 200}
    messages = exchanges("Hello", "How are you?") + [long]
    before = list(messages)
    n = len(render([long], add_generation_prompt=True)[0])
    with pytest.raises(chat.ChatError, match=rf"^the message is too long: {n} tokens for a context of 128$"):
        list(reply("", messages))
    assert messages == before and "dropped" not in capsys.readouterr().out
    system, hi = {"role": "system", "content": "Be brief. " * 60}, {"role": "user", "content": "Hi"}
    s, m = len(render([system])[0]), len(render([hi], add_generation_prompt=True)[0])
    messages = exchanges("Hello") + [hi]
    with pytest.raises(chat.ChatError, match=rf"^the system message is too long: {s} tokens leave no room for this "
                                             rf"message \({m} tokens\) in the context of 128 \(/system TEXT"):
        list(reply(system["content"], messages))
    assert len(messages) == 3


def test_local_max_tokens_over_the_context_caps_the_reply_without_dropping_history(local_reply, capsys):
    reply = local_reply(max_tokens=1000)
    messages = exchanges("One", "Two", "Three") + [{"role": "user", "content": "Four"}]
    pieces = list(reply("", messages))
    assert len(messages) == 7 and "dropped" not in capsys.readouterr().out
    assert pieces  # the reply runs to the end of the context or to <|end|>
