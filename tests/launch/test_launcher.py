"""train.py end to end, as a user runs it: real processes, real files, real signals."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, TrainRun, descendants, memfd_holders, read_consumed, read_scalars, shm_entries

from streamgen.launch.launcher import main

FAST = ("--model", "fake")  # the stream without diffusion: tests of the stream's machinery
SCALARS = {
    "train/loss",
    "train/top1_stream",
    "train/lr",
    "stream/generator_images_per_s",
    "stream/generator0_images_per_s",
    "stream/generator1_images_per_s",
    "stream/trainer_images_per_s",
    "stream/trainer_wait_fraction",
    "stream/queue_fill",
    "stream/redraws",
    "stream/generator_restarts",
}
PROGRESS = " step="  # the trainer's progress lines (stdout is not a terminal here)


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
    assert " step=50/50 " in run.output and "\r" not in run.output  # plain progress lines, no bar
    assert_nothing_left(run, shm_before)
    folder = run_dir(tmp_path)
    scalars = read_scalars(folder)
    assert SCALARS <= set(scalars), f"missing {SCALARS - set(scalars)}"
    assert "epoch" not in scalars
    for tag in SCALARS:  # one step convention: the global step after the update
        assert [step for step, _ in scalars[tag]] == list(range(5, 51, 5)), tag
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
    code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


def test_a_generator_combination_that_cannot_work_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))  # as if installed
    args = ["--generator.attention", "xformers", "--generator.compile", "on"]
    code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "xformers' attention breaks torch.compile's graph" in err
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


def _file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


BINARY = bytes(range(256)) * 4


def _model_index_only(tmp: Path) -> list[str]:
    folder = tmp / "sd"
    folder.mkdir()
    parts = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
    index = {"_class_name": "StableDiffusionPipeline", **{k: ["diffusers", v] for k, v in parts.items()}}
    index |= {"tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return ["--model", str(folder)]


def _resume_with_another_arch(tmp: Path) -> list[str]:
    from streamgen.config import parse_config
    from streamgen.launch.checks import run_meta
    from streamgen.plan.classes import load_classes
    from streamgen.plan.samples import UnitCursor
    from streamgen.train.stream_data import STATE_FORMAT

    cfg = parse_config(["--config", str(ROOT / "configs/smoke_tiny.yaml")])
    state = {
        "format": STATE_FORMAT,
        **run_meta(cfg, load_classes(cfg.classes)),
        "cursors": [UnitCursor(0, 1).state_dict()],
    }
    path = tmp / "resnet50.ckpt"
    torch.save({"StreamDataModule": state, "hyper_parameters": {"arch": "resnet50"}}, path)
    return ["--resume", str(path)]


BAD_VALUES = {  # every value a user can get wrong, each found before anything starts (issue 12)
    "crop 0": (lambda t: ["--train.crop", "0"], "--train.crop must be at least"),
    "log_every 0": (lambda t: ["--train.log_every", "0"], "--train.log_every must be at least 1"),
    "val_every 0": (lambda t: ["--train.val_every", "0"], "--train.val_every must be at least 1"),
    "lr -1": (lambda t: ["--train.lr", "-1"], "--train.lr must be >= 0"),
    "lr 0": (lambda t: ["--train.lr", "0"], "--train.lr must be > 0"),
    "lr nan": (lambda t: ["--train.lr", "nan"], "--train.lr must be a finite number"),
    "arch typo": (
        lambda t: ["--train.arch", "resnet5O"],
        "not a torchvision classification model (did you mean resnet50?)",
    ),
    "precision": (lambda t: ["--train.precision", "17-mixed"], "'17-mixed' is not a Lightning precision"),
    "seed 2**70": (lambda t: ["--seed", str(2**70)], "--seed must be below 2**63"),
    "workers -1": (lambda t: ["--train.workers", "-1"], "--train.workers must be >= 0"),
    "threads -2": (lambda t: ["--generator.threads", "-2"], "--generator.threads must be >= 0"),
    "val_batch_size 0": (lambda t: ["--train.val_batch_size", "0"], "--train.val_batch_size must be at least 1"),
    "keep_checkpoints 0": (lambda t: ["--train.keep_checkpoints", "0"], "--train.keep_checkpoints must be at least 1"),
    "preview_every -1": (lambda t: ["--train.preview_every", "-1"], "--train.preview_every must be >= 0"),
    "stop_grace -1": (lambda t: ["--train.stop_grace", "-1"], "--train.stop_grace must be >= 0"),
    "generator batch 0": (lambda t: ["--generator.batch_size", "0"], "--generator.batch_size must be at least 1"),
    "resume other arch": (_resume_with_another_arch, "network has --train.arch resnet50, this run's resnet18"),
    "model index only": (_model_index_only, "has no unet/config.json: the download looks incomplete"),
    "out in /proc": (
        lambda t: ["--out", "/proc/streamgen-x"],
        "--out /proc/streamgen-x: cannot create folders in /proc",
    ),
    "out is a file": (lambda t: ["--out", _file(t, "afile", "x")], "is a file, not a folder"),
    "name escapes": (lambda t: ["--name", "../../x"], "--name '../../x' must be a plain folder name"),
    "name absolute": (lambda t: ["--name", "/tmp/x"], "must be a plain folder name"),
    "binary config": (lambda t: ["--config", _file(t, "c.yaml", BINARY)], "is not a text file"),
    "config folder": (lambda t: ["--config", str(t)], "cannot read config"),
    "binary class file": (lambda t: ["--classes", _file(t, "classes.txt", BINARY)], "is not a text file"),
    "class folder": (lambda t: ["--classes", str(t)], "nor a readable file"),
    "bad YAML classes": (
        lambda t: ["--classes", _file(t, "c.yaml", "- name: cat\n  description: [a cat\n- name: dog\n")],
        "the class file is not valid YAML",
    ),
    "CSV open quote": (
        lambda t: ["--classes", _file(t, "c.csv", 'name,description\n"cat,a small cat\ndog,a dog\n')],
        "cannot parse the class file as CSV",
    ),
    "binary counts": (lambda t: ["--class_counts", _file(t, "counts.txt", BINARY)], "is not a text file"),
    "CSV counts open quote": (
        lambda t: ["--class_counts", _file(t, "counts.csv", '"n01440764,5\n')],
        "class counts file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_every_bad_value_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, case):
    make_args, message = BAD_VALUES[case]
    args = make_args(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing else either
    assert not descendants(os.getpid())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args",
    [
        lambda t: ["--config", _file(t, "c.yaml", BINARY)],
        lambda t: ["--classes", _file(t, "c.yaml", "- name: [cat\n")],
        lambda t: ["--generator.batch_size", "0"],
    ],
)
def test_bad_input_never_shows_a_traceback(tmp_path, args):
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "--out", str(tmp_path / "runs"), *args(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_launchers_starting_at_once_get_distinct_run_folders(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from streamgen.launch.launcher import make_run_dir

    barrier = Barrier(12)

    def make(_):
        barrier.wait()  # all look for the next free version at the same moment
        return make_run_dir(str(tmp_path / "runs"), "race").name

    with ThreadPoolExecutor(12) as pool:
        names = list(pool.map(make, range(12)))
    assert sorted(names, key=lambda n: int(n.split("_")[1])) == [f"version_{k}" for k in range(12)]


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
            ["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), "--resume", str(path)]
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


def _assert_stopped_with_last_checkpoint(run, folder: Path, shm_before: set, ranks: int = 1) -> int:
    """The run was stopped by a signal: exit 130, last.ckpt at the step it stopped, every
    consumed unit in it, no traceback, no partial file, nothing left running. Its step."""
    assert "Traceback" not in run.output, run.output[-3000:]
    assert "saving last.ckpt" in run.output
    assert_nothing_left(run, shm_before)
    checkpoints = folder / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if not p.name.endswith(".ckpt")]  # no temporary file
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    step = last["global_step"]
    for rank in range(ranks):
        assert [s for s, _ in read_consumed(folder, rank)] == list(range(step))  # every step it trained, saved
    cursors = last["StreamDataModule"]["cursors"]
    assert sorted(c["rank"] for c in cursors) == list(range(ranks))
    return step


@pytest.mark.long  # also covered by test_timeout_signals_the_whole_group_and_the_run_still_saves_and_resumes_exactly
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_saves_last_ckpt_and_the_resumed_run_loses_no_step(train_run, tmp_path):
    shm_before = shm_entries()
    args = (*FAST, "--generators", "1", "--train.checkpoint_every", "1000", "--train.log_every", "5")
    run = train_run(*args, "--train.max_steps", "100000", "--name", "pre-empted")
    run.wait_for(PROGRESS, 180)
    time.sleep(2)
    run.proc.send_signal(signal.SIGTERM)  # SLURM's pre-emption notice: between two checkpoints
    assert run.wait(120) == 130, run.output[-3000:]
    first = tmp_path / "runs" / "pre-empted" / "version_0"
    step = _assert_stopped_with_last_checkpoint(run, first, shm_before)
    assert 0 < step < 1000  # written by the stop, not by a periodic checkpoint

    # The launcher printed the command that resumes it, ready to copy: run it (with more steps).
    command = shlex.split(re.search(r"streamgen: to resume: (.*)", run.output)[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--resume", str(first)]
    again = TrainRun([PYTHON, str(ROOT / "train.py"), *command[2:], "--train.max_steps", str(step + 5)], tmp_path)
    try:
        assert again.wait(240) == 0, again.output[-3000:]
    finally:
        if again.proc.poll() is None:
            again.kill_group()
    assert f"resuming {first / 'checkpoints' / 'last.ckpt'} at step {step} (" in again.output
    assert f"changed since the checkpoint's run: train.max_steps 100000 -> {step + 5}" in again.output
    assert not (tmp_path / "runs" / "pre-empted" / "version_1").exists()  # it continues in its own folder
    rows = read_consumed(first)
    assert [s for s, _ in rows] == list(range(step + 5))  # the resumed run goes on at the next step
    assert sorted(u for _, u in rows) == list(range(step + 5))  # no unit lost, none twice


@pytest.fixture
def tmpdir_on_its_own_filesystem(tmp_path):
    """$TMPDIR on a tmpfs: another filesystem than the run folder's, as on clusters."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield {"TMPDIR": str(mount)}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_while_a_large_checkpoint_is_written_leaves_it_complete(
    train_run, tmp_path, tmpdir_on_its_own_filesystem
):
    shm_before = shm_entries()
    # resnet50 checkpoints are ~190 MB and one is written after every step: the signal lands in a write.
    run = train_run(
        *FAST,
        "--generators",
        "1",
        "--train.arch",
        "resnet50",
        "--train.checkpoint_every",
        "1",
        "--train.max_steps",
        "100000",
        env=tmpdir_on_its_own_filesystem,
    )
    checkpoints = run_dir(tmp_path) / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob(".*.partial"))):
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output[-3000:]
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)  # a checkpoint is being written right now
    assert run.wait(180) == 130, run.output[-3000:]
    step = _assert_stopped_with_last_checkpoint(run, checkpoints.parent, shm_before)
    for path in checkpoints.glob("step*.ckpt"):
        assert torch.load(path, weights_only=True)["global_step"] <= step  # each one complete
    from streamgen.config import parse_config
    from streamgen.launch.checks import prepare

    resumed = [
        "--out",
        str(tmp_path / "check"),
        "--model",
        "fake",
        "--train.arch",
        "resnet50",
        "--resume",
        str(checkpoints / "last.ckpt"),
    ]
    job = prepare(parse_config(["--config", str(ROOT / "configs/smoke_tiny.yaml"), *resumed]))
    assert next(job.cursors[0].pending()) == step  # the resumed stream starts at the next unit


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_good_checkpoint(train_run, tmp_path):
    out = tmp_path / "small"
    out.mkdir()
    # resnet18 checkpoints are ~90 MB: step 5's fits, its copy as last.ckpt does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = train_run(*FAST, "--out", str(out), "--train.checkpoint_every", "5", "--train.max_steps", "100000")
        assert run.wait(240) == 1, run.output[-3000:]
        assert "cannot write checkpoint" in run.output and "the disk is full" in run.output
        assert "Traceback" not in run.output, run.output[-3000:]
        checkpoints = out / "smoke" / "version_0" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step0000005.ckpt"]  # and no partial file
        assert torch.load(checkpoints / "step0000005.ckpt", weights_only=True)["global_step"] == 5
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_three_times_stops_at_once_without_a_traceback(train_run):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "2", "--train.max_steps", "100000")
    run.wait_for(PROGRESS, 180)
    os.killpg(run.proc.pid, signal.SIGINT)  # as a terminal does: to every process of the group
    run.wait_for("Ctrl-C again stops at once", 10)
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(run.proc.pid, signal.SIGINT)  # the impatient third press changes nothing
    started = time.monotonic()
    assert run.wait(30) == 130, run.output[-2000:]
    assert time.monotonic() - started < 15  # no checkpoint waited for: seconds (cleanup is bounded)
    assert run.output.count("interrupted again: stopping at once, without a checkpoint") == 1
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_during_start_up_is_one_line(train_run):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "2", "--train.max_steps", "100000")
    run.wait_for("run folder", 120)
    os.killpg(run.proc.pid, signal.SIGINT)  # while the children are still importing torch
    assert run.wait(120) == 130, run.output[-2000:]
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output, run.output[-3000:]
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_stops_ddp_ranks_at_the_same_step_without_tracebacks(train_run, tmp_path):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "1", "--trainers", "2", "--train.max_steps", "100000")
    run.wait_for(PROGRESS, 240)
    time.sleep(2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(180) == 130, run.output[-3000:]
    _assert_stopped_with_last_checkpoint(run, run_dir(tmp_path), shm_before, ranks=2)
    for marker in ("gloo", "NCCL", "ProcessGroup"):
        assert marker not in run.output


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _launcher_children(run) -> list[int]:
    """The processes the launcher started (``run.proc`` is GNU timeout, whose child is the launcher)."""
    processes = run.processes()
    launcher = next(pid for pid in processes if _parent(pid) == run.proc.pid)
    return [pid for pid in processes if _parent(pid) == launcher]


def _resume_and_compare(train_run, tmp_path, args, name: str, step: int, ranks: int) -> None:
    """Resume ``name``'s version_0 from last.ckpt for 3 more steps, in the same folder: its audit
    trail is the uninterrupted run's (rank r of T consumes units r, r + T, ... at steps 0, 1, ...:
    tests/launch/test_launcher.py's two-rank and smoke runs show that order)."""
    first = tmp_path / "runs" / name / "version_0"
    again = train_run(
        *args, "--train.max_steps", str(step + 3), "--name", name, "--resume", str(first / "checkpoints/last.ckpt")
    )
    assert again.wait(300) == 0, again.output[-3000:]
    assert not first.with_name("version_1").exists()  # it continued in its own folder
    for rank in range(ranks):
        assert read_consumed(first, rank) == [(s, s * ranks + rank) for s in range(step + 3)], rank


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_timeout_signals_the_whole_group_and_the_run_still_saves_and_resumes_exactly(train_run, tmp_path):
    """GNU timeout sends SIGTERM to its command and then to the command's process group: the
    launcher sees it twice and every child once. One interruption: last.ckpt, exit 130."""
    shm_before = shm_entries()
    args = (*FAST, "--generators", "1", "--train.checkpoint_every", "1000", "--train.log_every", "5")
    run = train_run(*args, "--train.max_steps", "100000", "--name", "grouped", wrap=("timeout", "900"))
    run.wait_for(PROGRESS, 240)
    children = _launcher_children(run)
    assert len(children) >= 2  # a generator and a trainer (and multiprocessing's resource tracker)
    for pid in children:  # delivered to the children alone: ignored, the launcher decides
        os.kill(pid, signal.SIGTERM)
    time.sleep(3)
    assert run.proc.poll() is None and "saving last.ckpt" not in run.output and "restart" not in run.output
    run.proc.send_signal(signal.SIGALRM)  # GNU timeout's own alarm: its time is up
    time.sleep(0.5)  # the copies need not coincide (srun forwards SLURM's signal as SLURM sends it):
    os.killpg(run.proc.pid, signal.SIGTERM)  # one arriving after the stop began is the same interruption
    assert run.wait(240) == 124, run.output[-3000:]  # timeout's status for a command it timed out
    assert "interrupted again" not in run.output and "stopping at once" not in run.output
    folder = tmp_path / "runs" / "grouped" / "version_0"
    step = _assert_stopped_with_last_checkpoint(run, folder, shm_before)
    assert 0 < step < 1000  # written by the stop, not by a periodic checkpoint
    _resume_and_compare(train_run, tmp_path, args, "grouped", step, ranks=1)


@pytest.mark.long  # also: test_timeout_signals_the_whole_group_..., test_sigterm_stops_ddp_ranks_...
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_the_process_group_stops_ddp_ranks_at_one_step_and_resumes_exactly(train_run, tmp_path):
    """SLURM's pre-emption and scancel signal every process of the job: launcher, generators and
    both trainer ranks get SIGTERM at once."""
    shm_before = shm_entries()
    args = (*FAST, "--generators", "1", "--trainers", "2", "--train.checkpoint_every", "1000")
    run = train_run(*args, "--train.max_steps", "100000", "--name", "grouped-ddp")
    run.wait_for(PROGRESS, 300)
    time.sleep(2)
    os.killpg(run.proc.pid, signal.SIGTERM)
    assert run.wait(240) == 130, run.output[-3000:]
    assert "interrupted again" not in run.output
    folder = tmp_path / "runs" / "grouped-ddp" / "version_0"
    step = _assert_stopped_with_last_checkpoint(run, folder, shm_before, ranks=2)
    _resume_and_compare(train_run, tmp_path, args, "grouped-ddp", step, ranks=2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_trainer_stops_the_run(train_run):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "1", "--train.max_steps", "100000")
    run.wait_for(PROGRESS, 180)
    time.sleep(1)
    trainer = next(p for p in descendants(run.proc.pid) if _is_trainer(p))
    os.kill(trainer, signal.SIGKILL)
    assert run.wait(15) == 1
    assert "trainer rank 0 failed" in run.output
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_exception_in_the_trainer_stops_the_run(train_run, tmp_path):
    import shutil

    from conftest import write_image_folder

    from streamgen.plan.classes import load_classes

    shm_before = shm_entries()
    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys[:1], per_class=1)
    run = train_run(*FAST, "--train.max_steps", "1000", "--train.val_dir", str(val), "--train.workers", "0")
    deadline = time.monotonic() + 60
    while not run_dir(tmp_path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    shutil.rmtree(val)  # checked by the launcher, gone when the trainer reads it (an unmounted disk): it raises
    assert run.wait(180) == 1
    assert "does not exist" in run.output and "trainer rank 0 failed" in run.output
    assert_nothing_left(run, shm_before)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_val_folder_is_checked_first_and_its_unreadable_images_are_skipped(train_run, tmp_path, capsys):
    import io

    from conftest import write_image_folder
    from PIL import Image

    from streamgen.plan.classes import load_classes

    keys = load_classes("imagenet100:10").keys
    other = write_image_folder(tmp_path / "other", ["n09999999"], per_class=1)  # none of the run's classes
    for val_dir, message in ((tmp_path / "nope", "does not exist"), (other, "none of its 1 classes")):
        code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *FAST,
                     "--train.val_dir", str(val_dir)])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"--train.val_dir {val_dir}: {message}" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "runs").exists()
    shm_before = shm_entries()
    val = write_image_folder(tmp_path / "val", keys[:2], per_class=2)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    truncated = val / keys[0] / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # an interrupted copy
    run = train_run(
        *FAST, "--train.max_steps", "6", "--train.val_dir", str(val), "--train.val_every", "3", "--train.workers", "0"
    )
    assert run.wait(180) == 0, run.output[-3000:]  # the run completes
    assert f"skipped an unreadable image: {truncated}" in run.output  # named in the log
    scalars = read_scalars(run_dir(tmp_path))
    assert scalars["val/skipped_images"] == [(3, 1.0), (6, 1.0)]  # one image skipped at each evaluation
    assert [step for step, _ in scalars["val/top1"]] == [3, 6]
    assert_nothing_left(run, shm_before)


