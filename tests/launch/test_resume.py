"""--resume by run folder, into the same folder, with the settings that may and may not change."""

from __future__ import annotations

import os

import pytest
import yaml

from streamgen.config import parse_config, to_dict
from streamgen.errors import UsageError
from streamgen.launch.resume import changed_settings, check_resume_settings, resolve_resume, run_folder_of


def run_folder(root, name="smoke", version=0, mtime=None, **config):
    folder = root / name / f"version_{version}"
    (folder / "checkpoints").mkdir(parents=True)
    saved = to_dict(parse_config(["--train.max_steps", "20", *[a for k, v in config.items() for a in (k, v)]]))
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")
    if mtime is not None:
        os.utime(ckpt, (mtime, mtime))
    return folder


def test_a_run_folder_resumes_from_its_last_checkpoint_and_a_name_from_its_newest(tmp_path):
    old = run_folder(tmp_path, version=0, mtime=1_000_000)
    new = run_folder(tmp_path, version=1, mtime=2_000_000)
    assert resolve_resume(str(old)) == str(old / "checkpoints" / "last.ckpt")
    assert resolve_resume(str(tmp_path / "smoke")) == str(new / "checkpoints" / "last.ckpt")
    assert resolve_resume(str(old / "checkpoints" / "last.ckpt")) == str(old / "checkpoints" / "last.ckpt")
    assert run_folder_of(str(old / "checkpoints" / "last.ckpt")) == old.resolve()
    with pytest.raises(UsageError, match="a folder without checkpoints/last.ckpt: give a run folder"):
        resolve_resume(str(tmp_path))
    assert run_folder_of(str(tmp_path / "elsewhere.ckpt")) is None  # a checkpoint outside a run folder


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--prompt", "c_dc"),
        ("--generator.guidance", "2.0"),
        ("--model", "tiny"),
        ("--generator.steps", "25"),
        ("--source", "cache"),
        ("--train.budget_gpu_hours", "0.5"),  # smaller than the first part's 1.0
    ],
)
def test_a_change_that_alters_the_experiment_is_refused_in_one_line(tmp_path, flag, value):
    folder = run_folder(tmp_path, **{"--train.budget_gpu_hours": "1.0"})
    now = to_dict(parse_config(["--train.max_steps", "20", "--train.budget_gpu_hours", "1.0", flag, value]))
    with pytest.raises(UsageError) as refused:
        check_resume_settings(str(folder / "checkpoints" / "last.ckpt"), now)
    message = str(refused.value)
    assert "\n" not in message and "alters the experiment" in message and flag.removeprefix("--") in message


def test_a_longer_run_and_a_larger_budget_are_accepted_and_listed(tmp_path):
    folder = run_folder(tmp_path, **{"--train.budget_gpu_hours": "1.0"})
    now = to_dict(parse_config(["--train.max_steps", "40", "--train.budget_gpu_hours", "2.0"]))
    accepted = check_resume_settings(str(folder / "checkpoints" / "last.ckpt"), now)
    assert accepted == ["train.budget_gpu_hours 1.0 -> 2.0", "train.max_steps 20 -> 40"]
    refused, accepted = changed_settings({"train": {"budget_gpu_hours": None}}, {"train": {"budget_gpu_hours": 3.0}})
    assert refused == [] and accepted == ["train.budget_gpu_hours None -> 3.0"]
