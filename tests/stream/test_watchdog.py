"""train.py end to end through hangs and repeated failures: the watchdogs and the restart budget.

The supervisor's side (a stopped generator, the restart window) is tested in-process in
test_supervisor.py; here, what only the whole run shows: the launcher's trainer watchdog, and the
stop with a checkpoint when no generator is left.
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import read_consumed

FAST = ("--model", "fake")


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "smoke" / "version_0"


def wait_for_steps(run, folder: Path, steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = folder / "consumed-rank0.tsv"
    while not log.exists() or len(read_consumed(folder)) < steps:
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.2)


def trainer_pid(run, folder: Path) -> int:
    """The trainer rank: the process of the run that holds its consumed-units log open."""
    for pid in run.processes():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any("consumed-rank0" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds):
                return pid
        except OSError:
            continue
    raise AssertionError("no trainer process found")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_trainer_stops_the_run_with_a_message_naming_its_rank(train_run, tmp_path):
    run = train_run(*FAST, "--generators", "1", "--train.max_steps", "100000", "--train.hang_timeout", "10")
    folder = run_dir(tmp_path)
    wait_for_steps(run, folder, 20, 200)
    os.kill(trainer_pid(run, folder), signal.SIGSTOP)  # as a wedged CUDA context or a D-state process
    stopped = time.monotonic()
    assert run.wait(60) == 1, run.output[-3000:]
    assert time.monotonic() - stopped < 10 + 30  # the timeout, then seconds to stop everything
    assert "trainer rank 0 made no progress for 1" in run.output  # 10..19 s
    assert "--train.hang_timeout 10): it is stopped or stuck: stopping the run" in run.output
    deadline = time.monotonic() + 10
    while run.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run.processes(), "a process of the run outlived it"


@pytest.mark.long  # retiring: the supervisor tests (test_a_generator_failing_too_often_..., ..._the_last_one_retired_stops_the_stream)
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_generators_retired_one_by_one_then_the_run_stops_with_a_checkpoint(train_run, tmp_path):
    # every generator is killed at its 6th unit in every life; one restart allowed per hour
    run = train_run(
        *FAST,
        "--generators",
        "2",
        "--train.max_steps",
        "100000",
        "--stream.max_restarts",
        "1",
        "--stream.restart_backoff",
        "0.1",
        env={"STREAMGEN_INJECT_FAULT": "kill:*:5:99"},
    )
    assert run.wait(240) == 1, run.output[-3000:]
    out = run.output
    assert out.count("RETIRED generator") == 1  # the first retired one: the run went on with the other
    assert "the run goes on with 1 of 2 generators" in out
    assert "stopping: generator" in out and "failed 2 times within 3600 s" in out
    assert "retired, and no generator is left. Its last error:\nkilled by signal 9" in out
    assert "no generator left: stopping after step" in out  # the trainer's word that it saves
    # 2 generators x 2 lives x 5 units made; the trainer stopped after the last it could take, and
    # last.ckpt holds exactly what it consumed: --resume repeats nothing and skips nothing
    folder = run_dir(tmp_path)
    units = [u for _, u in read_consumed(folder)]
    assert 10 <= len(units) <= 20 and len(set(units)) == len(units)
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == len(units)
    (cursor,) = ckpt["StreamDataModule"]["cursors"]
    assert set(range(cursor["below"])) | set(cursor["done"]) == set(units)
