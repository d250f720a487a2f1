"""Atomic checkpoint writes, disk full, and the stop-and-save path (in-process, with Lightning)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from streamgen.stream.control import StopControl
from streamgen.train.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    StopAndSave,
    StreamCheckpoint,
    atomic_save,
)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(10)}, path)
    atomic_save({"step": 2, "w": torch.arange(20)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.arange(20))
    assert files(tmp_path) == ["last.ckpt"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a normal file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _failing_save(after_bytes: int, error: OSError):
    """torch.save that writes ``after_bytes`` of the real file, then fails as a full disk does."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        class Truncating:
            def __init__(self, inner):
                self.inner, self.written = inner, 0

            def write(self, data):
                if self.written + len(data) > after_bytes:
                    raise error
                self.written += len(data)
                return self.inner.write(data)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        return real_save(obj, Truncating(f), *args, **kwargs)

    return save


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(5000, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointWriteError) as info:
        atomic_save({"step": 2, "w": torch.zeros(100_000)}, path)
    message = str(info.value)
    assert "the disk is full" in message and "earlier checkpoints are intact" in message
    assert "\n" not in message
    assert path.read_bytes() == before  # untouched
    assert files(tmp_path) == ["last.ckpt"]  # the partial temporary file is gone


def test_other_write_errors_are_one_line_too(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save(10, OSError(errno.EIO, "Input/output error")))
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        atomic_save({"w": torch.zeros(1000)}, tmp_path / "a.ckpt")
    assert files(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB filesystem of its own (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk(small_tmpfs):
    path = small_tmpfs / "last.ckpt"
    atomic_save({"w": torch.ones(100_000)}, path)  # 400 kB: fits
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        atomic_save({"w": torch.ones(1_000_000)}, path)  # 4 MB: does not
    assert files(small_tmpfs) == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(100_000))


# -- with Lightning --------------------------------------------------------------------------


class RequestStopAt(Callback):
    """Stands in for the launcher: asks for a stop during step ``step``."""

    def __init__(self, control: StopControl, step: int) -> None:
        self.control, self.step = control, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.control.request("interrupted")


class ShouldStopAt(Callback):
    """Another stop (a compute budget): sets trainer.should_stop itself."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(tmp_path: Path, callbacks: list, max_steps: int = 20, every: int = 4) -> tuple[L.Trainer, Path]:
    folder = tmp_path / "checkpoints"
    checkpoint = StreamCheckpoint(
        dirpath=folder,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        monitor="step",
        mode="max",
        save_top_k=2,
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=[*callbacks, checkpoint],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(BoringModel())
    return trainer, folder


@pytest.mark.timeout(120)
def test_a_stop_request_saves_last_at_the_step_it_stopped(tmp_path, capsys):
    control = StopControl()
    trainer, folder = fit(tmp_path, [StopAndSave(control), RequestStopAt(control, 6)])
    assert trainer.global_step == 7  # the step in which the stop came was finished
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 7
    assert files(folder) == ["last.ckpt", "step0000004.ckpt"]
    assert "interrupted: stopping after step 7 and saving last.ckpt" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_any_early_stop_saves_last(tmp_path):
    trainer, folder = fit(tmp_path, [ShouldStopAt(10)])
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 10


@pytest.mark.timeout(120)
def test_last_is_the_final_step_when_max_steps_is_between_checkpoints(tmp_path):
    trainer, folder = fit(tmp_path, [], max_steps=10)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 10


@pytest.mark.timeout(120)
def test_a_stop_at_a_checkpoint_step_writes_it_once(tmp_path, monkeypatch):
    saved: list[str] = []
    real = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    fit(tmp_path, [ShouldStopAt(8)])
    assert saved == ["step0000004.ckpt", "last.ckpt", "step0000008.ckpt", "last.ckpt"]


@pytest.mark.timeout(120)
def test_a_full_disk_stops_fit_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    class FullDiskAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 5:  # the checkpoint of step 8 will not fit
                monkeypatch.setattr(torch, "save", _failing_save(2000, OSError(errno.ENOSPC, "No space left")))

    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        fit(tmp_path, [FullDiskAt()])
    folder = tmp_path / "checkpoints"
    assert files(folder) == ["last.ckpt", "step0000004.ckpt"]  # no partial file, under any name
    monkeypatch.undo()
    for name in files(folder):
        assert torch.load(folder / name, weights_only=True)["global_step"] == 4


def test_the_first_stop_reason_wins():
    control = StopControl()
    assert not control.requested
    assert control.request("interrupted")
    assert not control.request("no generator left")
    assert control.requested and control.reason == "interrupted"
    control.close()


def _child_reads(control: StopControl, conn) -> None:
    conn.send((control.requested, control.reason))


@pytest.mark.timeout(60)
def test_a_spawned_process_sees_the_request():
    from streamgen.stream.supervisor import SPAWN

    control = StopControl()
    control.request("pre-empted")
    parent, child = SPAWN.Pipe()
    process = SPAWN.Process(target=_child_reads, args=(control, child))
    process.start()
    assert parent.recv() == (True, "pre-empted")
    process.join(30)


# -- a rank waiting for data -----------------------------------------------------------------


def test_a_rank_waiting_for_data_stops_after_the_batch_in_hand():
    from streamgen.stream.queue import Doorbell, SlotQueue
    from streamgen.train.stream_data import QueueStream, StopRequested

    queue = SlotQueue(2, unit_size=2, resolution=8, freed=Doorbell())
    stream = QueueStream(queue)
    stop = {"now": False}
    stream.stop_requested = lambda: stop["now"]
    slot = queue.claim(0, 0)
    queue.commit(slot)
    batches = iter(stream)
    assert next(batches)["unit"] == 0  # the batch in hand (Lightning fetches one ahead)
    stop["now"] = True  # no generator will deliver again
    with pytest.raises(StopIteration):  # the iteration ends: the step in hand runs, then fit stops
        next(batches)
    with pytest.raises(StopRequested):  # nothing in hand yet: nothing to save, nothing to finish
        next(iter(stream))
