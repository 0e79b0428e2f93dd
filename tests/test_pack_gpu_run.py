"""pack_gpu_run.py: the corpus fills the size budget and no more, and --unpack restores the files exactly."""

import gzip
import json
import lzma
import random

import pack_gpu_run


def test_corpus_fits_its_budget_and_unpacks_exactly(tmp_path):
    rng = random.Random(0)
    words = [f"word{i}" for i in range(2000)]
    shards = []
    for s in range(3):
        path = tmp_path / f"train_0{s}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for b in range(40):
                f.write(json.dumps({"id": f"{s}-{b}", "n_tokens": 1000,
                                    "text": " ".join(rng.choice(words) for _ in range(1000))}) + "\n")
        shards.append(path)
    out = tmp_path / "pack" / "data"
    out.mkdir(parents=True)
    one_shard = lzma.compress(gzip.decompress(shards[0].read_bytes()), preset=9)
    budget = int(len(one_shard) * 1.5)
    used, tokens = pack_gpu_run.xz_corpus(shards, out, budget)
    packed = sorted(p.name for p in out.iterdir())
    assert packed == ["train_00.jsonl.xz", "train_01.jsonl.xz"]  # the second cut short, the third left out
    assert used == sum(p.stat().st_size for p in out.iterdir()) <= budget
    assert 40_000 < tokens < 80_000 and tokens % 1000 == 0

    pack_gpu_run.unpack(tmp_path / "pack")
    assert (out / "train_00.jsonl").read_bytes() == gzip.decompress(shards[0].read_bytes())
    second = (out / "train_01.jsonl").read_text().splitlines()
    assert second == gzip.decompress(shards[1].read_bytes()).decode().splitlines()[:len(second)]
    assert not list(out.glob("*.xz"))
