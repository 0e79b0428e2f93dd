"""Export a checkpoint to a Hugging Face GPT-2 directory: python export_hf.py CHECKPOINT_DIR OUT_DIR

The result loads end to end with transformers: AutoModelForCausalLM.from_pretrained(OUT_DIR) gives the same
logits, and AutoTokenizer.from_pretrained(OUT_DIR) the same token ids as ours, chat template included. It holds
  model.safetensors, config.json            the weights as GPT2LMHeadModel; the vocabulary keeps our padded
                                            size (50304), so the chat special tokens 50257-50260 survive;
  tokenizer.json, vocab.json, merges.txt    GPT-2's byte-level BPE, rebuilt offline from the local ranks file,
                                            with <|endoftext|> and the chat tokens as special tokens at our ids;
  tokenizer_config.json                     the chat template (Jinja) and eos_token <|end|>, the end of a turn;
  special_tokens_map.json
  generation_config.json                    generation stops at <|end|> (or <|endoftext|>); pads with <|endoftext|>.
OUT_DIR must not exist, be an empty folder, or hold an earlier export (the same files, a GPT-2 config.json), which
is replaced: anything else there (a checkpoint, a run folder, a file) is refused and left as it is.
Models with rotary positions (rope) or smear have no GPT-2 equivalent and are refused with a message. Errors exit
with code 2.
"""

import sys
from pathlib import Path

from chat_format import END, JINJA_TEMPLATE
from checkpoint import CheckpointError, export_hf, load_checkpoint
from config import fail
from model import GPT
from tokenizer import CHAT_SPECIAL_TOKENS, EOT, EOT_ID, TokenizerNotFound, gpt2_vocab_and_merges

SPECIAL_TOKENS = {EOT: EOT_ID, **CHAT_SPECIAL_TOKENS}
END_TOKEN = next(t for t, i in CHAT_SPECIAL_TOKENS.items() if i == END)


def tokenizer_files(context: int) -> dict:
    """The tokenizer's files, name -> JSON object or text, for a model with `context` positions."""
    vocab, merges = gpt2_vocab_and_merges()
    added = {i: {"content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for t, i in SPECIAL_TOKENS.items()}
    # GPT-2's pre-tokenizer regex splits text exactly as tiktoken's r50k pattern does (tested)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
           "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges}
    roles = {"bos_token": EOT, "eos_token": END_TOKEN, "unk_token": EOT, "pad_token": EOT}
    return {
        "tokenizer.json": {"version": "1.0", "truncation": None, "padding": None,
                           "added_tokens": [{"id": i, **a} for i, a in added.items()], "normalizer": None,
                           "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level, "model": bpe},
        "vocab.json": {**vocab, EOT: EOT_ID},  # as GPT-2's: the chat tokens are added tokens only
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": {
            "tokenizer_class": "GPT2Tokenizer", **roles, "model_max_length": context, "add_bos_token": False,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,  # decode gives back the exact text
            "added_tokens_decoder": {str(i): a for i, a in added.items()}, "chat_template": JINJA_TEMPLATE},
        "special_tokens_map.json": {**roles, "additional_special_tokens": list(CHAT_SPECIAL_TOKENS)},
    }


def export(model: GPT, out_dir) -> Path:
    """`model` as a complete Hugging Face directory: weights, tokenizer, chat template, generation settings."""
    generation = {"bos_token_id": EOT_ID, "eos_token_id": [END, EOT_ID], "pad_token_id": EOT_ID}
    return export_hf(model, out_dir, extra_files={**tokenizer_files(model.config.block_size),
                                                  "generation_config.json": generation})


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return
    if len(argv) != 2:
        print("usage: python export_hf.py CHECKPOINT_DIR OUT_DIR  (--help: what it writes)", file=sys.stderr)
        sys.exit(2)
    try:
        out = export(load_checkpoint(argv[0])[0], argv[1])
    except (CheckpointError, TokenizerNotFound) as e:
        fail(str(e))
    print(f"exported {argv[0]} -> {out} (load with AutoModelForCausalLM / AutoTokenizer.from_pretrained('{out}'))")


if __name__ == "__main__":
    main(sys.argv[1:])
