"""gpu_reference.py: the smoke run (every stage of the GPU reference run at toy sizes on the CPU) and its report."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SHARED_DATA

needs_data = pytest.mark.skipif(not (SHARED_DATA / "pretrain" / "gutenberg_top100_authors").is_dir(),
                                reason=f"the shared data ({SHARED_DATA}) is not here")


def test_missing_data_is_named(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "gpu_reference.py"), "--smoke", "--data_root", str(tmp_path),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert run.returncode == 2
    assert f"{tmp_path}: no Gutenberg train shards, instruct/mix, dialog/oasst1_en_validation, MT-bench" in run.stderr


def test_deadline_shares_time_and_skips_what_cannot_fit(tmp_path, monkeypatch):
    import gpu_reference as g
    ref = g.Reference(g.SMOKE, tmp_path, tmp_path, tmp_path, deadline=200)
    later = sum(g.SMOKE.reserves[n] for n in g.STAGES[g.STAGES.index("pretrain") + 1:])
    assert ref.budget("pretrain") == pytest.approx(200 - later, abs=1)  # under the stage's own 180 s timeout
    assert ref.budget("serve") == pytest.approx(200, abs=1)  # the last stage: all the time left
    cmd = ["python", "pretrain.py", "--max_time", "12", "--log_every", "2"]
    assert ref.fit_max_time(cmd, 100) == cmd  # it fits: unchanged
    assert ref.fit_max_time(cmd, 15) == ["python", "pretrain.py", "--max_time", "7", "--log_every", "2"]
    assert g.Reference(g.SMOKE, tmp_path, tmp_path, tmp_path).fit_max_time(cmd, 15) == cmd  # no deadline

    monkeypatch.setattr(ref, "start", ref.start - 190)  # 10 s left: too little for the finetune reserve
    assert not ref.stage("finetune", ["false"])
    assert ref.report["stages"]["finetune"]["status"] == "skipped"
    assert "deadline" in ref.report["stages"]["finetune"]["reason"]
    assert json.loads((tmp_path / "report.json").read_text())["deadline_s"] == 200
    # a deadline under the stages' least needs shares it out: the first stage still gets its part
    short = g.Reference(g.SMOKE, tmp_path, tmp_path, tmp_path, deadline=sum(g.SMOKE.reserves.values()) * 0.8)
    assert short.budget("env") == pytest.approx(0.8 * g.SMOKE.reserves["env"], abs=1)
    assert short.budget("env") >= short.reserve("env") / 2  # so it runs


def test_bench_serve_figures_are_its_tables_medians_and_a_bad_rate_is_none():
    import gpu_reference as g
    output = "\n".join([
        "   1 clients: 640 tokens in 1.70 s = 372 tokens/s",  # a round's own line: not the figure
        "  16 clients: 4096 tokens in 1.88 s = 2182 tokens/s",
        "| transformers, generate in process | 12.0 ms | 300 (1.00x) |",
        "| ours, GPT.generate in process | 250.3 ms | n/a (1.00x) |",
        "| concurrent clients | aggregate tokens/s | vs 1 | vs one HTTP stream |",
        "|---|---|---|---|",
        "| 1 | 315 | 1.0x | 0.9x |",
        "| 16 | 1979 | 6.3x | 5.8x |"])
    figures = g.parse_bench_serve(output)
    assert figures["aggregate_tok_per_s"] == {1: 315.0, 16: 1979.0}
    assert figures["single_stream"]["ours, GPT.generate in process"] == {"ttft_ms": 250.3, "decode_tok_per_s": None}
    assert figures["single_stream"]["transformers, generate in process"]["decode_tok_per_s"] == 300.0


def test_a_stage_keeps_its_own_seconds_and_stops_with_the_run(tmp_path):
    import gpu_reference as g
    ref = g.Reference(g.SMOKE, tmp_path, tmp_path, tmp_path)
    assert ref.stage("samples", [sys.executable, "-c", "import time; time.sleep(0.5)"],
                     parse=lambda out: {"seconds": 0.01, "questions": 4})
    entry = ref.report["stages"]["samples"]
    assert entry["questions"] == 4 and entry["seconds"] >= 0.5  # the stage's wall time, not the one it reports
    # a run stopped by SIGTERM stops its running stage too (the stage has a session of its own)
    pid_file = tmp_path / "stage.pid"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import gpu_reference as g\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # as main() does\n"
        "stage = 'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(60)'\n"
        "g.run([sys.executable, '-c', stage, sys.argv[1]], g.Path(sys.argv[2]), 100)\n")
    proc = subprocess.Popen([sys.executable, str(driver), str(pid_file), str(tmp_path / "log")])
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    proc.terminate()
    assert proc.wait(timeout=20) == 128 + 15
    for _ in range(100):  # the stage got SIGTERM and is gone
        if not os.path.exists(f"/proc/{stage_pid}") or " Z " in open(f"/proc/{stage_pid}/stat").read():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the stage outlived the run")


def test_steady_rate_leaves_out_warmup_and_padding(tmp_path):
    # Fine-tuning's cumulative "tokens" count padded rows (the schedule's count); the logged rates (train.Meter) count
    # real tokens. The steady rate is their time-weighted mean from the second logged step on, without step 1's
    # compilation.
    import gpu_reference as g
    rows = [(1, 8192, 100.0, 50.0), (2, 16384, 1000.0, 51.0), (4, 32768, 1100.0, 53.0), (8, 65536, 1300.0, 55.0)]
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, tokens, rate, elapsed in rows:
            f.write(json.dumps({"type": "train", "step": step, "tokens": tokens, "loss": 1.0, "tok_per_s": rate,
                                "mfu": None, "elapsed": elapsed}) + "\n")
        f.write(json.dumps({"type": "end", "step": 8, "tokens": 65536, "reason": "max_steps", "elapsed": 55.0}) + "\n")
    out = g.train_log(tmp_path)
    assert out["steady_tok_per_s"] == pytest.approx((2 * 1100 + 2 * 1300) / 4)  # not 49152 tokens / 4 s
    assert out["tok_per_s"] == 1300.0 and out["steps"] == 8 and "steady_mfu" not in out


@pytest.mark.slow
@needs_data
def test_smoke_run_reports_every_stage(tmp_path):
    work, report_dir = tmp_path / "work", tmp_path / "report"
    run = subprocess.run([sys.executable, str(ROOT / "gpu_reference.py"), "--smoke", "--work", str(work),
                          "--report", str(report_dir), "--deadline", "1200"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    st = report["stages"]
    assert [(name, s["status"]) for name, s in st.items()] == [(name, "ok") for name in (
        "env", "tokenize", "pretrain", "plot_pretrain", "bench", "finetune", "plot", "evaluate", "samples", "serve")]
    assert report["finished"] and report["profile"] == "smoke" and report["deadline_s"] == 1200

    meta = json.loads((work / "gutenberg" / "meta.json").read_text())
    assert st["tokenize"]["tokens"] == sum(s["tokens"] for s in meta["splits"].values()) > 100_000
    assert st["tokenize"]["tok_per_s"] == pytest.approx(st["tokenize"]["tokens"] / st["tokenize"]["seconds"])

    pre = st["pretrain"]
    assert pre["first_val_loss"] == pytest.approx(math.log(50304), abs=0.5)  # a fresh model: about uniform
    assert pre["final_val_loss"] < pre["first_val_loss"] - 0.5
    assert pre["steps"] >= 3 and pre["tokens"] == pre["steps"] * 4 * 256 and "max_time" in pre["stop_reason"]
    assert pre["steady_tok_per_s"] > 0 and pre["mfu"] is None  # no MFU on the CPU

    rates = st["bench"]["tok_per_s"]
    assert set(rates) >= {"ours (model.py + train.py)", "transformers GPT2LMHeadModel"}
    ratio = rates["ours (model.py + train.py)"] / rates["transformers GPT2LMHeadModel"]
    assert st["bench"]["ratio"] == pytest.approx(ratio, abs=0.01)

    ft = st["finetune"]
    assert ft["train_examples"] > 1000 and ft["val_examples"] > 0 and ft["final_val_loss"] < ft["first_val_loss"]
    (held_out,) = st["evaluate"]["losses"]
    assert held_out["data"].endswith("oasst1_en_validation.jsonl") and held_out["tokens"] > 1000
    assert held_out["perplexity"] == pytest.approx(math.exp(held_out["loss"]), rel=1e-6)

    answers = st["samples"]["answers"]
    assert [a["question_id"] for a in answers] == [81, 82, 83, 84]
    assert all(1 <= a["tokens"] <= 16 and isinstance(a["answer"], str) for a in answers)

    serve = st["serve"]
    assert serve["identical_to_transformers"] is True
    assert set(serve["aggregate_tok_per_s"]) >= {"16", "64"} and min(serve["aggregate_tok_per_s"].values()) > 0
    assert serve["single_stream"]["ours, GPT.generate in process"]["decode_tok_per_s"] > 0

    md = (report_dir / "report.md").read_text()
    assert f"| tokenize | ok | {st['tokenize']['seconds']:.1f} |" in md
    assert f"{pre['first_val_loss']:.3f} -> {pre['final_val_loss']:.3f}" in md
    assert f"| 64 | {serve['aggregate_tok_per_s']['64']:,.0f} |" in md
    assert "![losses: pretraining, then fine-tuning](loss.png)" in md and answers[0]["question"] in md
    assert (report_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "$ " in (report_dir / "run.log").read_text()
