"""export_hf.py: the exported directory loads end to end in transformers (AutoTokenizer, AutoModelForCausalLM)
and agrees with ours: chat template ids, plain-text encode and decode, greedy generation stopping at <|end|>."""

import json

import pytest
import torch

import export_hf
import tokenizer
from chat_format import END, render
from checkpoint import CheckpointError, export_hf as export_weights, save_checkpoint
from config import ModelConfig
from model import GPT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Héllo! Ça va, naïve café? 日本語 🙂"},
    {"role": "assistant", "content": "Oui — très bien.\n"},
    {"role": "user", "content": "And  again,   twice?\n\n"},
]
REPLY = "Yes 🙂 again."
TEXTS = ["Hello world", "I'll say don't, we've 12345 or 3.14!", "naïve café — 日本語 🙂 Ωmega",
         "  two spaces, tabs\t\there,\n\n\nnew lines   ", "trailing   ", "\n",
         "x" * 40 + " " + "ab" * 30]


def memorized_model() -> GPT:
    """A tiny learned-positions model trained to answer CONVERSATION with REPLY and <|end|>: it stops on its own."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128))
    ids, mask = render(CONVERSATION + [{"role": "assistant", "content": REPLY}])
    x, y = torch.tensor([ids[:-1]]), torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = memorized_model()
    return model, export_hf.export(model, tmp_path_factory.mktemp("hf") / "out")


def chat_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, **kwargs)
    return out if isinstance(out, list) else out["input_ids"]  # transformers 5 returns a BatchEncoding


def test_chat_template_gives_our_render_ids(exported):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported[1])
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:3]):
        assert chat_ids(hf_tokenizer, messages, add_generation_prompt=True) == render(messages, True)[0]
    assert chat_ids(hf_tokenizer, CONVERSATION[:3]) == render(CONVERSATION[:3])[0]
    # any order of roles: the assistant first, a role twice in a row, a later system message, the assistant last
    system, user, reply = CONVERSATION[:3]
    for messages in ([system, reply, user], [user, user, reply, reply], [user, reply, system, user], [system, reply]):
        for prompt in (False, True):
            assert chat_ids(hf_tokenizer, messages, add_generation_prompt=prompt) == render(messages, prompt)[0]
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == ("<|end|>", END, 50256)
    assert hf_tokenizer.convert_tokens_to_ids(list(export_hf.SPECIAL_TOKENS)) == [50256, 50257, 50258, 50259, 50260]


def test_encode_and_decode_equal_tiktoken(exported):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported[1])
    for text in TEXTS:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text), text
        assert hf_tokenizer.decode(ids) == text
    ids = tokenizer.encode("naïve 日本語")[:-1]  # ends inside a character: both give U+FFFD
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)
    # Hugging Face reads special-token text as the special token unless told not to; we never do (chat_format)
    typed = "hi <|end|><|assistant|>"
    assert hf_tokenizer.encode(typed, add_special_tokens=False)[-2:] == [END, 50259]
    assert hf_tokenizer.encode(typed, add_special_tokens=False, split_special_tokens=True) == tokenizer.encode(typed)


def test_vocab_and_merges_files_alone_give_the_same_ids(exported):
    """vocab.json + merges.txt, for tools that read those rather than tokenizer.json."""
    import tokenizers
    out = exported[1]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt")))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS:
        assert bpe.encode(text).ids == tokenizer.encode(text), text
    assert json.loads((out / "vocab.json").read_text())["<|endoftext|>"] == 50256
    assert (out / "merges.txt").read_text().splitlines()[:3] == ["#version: 0.2", "Ġ t", "Ġ a"]  # GPT-2's first merges


def test_greedy_generate_equals_ours_and_stops_at_end(exported):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.generation_config.eos_token_id == [END, 50256]
    prompt = render(CONVERSATION, add_generation_prompt=True)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    ours = model.generate([prompt], 30, temperature=0, stop_tokens={END, 50256})[0]
    assert theirs[0, len(prompt):].tolist() == ours
    assert ours == tokenizer.encode(REPLY) + [END]


@pytest.mark.parametrize("extra, named", [({"rope": True}, "rope"), ({"smear": True}, "smear")])
def test_models_beyond_gpt2_are_refused_with_a_message(extra, named, tmp_path, capsys):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, **extra))
    with pytest.raises(CheckpointError, match=named):
        export_weights(model, tmp_path / "direct")
    ckpt = save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(SystemExit) as exit:
        export_hf.main([str(ckpt), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: this model uses") and named in err
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_an_out_dir_holding_the_checkpoints_and_exits_2(tmp_path, capsys):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    run = tmp_path / "run"
    for target in (run, run / "best"):  # the run folder, and the checkpoint onto itself
        ckpt = save_checkpoint(run / "best", model, train_state={"step": 1})
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as exit:
            export_hf.main([str(ckpt), str(target)])
        assert exit.value.code == 2
        assert f"{target} is neither empty nor an earlier export" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_cli_exports_into_the_current_folder_and_again_over_its_export(tmp_path, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ck", GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)))
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path / "hf")
    export_hf.main([str(ckpt), "."])
    (tmp_path / "hf" / "eval.md").write_text("an evaluation of the export (evaluate.py writes it there)")
    export_hf.main([str(ckpt), str(tmp_path / "hf")])
    assert capsys.readouterr().out.count(f"-> {(tmp_path / 'hf').resolve()} ") == 2
    assert not (tmp_path / "hf" / "eval.md").exists()  # the new export replaces the old one whole
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|end|>"


def test_cli_help_exits_0_and_a_wrong_call_2(capsys):
    export_hf.main(["--help"])
    assert capsys.readouterr().out.startswith("Export a checkpoint to a Hugging Face GPT-2 directory")
    with pytest.raises(SystemExit) as exit:
        export_hf.main(["only-one"])
    assert exit.value.code == 2 and "usage: python export_hf.py" in capsys.readouterr().err
