"""Pack what the GPU reference run needs into one folder that travels to a machine without internet.

  python pack_gpu_run.py                      # writes data/gpu_carry (under the size a device call carries)
  python3 pack_gpu_run.py --unpack            # there: decompresses the data next to its .xz files

A lent GPU machine has torch, tiktoken and transformers but not the serving stack, cannot download, and takes a
repository plus at most `--max_mib` of carried files. The pack holds:
  wheels/   fastapi, starlette, uvicorn, pydantic and what they need that the GPU image lacks, at the versions of
            this virtual environment, built for that machine's Python (`--python_version`)
  data/     the layout of ../shared/data (gpu_reference.py --data_root): Gutenberg train text filling what the
            size limit leaves (xz), the fine-tuning chats, the held-out dialogs and MT-bench's questions
The BPE file travels as .cache/tiktoken (name it in the call's carry too). The command to run there is printed.
"""

import argparse
import gzip
import json
import lzma
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# The serving stack (serve.py) and what it needs beyond the GPU image's packages (the lent GPU machine's package
# list, in the workplace's device notes).
WHEELS = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "annotated-types", "annotated-doc",
          "typing-inspection", "typing_extensions")
CHATS = ("instruct/mix", "dialog/sgd", "dialog/synthetic_persona_chat", "dialog/taskmaster4_coffee",
         "dialog/topical_chat", "dialog/hh_rlhf_harmless_test", "dialog/oasst1_en_validation")
CORPUS = "pretrain/gutenberg_top100_authors"
QUESTIONS = "eval/mt_bench_80/question.jsonl"
MIB = 1 << 20


def download_wheels(dest: Path, python_version: str) -> None:
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation=cp",
           f"--python-version={python_version}", *platforms, "-d", str(dest), *pins]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: pip could not download {' '.join(pins)} for Python {python_version}")


def xz_copy(src: Path, dest: Path) -> int:
    """src (.gz or plain) recompressed as dest (.xz); returns dest's size."""
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f, lzma.open(dest, "wb", preset=9) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    return dest.stat().st_size


def xz_books(shard: Path, dest: Path, max_chars: float) -> tuple[int, int, int, bool]:
    """The books of shard, up to max_chars of text, into dest (.xz): (chars, tokens, bytes written, complete)."""
    chars = tokens = 0
    complete = True
    with gzip.open(shard, "rt", encoding="utf-8") as f, lzma.open(dest, "wt", encoding="utf-8", preset=9) as out:
        for line in f:
            if chars + len(line) > max_chars:
                complete = False
                break
            out.write(line)
            chars, tokens = chars + len(line), tokens + json.loads(line)["n_tokens"]
    return chars, tokens, dest.stat().st_size, complete


def xz_corpus(shards: list[Path], dest_dir: Path, budget: int) -> tuple[int, int]:
    """Gutenberg books, shard after shard, until their xz size would pass budget bytes: (bytes, tokens).
    The compressed size is known only at the end: a shard is cut by the ratio of the one before, and cut again
    while it still does not fit; a cut shard is the last."""
    used = tokens = 0
    ratio = 0.27  # xz on English prose, a first guess until a shard is measured
    for shard in shards:
        dest = dest_dir / shard.name.replace(".jsonl.gz", ".jsonl.xz")
        max_chars = (budget - used) / ratio
        chars, n, size, complete = xz_books(shard, dest, max_chars)
        while used + size > budget and chars:
            max_chars = chars * (budget - used) / size * 0.97
            chars, n, size, complete = xz_books(shard, dest, max_chars)
        if chars == 0:
            dest.unlink()
            break
        used, tokens, ratio = used + size, tokens + n, size / chars
        print(f"  {dest.name}: {chars / MIB:.0f} MiB of text -> {size / MIB:.1f} MiB")
        if not complete:
            break
    return used, tokens


def pack(data_root: Path, out: Path, max_mib: float, python_version: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    print("wheels:")
    download_wheels(out / "wheels", python_version)
    print("chats, held-out dialogs, MT-bench questions:")
    for folder in CHATS:
        for src in sorted((data_root / folder).glob("*.jsonl*")):
            (out / "data" / folder).mkdir(parents=True, exist_ok=True)
            xz_copy(src, out / "data" / folder / (src.name.removesuffix(".gz") + ".xz"))
    (out / "data" / QUESTIONS).parent.mkdir(parents=True)
    shutil.copy(data_root / QUESTIONS, out / "data" / QUESTIONS)
    repo = sum(p.stat().st_size for p in ROOT.glob("*") if p.is_file()) + 4 * MIB  # the checkout, with margin
    bpe = ROOT / ".cache" / "tiktoken" / "r50k_base.tiktoken"
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) + bpe.stat().st_size + repo
    print(f"Gutenberg text in the {max_mib - used / MIB:.0f} MiB left:")
    (out / "data" / CORPUS).mkdir(parents=True)
    _, tokens = xz_corpus(sorted((data_root / CORPUS).glob("train_*.jsonl.gz")), out / "data" / CORPUS,
                          int(max_mib * MIB - used))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) + bpe.stat().st_size
    print(f"\n{out}: {total / MIB:.1f} MiB with the BPE file; {tokens:,} Gutenberg tokens")
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"""On the GPU machine (the device tool's run, carry ["{rel}", ".cache/tiktoken"]):
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {rel}/wheels/*.whl && \\
  export PYTHONPATH=/tmp/site && python3 pack_gpu_run.py --unpack {rel} && \\
  python3 gpu_reference.py --data_root {rel}/data --report $OUT --deadline 540""")


def unpack(out: Path) -> None:
    """Decompress every .xz in out/data next to itself (gpu_reference.py reads .jsonl and .jsonl.gz)."""
    for src in sorted((out / "data").rglob("*.xz")):
        with lzma.open(src, "rb") as f, open(src.with_suffix(""), "wb") as dest:
            shutil.copyfileobj(f, dest, 1 << 20)
        src.unlink()
    print(f"unpacked {out / 'data'}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(ROOT / "data" / "gpu_carry"))
    p.add_argument("--unpack", action="store_true", help="on the GPU machine: decompress the carried data")
    p.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--max_mib", type=float, default=62, help="what a call may carry, repository included")
    p.add_argument("--python_version", default="3.12", help="the GPU machine's Python")
    a = p.parse_args(argv)
    if a.unpack:
        return unpack(Path(a.out))
    data_root = Path(a.data_root)
    if not (data_root / CORPUS).is_dir():
        sys.exit(f"error: {data_root}: no {CORPUS} (expected the layout of ../shared/data)")
    pack(data_root, Path(a.out).resolve(), a.max_mib, a.python_version)


if __name__ == "__main__":
    main(sys.argv[1:])
