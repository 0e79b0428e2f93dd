"""Benchmarks; figures go into BENCHMARKS.md with the machine and the command.

  python bench.py tokenizer   tokenize_data.py against tiktoken's encode_ordinary_batch
  python bench.py train       training throughput against transformers' GPT2LMHeadModel
  python bench.py serve       time to first token, decode speed and concurrency of serve.py
"""

import sys


def bench_tokenizer(argv):
    raise NotImplementedError


def bench_train(argv):
    raise NotImplementedError


def bench_serve(argv):
    raise NotImplementedError


BENCHES = {"tokenizer": bench_tokenizer, "train": bench_train, "serve": bench_serve}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(__doc__.strip())
    BENCHES[sys.argv[1]](sys.argv[2:])
