import dataclasses
import json

import pytest
import torch

from config import PRESETS, ConfigError, ModelConfig, ServeConfig, TrainConfig, FinetuneConfig, parse_args
from evaluate import EvalConfig
from model import GPT


def parse(argv, *sections, max_positional=0):
    sections = sections or (TrainConfig(), ModelConfig())
    pos = parse_args(argv, list(sections), max_positional)
    return sections, pos


def test_defaults_preset_file_and_command_line_in_that_order(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.01, "n_layer": 3}))
    (train, model), _ = parse(["--preset", "tiny", "--config", str(f), "--n-layer", "5", "--max_steps=7"])
    assert model.n_embd == PRESETS["tiny"]["n_embd"]  # preset
    assert train.lr == 0.01  # file over preset
    assert model.n_layer == 5  # command line over file
    assert train.max_steps == 7


def test_the_tiny_preset_trains_with_what_the_cpu_speedrun_measured():
    import bench  # the settings live with the benchmark that measured them

    shape, parley = bench.SPEEDRUN["cpu"]["shape"].split(), bench.SPEEDRUN["cpu"]["parley"].split()
    (measured, measured_model), _ = parse(shape + parley)
    (preset, preset_model), _ = parse(["--preset", "tiny"])
    for field in ("optimizer", "lr", "muon_lr", "schedule", "warmup_steps"):
        assert getattr(preset, field) == getattr(measured, field), field
    for field in ("n_layer", "n_head", "n_embd", "block_size", "rope", "smear"):
        assert getattr(preset_model, field) == getattr(measured_model, field), field
    assert preset.optimizer == "muon"


def test_gpt2_presets_have_the_published_shapes():
    (_, m), _ = parse(["--preset", "gpt2"])
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    (_, m), _ = parse(["--preset", "gpt2-medium"])
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (24, 16, 1024, 1024)
    (_, m), _ = parse(["--preset", "gpt2-large"])
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (36, 20, 1280, 1024)
    (_, m), _ = parse(["--preset", "gpt2-xl"])
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (48, 25, 1600, 1024)


@pytest.mark.parametrize("preset, published", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                               ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_presets_have_the_published_parameter_counts(preset, published):
    """Hugging Face's GPT-2 checkpoints' counts (tied output layer, 50,257 ids); ours pads the vocabulary to 50,304
    rows. Built on the meta device: no memory, no initialization."""
    (train, m), _ = parse(["--preset", preset])
    with torch.device("meta"):
        model = GPT(m)
    assert model.num_params(non_embedding=False) == published + (50304 - 50257) * m.n_embd
    assert train.batch_tokens == 524288 and train.batch_size * m.block_size <= train.batch_tokens


def test_types_bools_lists_and_positionals():
    (train, _), pos = parse(["a.txt", "--resume", "--compile", "false", "b.txt", "--lr", "3e-4"], max_positional=None)
    assert train.resume is True and train.compile is False and train.lr == 3e-4 and pos == ["a.txt", "b.txt"]
    (ft, train), _ = parse(["--data", "x.jsonl", "y.jsonl", "--max-steps", "1e3"], FinetuneConfig(), TrainConfig())
    assert ft.data == ["x.jsonl", "y.jsonl"] and train.data == "data/demo" and train.max_steps == 1000
    (s,), _ = parse(["--cors-origins", "http://a", "http://b"], ServeConfig())
    assert s.cors_origins == ["http://a", "http://b"]
    (s,), _ = parse(["--cors-origins=http://a,http://b"], ServeConfig())
    assert s.cors_origins == ["http://a", "http://b"]


@pytest.mark.parametrize("argv, message", [
    (["--n_layers", "3"], "unknown field 'n_layers'"),
    (["--n_layer", "three"], "field 'n_layer' expects int"),
    (["--n_layer", "2.5"], "field 'n_layer' expects int"),
    (["--lr", "fast"], "field 'lr' expects float"),
    (["--compile", "maybe"], "field 'compile' expects bool"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--lr"], "--lr needs a value"),
    (["stray"], "unexpected argument"),
])
def test_errors_name_the_field_and_type(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1,\n "n_layer": }')
    with pytest.raises(ConfigError, match="line 2"):
        parse(["--config", str(bad)])
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"n_layer": "x"}')
    with pytest.raises(ConfigError, match="n_layer.*expects int"):
        parse(["--config", str(wrong)])
    with pytest.raises(ConfigError, match="unknown field 'colour'.*wrong2.json"):
        (tmp_path / "wrong2.json").write_text('{"colour": 1}')
        parse(["--config", str(tmp_path / "wrong2.json")])


def test_a_time_or_token_limit_lifts_the_presets_step_limit(tmp_path):
    (train, _), _ = parse(["--preset", "tiny", "--max_time", "300"])
    assert train.max_steps == 0 and train.max_time == 300  # the preset's 100 steps would stop it first
    (train, _), _ = parse(["--preset", "tiny", "--max_tokens", "1e6"])
    assert train.max_steps == 0
    (train, _), _ = parse(["--preset", "tiny", "--max_time", "300", "--max_steps", "50"])
    assert train.max_steps == 50  # both given: the first reached stops the run
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"max_time": 60}))
    (train, _), _ = parse(["--preset", "tiny", "--config", str(f)])
    assert train.max_steps == 0
    (train, _), _ = parse(["--preset", "tiny"])
    assert train.max_steps == PRESETS["tiny"]["max_steps"]


def test_progress_bars_update_rarely_in_a_log_file(monkeypatch, tmp_path):
    import io

    from config import progress_interval

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with open(tmp_path / "log", "w") as log:
        assert progress_interval(log) == 30.0  # CI logs, `make demo > log`: one update per half minute
    assert progress_interval(Terminal()) == 0.1
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert progress_interval(Terminal()) == 5.0


def test_help_lists_a_field_once_where_two_sections_share_it(capsys):
    """The first section that has a field takes it (apply_overrides): the later one's can never be set, and its
    default would mislead."""
    @dataclasses.dataclass
    class First:
        data: list[str] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class Second:
        data: str = "data/demo"
        out: str = "o"

    with pytest.raises(SystemExit):
        parse_args(["--help"], [First(), Second()])
    printed = capsys.readouterr().out
    assert printed.count("--data ") == 1 and "default: []" in printed and "'data/demo'" not in printed
    assert "--out" in printed


def test_presets_are_offered_only_where_they_set_something(capsys):
    """A script without a model to shape (serve, evaluate, chat) lists no presets in --help and refuses --preset,
    which it would otherwise ignore without a word, or take for its own batch size (evaluate)."""
    for section in (ServeConfig(), EvalConfig()):
        with pytest.raises(SystemExit):
            parse_args(["--help"], [section])
        assert "presets:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--help"], [TrainConfig(), ModelConfig()])
    assert "presets: tiny" in capsys.readouterr().out
    for section in (ServeConfig(), EvalConfig()):
        with pytest.raises(ConfigError, match="--preset tiny: .* which this script does not have"):
            parse_args(["--preset", "tiny"], [section])
