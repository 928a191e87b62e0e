"""cache.cli.config: a frozen dataclass's fields declare the CLI (types, choices, help, bounds); presets and flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cache.cli.config import ConfigError, check_fields, parse_config
from trainer.train import PRESETS as TRAIN_PRESETS
from trainer.train import TrainConfig


@dataclass(frozen=True)
class Toy:
    """A toy config."""

    name: str = field(default="", metadata={"help": "what to call it"})
    size: int = field(default=8, metadata={"help": "how big it is", "min": 1})
    rate: float = field(default=0.5, metadata={"help": "how fast"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "which way to run"})
    kind: str = field(default="a", metadata={"help": "kind from a table", "choices": ("a", "b")})
    interval: tuple[float, float] = field(default=(0.0, 0.7), metadata={"help": "LO HI"})
    tags: tuple[str, ...] = field(default=("x",), metadata={"help": "some tags", "choices": ("x", "y", "z")})
    compile: bool = field(default=False, metadata={"help": "compile it"})

    def __post_init__(self) -> None:
        check_fields(self)


TOY_PRESETS = {"big": {"size": 64, "rate": 0.25}, "bad": {"colour": "red"}}


def test_defaults_then_preset_then_flags():
    cfg, dry = parse_config(Toy, [])
    assert cfg == Toy() and not dry
    cfg, _ = parse_config(Toy, ["--preset", "big"], presets=TOY_PRESETS)
    assert (cfg.size, cfg.rate, cfg.mode) == (64, 0.25, "fast")
    cfg, _ = parse_config(Toy, ["--preset", "big", "--size", "3", "--mode", "slow"], presets=TOY_PRESETS)
    assert (cfg.size, cfg.rate, cfg.mode) == (3, 0.25, "slow")
    cfg, _ = parse_config(Toy, [], presets=TOY_PRESETS, default_preset="big")
    assert cfg.size == 64


def test_train_config_precedence():
    argv = ["--cache", "c.zarr", "--out", "r"]
    cfg, _ = parse_config(TrainConfig, argv)
    assert cfg.lr == TrainConfig.__dataclass_fields__["lr"].default and cfg.model == "sitdown-xl"
    cfg, _ = parse_config(TrainConfig, [*argv, "--preset", "demo"], presets=TRAIN_PRESETS)
    assert (cfg.model, cfg.lr, cfg.steps) == ("tiny", TRAIN_PRESETS["demo"]["lr"], TRAIN_PRESETS["demo"]["steps"])
    cfg, _ = parse_config(TrainConfig, [*argv, "--preset", "demo", "--steps", "7", "--precision", "bf16"],
                          presets=TRAIN_PRESETS)
    assert (cfg.model, cfg.steps, cfg.precision) == ("tiny", 7, "bf16")


@pytest.mark.parametrize("argv,flag", [(["--mode", "medium"], "--mode"), (["--kind", "c"], "--kind"),
                                       (["--tags", "x", "w"], "--tags")])
def test_choices_are_refused_by_the_cli_with_a_usage_error(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Toy, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and flag in err and "invalid choice" in err


def test_train_precision_choice_is_refused_by_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--cache", "c", "--out", "o", "--precision", "fp8"])
    assert e.value.code == 2 and "--precision" in capsys.readouterr().err


def test_choices_and_bounds_are_checked_when_built_in_python():
    with pytest.raises(ConfigError, match=r"--mode must be one of fast, slow, got 'medium'"):
        Toy(mode="medium")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"--kind must be one of a, b"):
        Toy(kind="c")
    with pytest.raises(ConfigError, match=r"--tags must be one of x, y, z, got 'w'"):
        Toy(tags=("x", "w"))
    with pytest.raises(ConfigError, match=r"--size must be >= 1, got 0"):
        Toy(size=0)
    with pytest.raises(ConfigError, match=r"--precision must be one of fp32, tf32, bf16, fp16, got 'fp8'"):
        TrainConfig(cache="c", out="o", precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"--model must be one of .*sitdown-xl"):
        TrainConfig(cache="c", out="o", model="nope")
    with pytest.raises(ConfigError, match=r"--batch-size must be from 1 to 1048576, got 0"):
        TrainConfig(cache="c", out="o", batch_size=0)
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        assert TrainConfig(cache="c", out="o", precision=precision).precision == precision


def test_bound_is_refused_by_the_cli_with_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--size", "0"])
    assert "--size must be >= 1, got 0" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(capsys):
    cfg, dry = parse_config(Toy, ["--preset", "big", "--mode", "slow", "--dry-run"], presets=TOY_PRESETS)
    assert dry
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"name": "", "size": 64, "rate": 0.25, "mode": "slow", "kind": "a", "interval": [0.0, 0.7],
                       "tags": ["x"], "compile": False}
    cfg, dry = parse_config(TrainConfig, ["--cache", "c", "--out", "o", "--dry-run"])
    assert dry and json.loads(capsys.readouterr().out)["precision"] == cfg.precision


def test_unknown_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Toy, ["--colour", "red"])
    assert e.value.code == 2 and "unrecognized arguments: --colour" in capsys.readouterr().err


def test_a_preset_setting_an_unknown_field_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--preset", "bad"], presets=TOY_PRESETS)
    assert "preset sets unknown fields ['colour']" in capsys.readouterr().err


def test_tuple_and_list_fields():
    cfg, _ = parse_config(Toy, ["--interval", "0", "0.5", "--tags", "y", "z"])
    assert cfg.interval == (0.0, 0.5) and cfg.tags == ("y", "z")
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--interval", "0"])


def test_bool_flags():
    assert parse_config(Toy, ["--compile"])[0].compile is True
    assert parse_config(Toy, ["--no-compile"])[0].compile is False
    cfg, _ = parse_config(TrainConfig, ["--cache", "c", "--out", "o", "--no-tensorboard", "--compile"])
    assert (cfg.tensorboard, cfg.compile) == (False, True)


def test_help_comes_from_the_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Toy, ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert out.startswith("usage:") and "A toy config." in out
    assert "{fast,slow}" in out and "{a,b}" in out and "{x,y,z}" in out
    assert "which way to run (default: fast)" in out and "how big it is (>= 1; default: 8)" in out
    assert "--compile, --no-compile compile it (default: False)" in out


def test_train_help_shows_each_choice_and_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,tf32,bf16,fp16}" in out and "--upsample {bilinear,nearest}" in out
    assert "global batch (all ranks and accumulation steps together) (1 to 1048576; default: 256)" in out
    assert out.count("(default: sitdown-xl)") == 1


def _entry_point_configs() -> list[type]:
    """The config dataclass of every module that builds a CLI with parse_config (found by reading the sources, so a
    new entry point is walked too)."""
    import dataclasses
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for package in ("pipeline", "trainer", "tools", "cache"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "config.py" and package == "cache" or "parse_config(" not in path.read_text():
                continue
            module = importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
            configs = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
                       and c.__module__ == module.__name__ and f"parse_config({c.__name__}" in path.read_text()]
            assert configs, f"{path}: no config dataclass passed to parse_config"
            found += configs
    return found


def test_every_numeric_option_of_every_entry_point_declares_a_range_holding_its_default():
    import dataclasses
    import typing

    from cache.cli.config import _field_type

    configs = _entry_point_configs()
    names = {c.__name__ for c in configs}
    assert {"BuildConfig", "TrainConfig", "SampleConfig", "EvalConfig", "ConvertConfig"} <= names, names
    checked = 0
    for cls in configs:
        for f in dataclasses.fields(cls):
            tp = _field_type(cls, f)
            items = typing.get_args(tp) if typing.get_origin(tp) is tuple else (tp,)
            if not set(items) - {Ellipsis} <= {int, float}:
                continue
            checked += 1
            low, high = f.metadata.get("min"), f.metadata.get("max")
            assert low is not None and high is not None and low <= high, f"{cls.__name__}.{f.name} declares no range"
            defaults = f.default if isinstance(f.default, tuple) else (f.default,)
            assert all(low <= d <= high for d in defaults), f"{cls.__name__}.{f.name}: default {f.default} outside range"
    assert checked > 50


def test_ranges_are_checked_with_a_maximum_and_shown_in_help(capsys):
    from tools.sample import SampleConfig

    with pytest.raises(SystemExit):
        parse_config(SampleConfig, ["--help"])
    assert "(0 to 10000; default: 0)" in " ".join(capsys.readouterr().out.split())
    for value in ("10000000000", "100000000000000000000", "-1"):
        with pytest.raises(SystemExit):
            parse_config(SampleConfig, ["--run", "r", "--out", "o", "--steps", value])
        assert f"--steps must be from 0 to 10000, got {value}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--interval must be from 0 to 1, got 1.5"):
        SampleConfig(run="r", out="o", interval=(0.0, 1.5))
    with pytest.raises(ConfigError, match=r"--cfg must be from 0 to 100, got nan"):
        SampleConfig(run="r", out="o", cfg=float("nan"))


def test_a_huge_step_count_is_one_parse_error_in_a_real_process(tmp_path):
    """`tools.sample --steps 1e20` (as an integer): exit 2 with argparse's usage and one error line naming the option
    and its range, before anything is read or written (today: an overflow traceback)."""
    import subprocess
    import sys

    from conftest import ROOT, _env

    proc = subprocess.run([sys.executable, "-m", "tools.sample", "--run", str(tmp_path / "r"), "--out",
                           str(tmp_path / "o"), "--steps", "1" + "0" * 20], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"python -m tools.sample: error: --steps must be from 0 to 10000, got 1{'0' * 20}"
    assert not (tmp_path / "o").exists()
