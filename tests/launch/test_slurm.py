"""scripts/slurm/train.sbatch in a fake SLURM: its signal's lead time, the resume, the requeue."""

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

from streamgen.config import TrainConfig

SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
CLEANUP = 20  # seconds the launchers need after the trainers saved: join, kill, free the memory


def _sbatch_options() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SCRIPT.read_text(), re.M))


def _stop_grace() -> float:
    return float(re.search(r"^STOP_GRACE=\$\{STOP_GRACE:-(\d+(?:\.\d+)?)\}", SCRIPT.read_text(), re.M).group(1))


def test_slurm_signals_sigterm_early_enough_for_the_trainers_to_save():
    options = _sbatch_options()
    kind, lead = re.fullmatch(r"(?:B:)?(\w+)@(\d+)", options["signal"]).groups()
    assert kind in ("TERM", "SIGTERM")  # what the launcher turns into a stop with a checkpoint
    grace = _stop_grace()
    assert grace == TrainConfig().stop_grace  # the script passes the default explicitly
    assert int(lead) >= grace + CLEANUP, "--signal's lead time must cover --train.stop_grace and the cleanup"
    assert "requeue" in options and '--train.stop_grace "$STOP_GRACE"' in SCRIPT.read_text()


def _fake_slurm(tmp_path: Path, srun_status: int) -> dict[str, str]:
    """A PATH where srun records its arguments and exits with ``srun_status``, and scontrol records its own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("srun", f'printf "%s\\n" "$@" > "{tmp_path}/srun.args"\nexit {srun_status}\n'),
        ("scontrol", f'printf "%s\\n" "$@" > "{tmp_path}/scontrol.args"\n'),
    ):
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "OUT": str(tmp_path / "runs"),
    }


@pytest.mark.timeout(60)
def test_a_requeued_job_resumes_from_the_newest_last_ckpt_and_an_interrupted_one_requeues(tmp_path):
    run = tmp_path / "runs" / "slurm-4242"
    for version in (0, 1):  # the first start and a requeued one, both pre-empted after saving
        checkpoints = run / f"version_{version}" / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "last.ckpt").write_bytes(b"x")
        time.sleep(0.05)
    newest = run / "version_1" / "checkpoints" / "last.ckpt"
    os.utime(newest)
    env = _fake_slurm(tmp_path, srun_status=130)  # the launcher saved and exited 130
    done = subprocess.run(
        ["bash", str(SCRIPT), "configs/x.yaml", "--seed", "3"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 130, done.stderr
    args = (tmp_path / "srun.args").read_text().split("\n")
    assert args[args.index("--resume") + 1] == str(newest)
    assert args[args.index("--name") + 1] == "slurm-4242" and args[args.index("--train.stop_grace") + 1] == "120"
    assert args[-3:-1] == ["--seed", "3"]  # the user's flags last: they win
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


@pytest.mark.timeout(60)
def test_a_first_start_has_no_resume_and_a_finished_run_is_not_requeued(tmp_path):
    env = _fake_slurm(tmp_path, srun_status=0)
    done = subprocess.run(["bash", str(SCRIPT), "configs/x.yaml"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--resume" not in (tmp_path / "srun.args").read_text().split("\n")
    assert not (tmp_path / "scontrol.args").exists()
