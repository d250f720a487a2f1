"""Few-step and cached generator options in the launcher: bad input refused before start, cost resolved."""

import importlib.util
import os

import pytest
from conftest import ROOT, descendants, make_lora

from streamgen.config import GeneratorConfig, parse_config
from streamgen.errors import UsageError
from streamgen.generate.diffusion import check_guidance
from streamgen.launch.checks import prepare
from streamgen.launch.launcher import main, resolved_config

SMOKE = str(ROOT / "configs/smoke_tiny.yaml")


def run(tmp_path, capsys, *args) -> tuple[int, str]:
    code = main(["--config", SMOKE, "--out", str(tmp_path / "runs"), *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--generator.scheduler", "lcm", "--generator.steps", "80"], "--generator.steps 80 does not work with"),
        (["--generator.scheduler", "euler-a", "--generator.eta", "0.3"], "--generator.eta is read by the ddim and tcd"),
        (
            ["--generator.lora", "/nonexistent/lora.safetensors"],
            "--generator.lora '/nonexistent/lora.safetensors' not found",
        ),
        (["--generator.unet", "/nonexistent/unet"], "--generator.unet '/nonexistent/unet' not found"),
        (["--generator.tome", "0.9"], "--generator.tome must be at most 0.75"),
        (["--generator.scheduler", "heun"], "--generator.scheduler must be default, ddim, dpm++, euler-a, lcm, tcd"),
        (["--generator.deepcache", "3", "--generator.compile", "on"], "--generator.deepcache cannot run under"),
    ],
)
def test_bad_generator_options_are_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args, message):
    if "--generator.deepcache" in args and importlib.util.find_spec("DeepCache") is None:
        message = "--generator.deepcache needs the DeepCache package"
    code, err = run(tmp_path, capsys, *args)
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


def test_a_lora_for_another_model_is_refused_by_the_launcher(tmp_path, capsys):
    pytest.importorskip("peft")
    other = make_lora(tmp_path / "sd2", cross_attention_dim=48)
    code, err = run(tmp_path, capsys, "--generator.lora", str(other))
    assert code == 2 and len(err.splitlines()) == 1
    assert "is for another model" in err and "--generator.lora" in err
    assert not (tmp_path / "runs").exists()


def test_guidance_with_a_model_distilled_without_it_is_refused():
    with pytest.raises(
        UsageError, match=r"--generator.guidance 7.5 with --model /models/sd-turbo: sd-turbo is distilled"
    ):
        check_guidance(GeneratorConfig(guidance=7.5), "/models/sd-turbo")
    with pytest.raises(UsageError, match=r"--generator.unet .*dmd2.*use --generator.guidance 0"):
        check_guidance(GeneratorConfig(guidance=2.0, unet="/models/DMD2-sd15-unet"), "/models/sd15")
    check_guidance(GeneratorConfig(guidance=0.0), "/models/sd-turbo")
    check_guidance(GeneratorConfig(guidance=7.5), "/models/stable-diffusion-v1-4")


def test_the_resolved_config_holds_the_cost_of_one_image(tmp_path):
    cfg = parse_config(["--config", SMOKE, "--out", str(tmp_path / "runs"), "--generator.scheduler", "lcm"])
    resolved = resolved_config(prepare(cfg))
    cost = resolved["cost"]
    assert cost["unet_calls"] == cfg.generator.steps and cost["tflop_per_image"] > 0
    assert cost["ratio_to_paper"] == pytest.approx(cost["tflop_per_image"] / cost["paper_tflop_per_image"])
    assert resolved["generator"]["lora"] == [] and resolved["generator"]["scheduler"] == "lcm"
