import pytest

from streamgen.config import RunConfig, parse_config, slots_per_rank
from streamgen.errors import UsageError


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classes: imagenet100:5\ngenerator:\n  steps: 20\n  guidance: 2.0\ntrain:\n  arch: resnet18\n")
    cfg = parse_config(["--config", str(path), "--generator.steps", "30", "--generators", "3"])
    assert cfg.classes == "imagenet100:5" and cfg.generator.guidance == 2.0
    assert cfg.generator.steps == 30 and cfg.generators == 3 and cfg.train.arch == "resnet18"
    assert cfg.train.crop == RunConfig().train.crop


def test_defaults_follow_the_paper():
    cfg = RunConfig()
    assert (cfg.generator.steps, cfg.generator.guidance, cfg.generator.resolution) == (50, 7.5, 512)
    assert cfg.model == "CompVis/stable-diffusion-v1-4" and cfg.generator.safety_checker is False


@pytest.mark.parametrize(
    "yaml_text, flags, message",
    [
        ("generator:\n  stepz: 3\n", [], "unknown config key 'generator.stepz'"),
        ("colour: red\n", [], "unknown config key 'colour'"),
        ("generator: 3\n", [], "'generator' must be a section"),
        ("generator:\n  steps: many\n", [], "generator.steps must be int"),
        ("[1, 2", [], "is not valid YAML"),
        ("", ["--generator.guidance", "-1"], "guidance must be >= 0"),
        ("", ["--generator.steps", "0"], "steps must be at least 1"),
        ("", ["--generator.resolution", "100"], "multiple of 8"),
        ("", ["--generators", "0"], "--generators must be at least 1"),
        ("", ["--stream.slots", "0"], "a queue of zero slots"),
        ("", ["--stream.batch_size", "10", "--generator.batch_size", "4"], "multiple of --generator.batch_size"),
        ("", ["--generator.scheduler", "euler"], "euler-a, lcm, tcd .got .euler."),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, yaml_text, flags, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(path), *flags])


def test_unreadable_config(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--generator.stepz", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_default_slots_keep_every_generator_busy():
    cfg = RunConfig(generators=8, trainers=2)
    assert slots_per_rank(cfg) == 6


def _numeric_keys() -> list[str]:
    from streamgen.config import _base_type, config_keys

    return [k for k, hint in config_keys().items() if _base_type(hint)[0] in (int, float)]


@pytest.mark.parametrize("key", _numeric_keys())
def test_no_number_in_a_config_may_be_negative(key):
    with pytest.raises(UsageError, match=f"--{key} must be"):
        parse_config([f"--{key}", "-1"])


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_floats_must_be_finite(value):
    with pytest.raises(UsageError, match="--train.lr must be a finite number"):
        parse_config(["--train.lr", value])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train.crop", "0"], "--train.crop must be at least"),
        (["--train.log_every", "0"], "--train.log_every must be at least 1"),
        (["--train.val_every", "0"], "--train.val_every must be at least 1"),
        (["--train.val_batch_size", "0"], "--train.val_batch_size must be at least 1"),
        (["--train.keep_checkpoints", "0"], "--train.keep_checkpoints must be at least 1"),
        (["--train.lr", "0"], "--train.lr must be > 0"),
        (["--train.momentum", "1"], "--train.momentum must be in"),
        (["--seed", str(2**63)], "--seed must be below 2"),
        (["--generator.batch_size", "0"], "--generator.batch_size must be at least 1"),  # once a ZeroDivisionError
        (["--name", ".."], "plain folder name"),
        (["--name", "a/b"], "plain folder name"),
        (["--name", ""], "plain folder name"),
    ],
)
def test_training_values_are_checked(flags, message):
    with pytest.raises(UsageError, match=message):
        parse_config(flags)


def test_the_largest_seed_is_accepted():
    assert parse_config(["--seed", str(2**63 - 1)]).seed == 2**63 - 1


def test_binary_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(UsageError, match="is not a text file"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "2**70", "3.5"])
def test_an_integer_key_refuses_non_integers(value):
    with pytest.raises(UsageError, match="config key seed must be int"):
        parse_config(["--seed", value])


# -- the command line (build_parser / parse_config) ----------------------------------------


def test_help_shows_the_defaults_a_config_resolves_to(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("generator:\n  steps: 7\ntrain:\n  arch: resnet18\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(path), "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "denoising steps (the paper: 50) (default: 7, from c.yaml)" in text
    assert "(default: resnet18, from c.yaml)" in text
    assert f"(default: {RunConfig().generator.guidance})" in text  # not in the config: the built-in default


def test_every_option_states_one_default(capsys):
    import re

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = re.split(r" (?=--[a-z_.]+ )", text)
    assert not [
        o for o in options if o.count("default:") > 1
    ]  # was: '(default: generators/trainers + 2) (default: None)'
    assert "queue slots per trainer rank (default: generators/trainers + 2) --" in text


def test_train_py_help_is_quick_and_imports_no_torch():
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = "import runpy, sys; sys.argv = ['train.py', '--help']\ntry:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False"), out.stdout[-500:] + out.stderr[-500:]  # torch alone takes seconds
    assert "every config key is a flag" in out.stdout and time.monotonic() - started < 60


def test_an_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--generator.stpes", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert err.endswith("unknown flag --generator.stpes (did you mean --generator.steps?)")
    with pytest.raises(SystemExit):
        parse_config(["--generator.step", "3"])  # no silent abbreviations
    assert "did you mean --generator.steps?" in capsys.readouterr().err


def test_boolean_flags_work_bare():
    assert parse_config(["--generator.safety_checker"]).generator.safety_checker is True
    assert parse_config(["--generator.safety_checker", "false"]).generator.safety_checker is False
    assert parse_config(["--generator.channels_last", "--seed", "3"]).seed == 3


def test_choices_are_checked_for_flags_and_yaml(tmp_path):
    assert parse_config(["--stream.order", "arrival"]).stream.order == "arrival"
    assert RunConfig().stream.order == "increasing"
    path = tmp_path / "c.yaml"
    path.write_text("stream:\n  order: random\n")
    with pytest.raises(UsageError, match="--stream.order must be increasing or arrival"):
        parse_config(["--config", str(path)])
