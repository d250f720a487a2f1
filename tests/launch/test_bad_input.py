"""Bad input of issue 24: one line, exit 2, nothing created or started."""

import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, descendants

from streamgen.errors import UsageError
from streamgen.launch.launcher import main as train_main
from streamgen.plan.classes import load_classes
from streamgen.train.stream_data import StreamDataModule

SMOKE = str(ROOT / "configs/smoke_tiny.yaml")


def refused(capsys, tmp_path, args: list[str], message: str, main=train_main) -> str:
    children = set(descendants(os.getpid()))
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists() and set(descendants(os.getpid())) <= children
    return err


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, "--model", "fake", "--out", str(tmp_path / "runs"), *extra]


def stream_checkpoint(path: Path, **extra) -> Path:
    """A checkpoint of a 1-rank smoke run's stream (what load_resume_cursors reads), plus ``extra``."""
    state = {
        "format": "streamgen-stream/1",
        "classes": load_classes("imagenet100:10").fingerprint(),
        "class_spec": "imagenet100:10",
        "seed": 0,
        "unit_size": 8,
        "world": 1,
        "cursors": [{"rank": 0, "world": 1, "below": 3, "done": []}],
    }
    torch.save({StreamDataModule.__qualname__: state, **extra}, path)
    return path


def test_a_max_steps_of_31_digits_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, run_args(tmp_path, "--train.max_steps", "9" * 31), "is beyond any run")


def test_epochs_and_an_explicit_max_steps_are_refused(tmp_path, capsys):
    args = run_args(tmp_path, "--source", "cache", "--cache.images", "64", "--cache.dir", str(tmp_path / "c"))
    refused(capsys, tmp_path, [*args, "--train.epochs", "2", "--train.max_steps", "7"], "both set the run's length")
    assert not (tmp_path / "c").exists()


def test_resuming_a_finished_run_is_refused_before_anything_starts(tmp_path, capsys):
    ckpt = stream_checkpoint(tmp_path / "last.ckpt", global_step=50, hyper_parameters={"arch": "resnet18"})
    refused(capsys, tmp_path, run_args(tmp_path, "--resume", str(ckpt)), "at step 50 and this run ends at step 50")


def test_resuming_a_checkpoint_whose_classifier_has_another_shape_is_refused(tmp_path, capsys):
    from streamgen.train.model import Classifier

    weights = Classifier(arch="resnet18", class_keys=[f"k{i}" for i in range(10)]).state_dict()
    weights["net.fc.weight"] = torch.zeros(12, 512)  # arch and head match, the fc does not
    hparams = {"arch": "resnet18", "head": "linear"}
    ckpt = stream_checkpoint(tmp_path / "c.ckpt", global_step=3, state_dict=weights, hyper_parameters=hparams)
    refused(capsys, tmp_path, run_args(tmp_path, "--resume", str(ckpt)), "its weight net.fc.weight has shape (12, 512)")


class Evil:
    def __reduce__(self):
        return (print, ("this ran while the checkpoint was read",))


def test_eval_refuses_a_malicious_checkpoint_without_suggesting_weights_only_false(tmp_path, capsys):
    from streamgen.evaluate.benchmark_eval import load_classifier

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(UsageError) as e:
        load_classifier(path, torch.device("cpu"))
    text = str(e.value)
    assert "refused (unpickling them could run code" in text and "weights_only" not in text and "\n" not in text
    assert "this ran" not in capsys.readouterr().out


def test_eval_names_the_first_weight_that_does_not_fit_in_one_line(tmp_path):
    from streamgen.evaluate.benchmark_eval import load_classifier
    from streamgen.train.model import Classifier

    model = Classifier(arch="resnet18", class_keys=[f"k{i}" for i in range(10)])
    weights = model.state_dict()
    weights["net.fc.weight"] = torch.zeros(12, 512)
    weights["net.fc.bias"] = torch.zeros(12)
    path = tmp_path / "misfit.ckpt"
    torch.save(
        {"state_dict": weights, "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": "2.5"}, path
    )
    with pytest.raises(UsageError) as e:
        load_classifier(path, torch.device("cpu"))
    text = str(e.value)
    assert "\n" not in text and "do not fit" in text and "net.fc" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "-1"], "--n must be at least 1"),
        (["--start", "-5"], "--start must be a sample id >= 0"),
        (["--start", str(2**70)], "go past the largest sample id"),
    ],
)
def test_prompt_preview_ranges_are_checked(tmp_path, capsys, args, message):
    from streamgen.plan.preview import main

    code = main(["--classes", "imagenet100:10", *args])
    out_err = capsys.readouterr()
    assert code == 2 and out_err.out == "" and message in out_err.err and len(out_err.err.splitlines()) == 1
