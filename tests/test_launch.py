"""train.py end to end, as a user runs it: real processes, real files, real signals."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, descendants, memfd_holders, read_consumed, read_scalars, shm_entries

from streamgen.launch import main

FAST = ("--model", "fake")  # the stream without diffusion: tests of the stream's machinery
SCALARS = {
    "train/loss",
    "train/top1_stream",
    "stream/generator_images_per_s",
    "stream/trainer_images_per_s",
    "stream/queue_depth",
    "stream/redraws",
}


def run_dir(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "runs" / "smoke" / f"version_{version}"


def assert_nothing_left(run, shm_before: set) -> None:
    """No process of the run is alive (so none holds its memory) and /dev/shm is as before."""
    deadline = time.monotonic() + 10
    while run.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run.processes(), "a process of the run outlived it"
    assert shm_entries() <= shm_before, f"left in /dev/shm: {shm_entries() - shm_before}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_logs_everything_and_leaves_nothing(train_run, tmp_path):
    shm_before = shm_entries()
    run = train_run("--generators", "2", "--trainers", "1")
    assert run.wait(240) == 0, run.output[-3000:]
    assert "train steps: 100%" in run.output  # the progress bar
    assert_nothing_left(run, shm_before)
    folder = run_dir(tmp_path)
    scalars = read_scalars(folder)
    assert SCALARS <= set(scalars), f"missing {SCALARS - set(scalars)}"
    assert max(step for step, _ in scalars["train/loss"]) >= 45
    assert all(v > 0 for _, v in scalars["stream/generator_images_per_s"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "stream/samples" in events.Tags()["images"]
    assert "stream/prompts/text_summary" in events.Tags()["tensors"]
    consumed = read_consumed(folder)
    units = [u for _, u in consumed]
    assert len(units) == 50 and len(set(units)) == 50  # each generated sample consumed once
    assert (folder / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--generators", "0"], "--generators must be at least 1"),
        (["--trainers", "64"], "--trainers 64"),
        (["--model", "/nonexistent/sd"], "model '/nonexistent/sd' not found"),
        (["--model", "someone/not-cached"], "not in the Hugging Face cache"),
        (["--generator.attention", "xformers"], "xformers"),
        (["--classes", "imagenet100:n01440764"], "n01440764 is not in that class set"),
        (["--prompt", "{c} at {where}"], "unknown placeholder {where}"),
        (["--stream.slots", "0"], "zero slots"),
        (["--generator.guidance", "-2"], "guidance must be >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args, message):
    if "xformers" in args and _has_xformers():
        pytest.skip("xformers is installed here")
    code = main(["--config", str(ROOT / "configs/smoke.yaml"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


def _has_xformers() -> bool:
    try:
        import xformers  # noqa: F401

        return True
    except ImportError:
        return False


def test_bad_resume_checkpoints(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    for path, message in ((junk, "not a readable checkpoint"), (plain, "not a streamgen checkpoint")):
        code = main(
            ["--config", str(ROOT / "configs/smoke.yaml"), "--out", str(tmp_path / "runs"), "--resume", str(path)]
        )
        assert code == 2 and message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_unreadable_config_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"train.py: error: cannot read config {tmp_path / 'nope.yaml'}: No such file or directory"
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_process_within_10_s(train_run, sig):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "2", "--train.max_steps", "100000")
    run.wait_for("train steps:", 180)
    time.sleep(2)
    run.proc.send_signal(sig)
    started = time.monotonic()
    assert run.wait(15) == 130, run.output[-2000:]
    assert time.monotonic() - started < 10
    assert_nothing_left(run, shm_before)
    assert "Traceback" not in run.output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_trainer_stops_the_run(train_run):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "1", "--train.max_steps", "100000")
    run.wait_for("train steps:", 180)
    time.sleep(1)
    trainer = next(p for p in descendants(run.proc.pid) if _is_trainer(p))
    os.kill(trainer, signal.SIGKILL)
    assert run.wait(15) == 1
    assert "trainer rank 0 failed" in run.output
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_exception_in_the_trainer_stops_the_run(train_run, tmp_path):
    from conftest import write_image_folder

    from streamgen.classes import load_classes

    shm_before = shm_entries()
    key = load_classes("imagenet100:10").keys[0]
    val = write_image_folder(tmp_path / "val", [key], per_class=1)
    (val / key / "corrupt.png").write_bytes(b"this is not a PNG")  # raises in validation
    run = train_run(
        *FAST,
        "--train.max_steps",
        "1000",
        "--train.val_dir",
        str(val),
        "--train.val_every",
        "3",
        "--train.workers",
        "0",
    )
    assert run.wait(180) == 1
    assert "UnidentifiedImageError" in run.output and "trainer rank 0 failed" in run.output
    assert_nothing_left(run, shm_before)


def _is_trainer(pid: int) -> bool:
    # spawned children all look alike; the trainer is the one holding its consumed-units log
    try:
        return any("consumed-rank0" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_generator_that_keeps_failing_stops_the_run_with_its_traceback(train_run):
    shm_before = shm_entries()
    run = train_run(
        *FAST,
        "--generators",
        "1",
        "--stream.max_restarts",
        "1",
        "--stream.restart_backoff",
        "0.1",
        env={"STREAMGEN_INJECT_FAULT": "raise:0:1:99"},
    )
    assert run.wait(180) == 1
    out = run.output
    assert "the stream stopped: generator 0 (cpu) failed 2 times" in out
    assert "RuntimeError: injected fault in generator 0" in out  # the worker's own traceback
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_resume_continues_the_stream_exactly(train_run, tmp_path):
    args = (
        *FAST,
        "--generators",
        "1",
        "--train.max_steps",
        "40",
        "--train.checkpoint_every",
        "10",
        "--train.log_every",
        "5",
    )
    whole = train_run(*args, "--name", "whole")
    assert whole.wait(240) == 0, whole.output[-2000:]
    expected = read_consumed(tmp_path / "runs" / "whole" / "version_0")
    assert [s for s, _ in expected] == list(range(40))

    first = train_run(*args, "--name", "halves")
    half_dir = tmp_path / "runs" / "halves" / "version_0"
    deadline = time.monotonic() + 200
    while not (half_dir / "consumed-rank0.tsv").exists() or len(read_consumed(half_dir)) < 25:
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output[-2000:]
        time.sleep(0.2)
    first.kill_group()  # a crash after the checkpoint at step 20: steps 20.. are lost
    ckpt = half_dir / "checkpoints" / "step0000020.ckpt"
    assert ckpt.is_file()

    second = train_run(*args, "--name", "halves", "--resume", str(ckpt))
    assert second.wait(240) == 0, second.output[-2000:]
    resumed = read_consumed(tmp_path / "runs" / "halves" / "version_1")
    before = [row for row in read_consumed(half_dir) if row[0] < 20]
    assert before + resumed == expected  # no unit twice, none skipped, same order
    # the optimiser and LR schedule continued: the final learning rates agree
    lr_whole = read_scalars(tmp_path / "runs" / "whole" / "version_0")["lr-SGD/pg1"]
    lr_resumed = read_scalars(tmp_path / "runs" / "halves" / "version_1")["lr-SGD/pg1"]
    assert lr_resumed[-1] == pytest.approx(lr_whole[-1])
    a = torch.load(tmp_path / "runs" / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "halves" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 40


def test_resume_with_another_class_set_is_refused(tmp_path, capsys):
    from streamgen.stream import StreamDataModule

    ckpt = tmp_path / "other.ckpt"
    state = {
        "format": "streamgen-stream/1",
        "classes": "0000",
        "class_spec": "imagenet1k",
        "seed": 0,
        "unit_size": 8,
        "world": 1,
        "cursors": [],
    }
    torch.save({StreamDataModule.__qualname__: state}, ckpt)
    code = main(["--config", str(ROOT / "configs/smoke.yaml"), "--out", str(tmp_path / "runs"), "--resume", str(ckpt)])
    assert code == 2 and "another class set (imagenet1k); run with --classes imagenet1k" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_killed_as_a_whole_leaves_nothing_and_the_next_starts(train_run, tmp_path):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "2", "--train.max_steps", "100000")
    run.wait_for("train steps:", 180)
    assert memfd_holders(run.processes())  # the queues exist while it runs...
    run.kill_group()  # SIGKILL to every process of the run at once
    assert_nothing_left(run, shm_before)  # ...and the kernel freed them with it
    again = train_run(*FAST, "--generators", "1", "--train.max_steps", "5")
    assert again.wait(180) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_trainer_ranks_share_the_stream_without_overlap(train_run, tmp_path):
    run = train_run(
        *FAST, "--generators", "2", "--trainers", "2", "--train.max_steps", "12", "--train.checkpoint_every", "6"
    )
    assert run.wait(240) == 0, run.output[-3000:]
    folder = run_dir(tmp_path)
    rank0 = [u for _, u in read_consumed(folder, 0)]
    rank1 = [u for _, u in read_consumed(folder, 1)]
    assert len(rank0) == len(rank1) == 12
    assert all(u % 2 == 0 for u in rank0) and all(u % 2 == 1 for u in rank1)
    assert len(set(rank0 + rank1)) == 24
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["StreamDataModule"]
    assert sorted(c["rank"] for c in state["cursors"]) == [0, 1]  # every rank's position saved


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_real_images_are_evaluated_while_training(train_run, tmp_path):
    from conftest import write_image_folder

    from streamgen.classes import load_classes

    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys[:3], per_class=2)
    run = train_run(
        *FAST, "--train.max_steps", "10", "--train.val_dir", str(val), "--train.val_every", "5", "--train.workers", "0"
    )
    assert run.wait(180) == 0, run.output[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    assert [step for step, _ in scalars["val/top1"]] == [4, 9]  # after steps 5 and 10
    assert all(0 <= v <= 1 for _, v in scalars["val/top1"] + scalars["val/top5"])


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_smoke_run_on_gpus(train_run, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one generator, one trainer")
    run = train_run("--generators", "1", "--trainers", "1", "--generator.compile", "on")
    assert run.wait(540) == 0, run.output[-3000:]
    assert len(read_consumed(run_dir(tmp_path))) == 50