def _is_trainer(pid: int) -> bool:
    # spawned children all look alike; the trainer is the one holding its consumed-units log
    try:
        return any("consumed-rank0" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.long  # the traceback: test_supervisor.py::test_too_many_failures_stop_the_stream_with_the_workers_traceback
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
    assert "stopping: generator 0 (cpu) failed 2 times within 3600 s" in out  # retired: none is left
    assert "RuntimeError: injected fault in generator 0" in out  # the worker's own traceback
    assert_nothing_left(run, shm_before)


@pytest.mark.long  # also: test_sigterm_saves_last_ckpt_and_the_resumed_run_loses_no_step, test_multinode
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

    assert (half_dir / "checkpoints" / "last.ckpt").is_file()  # written with step 20's

    # Resumed by its folder (its newest last.ckpt: step 20's), it continues in that folder.
    second = train_run(*args, "--name", "halves", "--resume", str(half_dir))
    assert second.wait(240) == 0, second.output[-2000:]
    assert f"resuming {half_dir / 'checkpoints' / 'last.ckpt'} at step 20 (160 images seen" in second.output
    assert not (tmp_path / "runs" / "halves" / "version_1").exists()
    # The audit trail holds each step once: the lost steps 20.. of the first part were dropped.
    assert read_consumed(half_dir) == expected  # no unit twice, none skipped, same order
    # the optimiser and LR schedule continued: the final learning rates agree; one set of curves
    lr_whole = read_scalars(tmp_path / "runs" / "whole" / "version_0")["train/lr"]
    lr_resumed = read_scalars(half_dir)["train/lr"]
    assert [s for s, _ in lr_resumed] == [5 * k for k in range(1, 9)]
    assert lr_resumed[-1] == pytest.approx(lr_whole[-1])
    a = torch.load(tmp_path / "runs" / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(half_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 40


def test_resume_with_another_class_set_is_refused(tmp_path, capsys):
    from streamgen.train.stream_data import StreamDataModule

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
    code = main(
        ["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), "--resume", str(ckpt)]
    )
    assert code == 2 and "another class set (imagenet1k); run with --classes imagenet1k" in capsys.readouterr().err


@pytest.mark.long  # also: test_multinode's killed node
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_killed_as_a_whole_leaves_nothing_and_the_next_starts(train_run, tmp_path):
    shm_before = shm_entries()
    run = train_run(*FAST, "--generators", "2", "--train.max_steps", "100000")
    run.wait_for(PROGRESS, 180)
    assert memfd_holders(run.processes())  # the queues exist while it runs...
    run.kill_group()  # SIGKILL to every process of the run at once
    assert_nothing_left(run, shm_before)  # ...and the kernel freed them with it
    again = train_run(*FAST, "--generators", "1", "--train.max_steps", "5")
    assert again.wait(180) == 0


@pytest.mark.long  # also: test_multinode (1 node x 2 trainers)
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


@pytest.mark.long  # validation while training: test_a_runs_dashboard_and_log_lines, test_compare_a_finished_..., test_learning
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_real_images_are_evaluated_while_training(train_run, tmp_path):
    from conftest import write_image_folder

    from streamgen.plan.classes import load_classes

    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys[:3], per_class=2)
    run = train_run(
        *FAST, "--train.max_steps", "10", "--train.val_dir", str(val), "--train.val_every", "5", "--train.workers", "0"
    )
    assert run.wait(180) == 0, run.output[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    assert [step for step, _ in scalars["val/top1"]] == [5, 10]  # after steps 5 and 10, as train/* are
    assert all(0 <= v <= 1 for _, v in scalars["val/top1"] + scalars["val/top5"])


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_smoke_run_on_gpus(train_run, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one generator, one trainer")
    run = train_run("--generators", "1", "--trainers", "1", "--generator.compile", "on")
    assert run.wait(540) == 0, run.output[-3000:]
    assert len(read_consumed(run_dir(tmp_path))) == 50


def test_copies_of_one_sigterm_are_one_interruption_and_a_later_signal_stops_at_once(monkeypatch):
    from streamgen.launch import launcher

    clock = [100.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupts = launcher._Interrupts()
        with pytest.raises(launcher._Terminate):
            interrupts(signal.SIGTERM, None)  # the first: stop with a checkpoint
        clock[0] += 0.01
        assert interrupts(signal.SIGTERM, None) is None  # timeout's copy to the group: the same stop
        clock[0] += 1.5
        assert interrupts(signal.SIGTERM, None) is None  # SLURM's copy to every process of the job
        assert interrupts.count == 1 and signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]
        clock[0] += 1.0  # past the window: a second interruption, stop at once
        with pytest.raises(launcher._Terminate):
            interrupts(signal.SIGTERM, None)
        assert interrupts.count == 2 and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN

        ctrl_c = launcher._Interrupts()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, however soon, stops at once
            ctrl_c(signal.SIGINT, None)
        assert ctrl_c.count == 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
