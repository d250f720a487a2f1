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
        ("", ["--generator.scheduler", "euler"], "default, ddim or dpm++"),
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
