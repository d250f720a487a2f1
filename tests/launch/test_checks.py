"""The launcher's checks of user input that need more than the values (streamgen.launch.checks)."""

from __future__ import annotations

import typing

import pytest
import torch
import torchvision

from streamgen.config import TrainConfig
from streamgen.errors import UsageError
from streamgen.launch.checks import (
    PRECISIONS,
    check_arch,
    check_model_components,
    check_precision,
    check_resume_model,
    check_run_folder,
)


def test_the_precisions_are_lightnings():
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    accepted = {*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS)}
    accepted |= {str(p) for p in typing.get_args(_PRECISION_INPUT_INT)}
    assert set(PRECISIONS) == accepted | {"auto"}


@pytest.mark.parametrize("precision", ["17-mixed", "fp16", "bf16-mixedd", ""])
def test_unknown_precisions_are_refused(precision):
    with pytest.raises(UsageError, match="not a Lightning precision"):
        check_precision(precision)


def test_every_torchvision_classifier_is_an_arch_and_nothing_else():
    for arch in torchvision.models.list_models(module=torchvision.models):
        check_arch(arch)
    for other in ("fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18", "resnet"):
        with pytest.raises(UsageError, match="not a torchvision classification model"):
            check_arch(other)
    with pytest.raises(UsageError, match=r"did you mean resnet50\?"):
        check_arch("resnet5O")


def test_the_run_folder_is_checked_without_creating_it(tmp_path):
    check_run_folder(str(tmp_path / "a" / "b"), "run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_run_folder(str(tmp_path / "file"), "run")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_run_folder(str(tmp_path / "file" / "deeper"), "run")
    with pytest.raises(UsageError, match="cannot create folders in /proc"):
        check_run_folder("/proc/streamgen", "run")


def test_a_model_folder_needs_its_components(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "sd")
    check_model_components(str(tmp_path / "sd"))
    (tmp_path / "sd" / "unet" / "config.json").unlink()
    with pytest.raises(UsageError, match="has no unet/config.json"):
        check_model_components(str(tmp_path / "sd"))


def test_a_resumed_checkpoint_must_hold_this_runs_network(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"arch": "resnet50", "head": "linear"}}, path)
    check_resume_model(str(path), TrainConfig(arch="resnet50"))
    with pytest.raises(UsageError, match="resume with --train.arch resnet50"):
        check_resume_model(str(path), TrainConfig(arch="resnet18"))
    torch.save({"state_dict": {}}, path)  # no hyper-parameters to compare: nothing to say
    check_resume_model(str(path), TrainConfig(arch="resnet18"))


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--train.head", "trex-ocm", "--train.memory_size", "12", "--trainers", "2"],
            "--train.memory_size 12 is smaller than one global batch (2 rank(s) x 8 images)",
        ),
        (
            ["--train.augment", "multicrop", "--train.global_blur_p", "1.2"],
            "--train.global_blur_p must be a probability",
        ),
        (["--train.warmup_fraction", "1.5"], "--train.warmup_fraction must be in [0, 1)"),
    ],
)
def test_a_bad_recipe_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args, message):
    import os

    from conftest import ROOT, descendants

    from streamgen.launch.launcher import main

    code = main(
        ["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), "--model", "fake", *args]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())
