"""Export a checkpoint to a Hugging Face GPT-2 directory: python export_hf.py CHECKPOINT_DIR OUT_DIR

The result loads with transformers' GPT2LMHeadModel.from_pretrained(OUT_DIR) and gives the same logits.
The vocabulary keeps our padded size (50304), so the chat special tokens 50257-50260 survive the trip.
tokenizer_config.json carries the chat template (Jinja), so Hugging Face tools render the same prompts.
"""

import sys

from chat_format import JINJA_TEMPLATE
from checkpoint import CheckpointError, export_hf, load_checkpoint


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        sys.exit(__doc__.strip())
    try:
        model, _, _ = load_checkpoint(argv[0])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    out = export_hf(model, argv[1], extra_files={"tokenizer_config.json": {"chat_template": JINJA_TEMPLATE}})
    print(f"exported {argv[0]} -> {out} (load with GPT2LMHeadModel.from_pretrained('{out}'))")


if __name__ == "__main__":
    main(sys.argv[1:])
