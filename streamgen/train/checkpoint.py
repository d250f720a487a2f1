"""Checkpoints that are never left half-written, and the one path that stops a run and saves.

Writing: `AtomicCheckpointIO` (Lightning's checkpoint I/O plugin) writes each checkpoint to a
hidden temporary file in the checkpoint's own folder, flushes and fsyncs it, then renames it
over the final name. A rename within one filesystem is atomic, so a crash, a SIGKILL or a full
disk never leaves a partial file under a checkpoint's name, and never replaces the previous
good one. (Lightning's own writer stages the file under ``$TMPDIR`` and moves it: across
filesystems that move is a copy, which a kill cuts short.) A full disk is a
`CheckpointWriteError` with one line; the trainer prints it and the run stops.

Stopping: the launcher's `streamgen.stream.control.StopControl` is the one way to stop a run with a
checkpoint (Ctrl-C, SIGTERM from a cluster's pre-emption, no generator left). On the trainer
side `StopAndSave` reads it after every step; the ranks agree on the decision in one reduction, so all stop
after the same step, and `StreamCheckpoint` writes ``last.ckpt`` at that step. It does so
whenever fit stops early because ``trainer.should_stop`` was set, whoever set it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from streamgen.stream.control import StopControl

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, folder gone, no permission): one line."""


# -- writing ------------------------------------------------------------------------------------


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save reports a failed write as a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash after it must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that leaves either the complete new file or the old one."""
    path = Path(path)
    # Hidden, and not ending in .ckpt: nothing takes it for a checkpoint. Created like any file
    # (mode 0666 less the umask), not 0600 as mkstemp would.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error(e)
        if cause is None and isinstance(e, RuntimeError) and _nearly_full(path.parent):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if cause is None:
            raise
        if cause.errno in _DISK_FULL:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: the disk is full (earlier checkpoints are intact): "
                "free some space, then --resume from the latest"
            ) from None
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {cause.strerror}") from None
    _fsync_folder(path.parent)


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, with writes that are atomic on local filesystems."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create the checkpoint folder {folder}: {e.strerror}") from None
        atomic_save(checkpoint, path)


# -- stopping -----------------------------------------------------------------------------------


class StopAndSave(Callback):
    """Stops fit after the step in which a stop was requested, on every rank at the same step.

    `StreamCheckpoint` then writes ``last.ckpt`` at that step, so ``--resume`` loses nothing.
    """

    def __init__(self, control: StopControl) -> None:
        self.control = control

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its own SIGTERM handler for fit (it ends DDP ranks without a
        # checkpoint). The launcher owns shutdown: it turns SIGTERM into a stop request.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One reduction per step: a rank that saw the request takes every rank with it, so no
        # rank is left waiting in a collective for ranks that stopped.
        if trainer.strategy.reduce_boolean_decision(self.control.requested, all=False) and not trainer.should_stop:
            trainer.should_stop = True
            if trainer.is_global_zero:
                reason = self.control.reason or "a stop was requested"
                print(
                    f"\nstreamgen: {reason}: stopping after step {trainer.global_step} and saving last.ckpt",
                    file=sys.stderr,
                    flush=True,
                )


class StreamCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the step fit ended at.

    Lightning saves ``last.ckpt`` at the end of fit only if no checkpoint was saved during it;
    a run stopped by ``trainer.should_stop`` (interruption, compute budget, no generator left)
    must save the step it stopped at, or a resume would repeat the steps since the last one.
    It is saved right after that step (as the periodic checkpoints are), or at the end of fit.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.should_stop:
            self.save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        saved = self._last_global_step_saved
        super().on_validation_end(trainer, pl_module)  # writes last.ckpt unless written at this step
        # Written at this step before the validation (a stop, a periodic checkpoint): its compute
        # figure lacks the validation; the end of fit writes it again.
        self._stale_last = saved == trainer.global_step and not trainer.sanity_checking

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(self, "_stale_last", False) and self._last_global_step_saved == trainer.global_step:
            # The final figures (compute frozen by ComputeMonitor.on_train_end, which runs first:
            # Lightning calls checkpoint callbacks last) replace those of the write before the validation.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._stale_last = False
        self.save_last_now(trainer)  # also at max_steps when it is not a multiple of every_n_train_steps
        super().on_train_end(trainer, pl_module)

    def save_last_now(self, trainer) -> None:
        """Write ``last.ckpt`` at the current step unless it was written at this step already.

        Every rank must call it (the checkpoint gathers every rank's stream position)."""
        if self._last_global_step_saved == trainer.global_step or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
