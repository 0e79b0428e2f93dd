"""plot_loss.py on hand-written run logs: curves, the pretraining -> fine-tuning timeline, PNG output, errors."""

import json
import struct

import pytest

from plot_loss import ema, main, plot_runs


def write_log(run_dir, kind, n_steps, tokens_per_step, init_from=None, extra_lines=""):
    run_dir.mkdir(parents=True)
    records = [{"type": "run", "kind": kind, "init_from": init_from, "config": {}}]
    for step in range(1, n_steps + 1):
        records.append({"type": "train", "step": step, "tokens": step * tokens_per_step, "loss": 10 / step,
                        "lr": 1e-3 * step / n_steps, "grad_norm": 1.0, "tok_per_s": 1.0, "mfu": None, "elapsed": step})
        if step % 5 == 0:
            records.append({"type": "eval", "step": step, "tokens": step * tokens_per_step, "val_loss": 11 / step})
    records.append({"type": "end", "step": n_steps})
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra_lines)
    return run_dir


def png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_pretraining_and_finetuning_read_as_one_timeline(tmp_path):
    pre = write_log(tmp_path / "pre", "pretrain", 20, 1000)
    ft = write_log(tmp_path / "ft", "finetune", 10, 100, init_from=str(pre / "best"))
    data = plot_runs([pre, ft], tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (1000, 600)
    assert data["pre"]["offset"] == 0 and data["pre"]["x"] == list(range(1, 21))
    assert data["ft"]["offset"] == 20 and data["ft"]["x"] == list(range(21, 31))
    assert data["ft"]["val_x"] == [25, 30] and data["ft"]["val_loss"] == pytest.approx([11 / 5, 11 / 10])
    assert data["pre"]["loss"] == pytest.approx([10 / s for s in range(1, 21)])
    assert data["pre"]["lr"][-1] == pytest.approx(1e-3)
    smooth = data["pre"]["smooth"]
    assert smooth[0] == pytest.approx(10) and smooth[-1] > data["pre"]["loss"][-1]  # lags behind a falling loss

    by_tokens = plot_runs([pre, ft], tmp_path / "tokens.png", x="tokens")
    assert by_tokens["ft"]["offset"] == 20_000 and by_tokens["ft"]["x"][0] == 20_100
    alone = plot_runs([ft], tmp_path / "alone.png")  # without its pretraining run: no offset
    assert alone["ft"]["offset"] == 0 and alone["ft"]["x"][0] == 1



def test_the_loss_axis_is_logarithmic_unless_asked_for_linear(tmp_path, monkeypatch):
    """A run falls from ln(vocabulary) to a fraction of a nat: on a linear axis all but its first steps are flat."""
    from matplotlib.figure import Figure
    scales, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (scales.append(fig.axes[0].get_yscale()),
                                                                  save(fig, *a, **k)))
    run = write_log(tmp_path / "run", "pretrain", 20, 1000)
    plot_runs([run], tmp_path / "log.png")
    main([str(run), "--out", str(tmp_path / "linear.png"), "--y", "linear"])
    assert scales == ["log", "linear"]
    with pytest.raises(ValueError, match="y must be 'log' or 'linear'"):
        plot_runs([run], tmp_path / "x.png", y="symlog")


def test_a_relative_init_from_given_elsewhere_still_links_the_runs(tmp_path, monkeypatch):
    """make demo fine-tunes from checkpoints/demo-pretrain, relative to the clone: plotted from another folder,
    the runs still read as one timeline (by the folder's name)."""
    pre = write_log(tmp_path / "clone" / "checkpoints" / "demo-pretrain", "pretrain", 20, 1000)
    ft = write_log(tmp_path / "clone" / "checkpoints" / "demo-chat", "finetune", 10, 100,
                   init_from="checkpoints/demo-pretrain")
    monkeypatch.chdir(tmp_path)
    data = plot_runs([pre, ft], tmp_path / "loss.png")
    assert data["demo-chat"]["offset"] == 20 and data["demo-pretrain"]["offset"] == 0

def test_runs_without_a_link_are_overlaid(tmp_path):
    a = write_log(tmp_path / "a", "pretrain", 10, 10)
    b = write_log(tmp_path / "b", "pretrain", 15, 10, init_from="/somewhere/else")
    data = plot_runs([a, b], tmp_path / "loss.png", smooth=0)
    assert [d["offset"] for d in data.values()] == [0, 0] and data["b"]["smooth"] == data["b"]["loss"]


def test_a_non_finite_loss_is_left_out_of_the_curves(tmp_path):
    run = write_log(tmp_path / "run", "pretrain", 20, 10)
    lines = (run / "log.jsonl").read_text().replace('"loss": 2.0,', '"loss": NaN,')  # step 5
    lines = lines.replace('"loss": 0.625,', '"loss": null,')  # step 16: a skipped step, as train.py logs it
    (run / "log.jsonl").write_text(lines.replace('"val_loss": 1.1}', '"val_loss": Infinity}'))  # step 10
    data = plot_runs([run], tmp_path / "loss.png")["run"]
    steps = [s for s in range(1, 21) if s not in (5, 16)]
    assert data["x"] == steps and data["loss"] == pytest.approx([10 / s for s in steps])
    assert data["smooth"] == pytest.approx(ema(data["loss"], 1 - 10 / 18))  # spans a tenth of the 18 points
    assert data["val_x"] == [5, 15, 20]


def test_ema_is_bias_corrected():
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])


def test_cli_writes_the_png(tmp_path, capsys):
    run = write_log(tmp_path / "run", "pretrain", 10, 10, extra_lines='{"type": "train", "ste')  # killed mid-line
    main([str(run), "--out", str(tmp_path / "out.png"), "--x", "tokens"])
    assert png_size(tmp_path / "out.png") == (1000, 600)
    assert "run (10 train / 2 val points)" in capsys.readouterr().out


def test_cli_creates_the_folder_of_out(tmp_path):
    run = write_log(tmp_path / "run", "pretrain", 10, 10)
    main([str(run), "--out", str(tmp_path / "new" / "dir" / "loss.png")])
    assert png_size(tmp_path / "new" / "dir" / "loss.png") == (1000, 600)


@pytest.mark.parametrize("args, message", [(["--smooth", "1"], "smooth must be in [0, 1), got 1.0"),
                                           (["--smooth", "-0.5"], "smooth must be in [0, 1), got -0.5"),
                                           (["--out", "file/loss.png"], "file: File exists")])
def test_a_bad_smooth_or_an_out_that_cannot_be_written_is_exit_2(tmp_path, capsys, monkeypatch, args, message):
    run = write_log(tmp_path / "run", "pretrain", 10, 10)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(run), *args])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


@pytest.mark.parametrize("content, message", [(None, "no such log"), ("", "empty log"),
                                              ('{"type": "run"}\n', "empty log"),
                                              ('{"type": "run"}\n{oops\n{"type": "end"}\n', "line 2: not valid JSON")])
def test_a_missing_empty_or_broken_log_is_exit_2_naming_the_file(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "log.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        main([str(run), "--out", str(tmp_path / "loss.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(run / "log.jsonl") in err and message in err
    assert not (tmp_path / "loss.png").exists()
