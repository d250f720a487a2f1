"""The shared-memory queue between generator processes and one trainer rank.

One `SlotQueue` per trainer rank: K preallocated slots, each holding exactly one unit (one
trainer batch): uint8 images ``[B, 3, R, R]``, int64 labels and int64 sample ids. A slot moves
through four states, and each transition has exactly one writer, so no lock is needed and no
process can die holding one:

    FREE --claim (supervisor)--> WRITING --commit (its generator)--> FILLED
    FILLED --get (the rank's consumer)--> READING --release (the consumer)--> FREE

The consumer takes the units in increasing order by default (`get` with the unit it expects
next), or in arrival order.

The supervisor is the only process that claims slots, so it always knows which unit a dead
generator was writing and where (`reclaim`). Waiting uses `Doorbell`s (pipes): a full queue
leaves generators blocked on their job pipe and an empty one leaves the consumer blocked on its
doorbell, neither busy-waiting; the consumer re-checks liveness every second.

Memory is anonymous (`memfd_create`) and reaches child processes only at spawn: nothing is
ever named in /dev/shm, so no run, however it ends (even SIGKILL of every process), can leave
a segment behind; the kernel frees the memory with its last holder.

Memory ordering: the state word is written after the slot's data and read before it. That
order is kept by x86 (TSO), the machines this targets; the doorbell's syscall is a barrier too.
"""

from __future__ import annotations

import mmap
import os
import select
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import context, reduction

import numpy as np
import torch

FREE, WRITING, FILLED, READING = 0, 1, 2, 3
_STATE, _UNIT, _WRITER = range(3)  # columns of the slot header
_CLOSED, _ERROR_LEN, _OWNER = range(3)  # queue-level words
_META_WORDS = 8
_ERROR_BYTES = 16384
_ALIGN = 4096


class StreamClosed(RuntimeError):
    """The queue was closed by its owner: the run is stopping, or a generator failed for good."""


class OwnerDied(RuntimeError):
    """The process that owns the queue (the launcher) is gone."""


def avoid_named_semaphores() -> None:
    """Call first in every child process: tqdm's default lock is a named POSIX semaphore
    (``/dev/shm/sem.mp-*``) that a process killed by SIGKILL leaves behind. Progress bars
    need only a thread lock within one process."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


_pin_failure_said: list[int] = []  # a failed page-locking is said once per process


def _stderr(message: str) -> None:
    print(f"streamgen: warning: {message}", file=sys.stderr, flush=True)


def _spawn_only_dupfd(fd: int, what: str):
    if context.get_spawning_popen() is None:
        raise RuntimeError(f"a {what} can only be handed to a process when it is spawned")
    return reduction.DupFd(fd)


class SharedBuffer:
    """Anonymous shared memory that spawned children inherit; freed with its last holder."""

    def __init__(self, nbytes: int, name: str = "streamgen", _fd: int | None = None) -> None:
        self.nbytes = nbytes
        if _fd is None:
            _fd = self._anonymous_fd(name)
            os.ftruncate(_fd, nbytes)
        self.fd = _fd
        self.mmap = mmap.mmap(_fd, nbytes)

    @staticmethod
    def _anonymous_fd(name: str) -> int:
        if hasattr(os, "memfd_create"):  # Linux: never visible in /dev/shm
            return os.memfd_create(name, os.MFD_CLOEXEC)
        fd, path = tempfile.mkstemp(prefix=f"{name}-")  # elsewhere: unlinked at once
        os.unlink(path)
        return fd

    def __reduce__(self):
        return (_rebuild_buffer, (self.nbytes, _spawn_only_dupfd(self.fd, "SharedBuffer")))

    def array(self, dtype, shape, offset: int) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.mmap, offset=offset)

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            pass  # views still exported; the mapping goes with the process
        os.close(self.fd)


def _rebuild_buffer(nbytes: int, dupfd) -> SharedBuffer:
    return SharedBuffer(nbytes, _fd=dupfd.detach())


class Doorbell:
    """A wake-up signal between processes: `ring` never blocks; `wait` returns once rung.

    It is a pipe: rings persist until the waiter reads them, so no wake-up is lost, and a pipe
    has no name to leak.
    """

    def __init__(self, _fds: tuple[int, int] | None = None) -> None:
        if _fds is None:
            _fds = os.pipe()
            os.set_blocking(_fds[1], False)
        self._r, self._w = _fds

    def __reduce__(self):
        return (
            _rebuild_doorbell,
            (_spawn_only_dupfd(self._r, "Doorbell"), _spawn_only_dupfd(self._w, "Doorbell")),
        )

    def fileno(self) -> int:
        return self._r

    def ring(self) -> None:
        try:
            os.write(self._w, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full of rings already: the waiter will wake

    def wait(self, timeout: float | None) -> bool:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if ready:
            self.drain()
        return bool(ready)

    def drain(self) -> None:
        os.set_blocking(self._r, False)
        try:
            while os.read(self._r, 65536):
                pass
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(self._r, True)

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def _rebuild_doorbell(r, w) -> Doorbell:
    return Doorbell((r.detach(), w.detach()))


@dataclass(frozen=True)
class SlotView:
    """Zero-copy tensors over one slot's memory."""

    images: torch.Tensor  # uint8 [B, 3, R, R]
    labels: torch.Tensor  # int64 [B]
    ids: torch.Tensor  # int64 [B]


def slot_nbytes(unit_size: int, resolution: int) -> int:
    raw = unit_size * 3 * resolution * resolution + 2 * 8 * unit_size
    return -(-raw // _ALIGN) * _ALIGN


class SlotQueue:
    """K fixed-size slots in shared memory, for one trainer rank. See the module docstring."""

    def __init__(
        self,
        slots: int,
        unit_size: int,
        resolution: int,
        freed: Doorbell,
        name: str = "streamgen-queue",
    ) -> None:
        if slots < 1:
            raise ValueError("a queue needs at least one slot")
        self.slots, self.unit_size, self.resolution = slots, unit_size, resolution
        self.slot_bytes = slot_nbytes(unit_size, resolution)
        self._header_bytes = -(-(8 * (slots * 3 + _META_WORDS) + _ERROR_BYTES) // _ALIGN) * _ALIGN
        self.buffer = SharedBuffer(self._header_bytes + slots * self.slot_bytes, name)
        self.filled = Doorbell()  # rung by generators on commit; the consumer waits on it
        self.freed = freed  # rung by the consumer on release; the supervisor waits on it
        self._attach()
        self._meta[_OWNER] = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_header", "_meta", "_error", "_views", "_pinned"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def _attach(self) -> None:
        self._header = self.buffer.array(np.int64, (self.slots, 3), 0)
        self._meta = self.buffer.array(np.int64, (_META_WORDS,), 8 * self.slots * 3)
        self._error = self.buffer.array(np.uint8, (_ERROR_BYTES,), 8 * (self.slots * 3 + _META_WORDS))
        self._views: dict[int, SlotView] = {}
        self._pinned = False

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def view(self, slot: int) -> SlotView:
        v = self._views.get(slot)
        if v is None:
            b, r = self.unit_size, self.resolution
            base = self._header_bytes + slot * self.slot_bytes
            images = torch.from_numpy(self.buffer.array(np.uint8, (b, 3, r, r), base))
            labels = torch.from_numpy(self.buffer.array(np.int64, (b,), base + b * 3 * r * r))
            ids = torch.from_numpy(self.buffer.array(np.int64, (b,), base + b * 3 * r * r + 8 * b))
            v = self._views[slot] = SlotView(images, labels, ids)
        return v

    def pin_memory(self, warn: Callable[[str], None] | None = None) -> bool:
        """Page-lock the slots for this process's CUDA context, so device copies are async.

        Registration is per process: the generators (copies in) and the trainer rank (copies
        out) each call it. A failure (e.g. the locked-memory limit, ``ulimit -l``) leaves the
        slots pageable: copies still work but block the host; it is said once per process, with
        CUDA's error, through ``warn`` (default: a line on stderr). Returns whether the slots are pinned.
        """
        if self._pinned or not torch.cuda.is_available():
            return self._pinned
        base = self.view(0).images.data_ptr() - self._header_bytes
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(base, self.nbytes, 0)
        code = int(getattr(err, "value", err))
        self._pinned = code == 0
        if not self._pinned and not _pin_failure_said:
            _pin_failure_said.append(code)  # once per process, whatever the number of queues
            try:
                reason = cudart.cudaGetErrorString(err)
            except Exception:  # an older binding: the code alone
                reason = "see CUDA's error codes"
            (warn or _stderr)(
                f"cannot page-lock the queue's {self.nbytes / 2**20:.0f} MiB in process {os.getpid()} "
                f"(cudaHostRegister error {code}: {reason}): copies to and from the GPU will block the host; "
                "raise the locked-memory limit (ulimit -l) to fix it"
            )
        return self._pinned

    # -- the supervisor's side -------------------------------------------------------------

    def claim(self, writer: int, unit: int) -> int | None:
        """FREE -> WRITING for ``writer``; the slot index, or None when the queue is full."""
        free = np.flatnonzero(self._header[:, _STATE] == FREE)
        if len(free) == 0:
            return None
        slot = int(free[0])
        self._header[slot, _UNIT] = unit
        self._header[slot, _WRITER] = writer
        self._header[slot, _STATE] = WRITING
        return slot

    def reclaim(self, slot: int, unit: int) -> bool:
        """After its writer died: free the slot if ``unit`` was never committed; True if so."""
        if self._header[slot, _STATE] == WRITING and self._header[slot, _UNIT] == unit:
            self._header[slot, _STATE] = FREE
            return True
        return False

    def close(self, error: str = "") -> None:
        """Stop the stream: consumers raise `StreamClosed` with ``error`` at their next wait."""
        data = error.encode()[:_ERROR_BYTES]
        self._error[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._meta[_ERROR_LEN] = len(data)
        self._meta[_CLOSED] = 1
        self.filled.ring()

    # -- the generator's side -------------------------------------------------------------

    def commit(self, slot: int) -> None:
        """WRITING -> FILLED: the slot's images, labels and ids are complete."""
        self._header[slot, _STATE] = FILLED
        self.filled.ring()

    # -- the consumer's side ----------------------------------------------------------------

    def get(self, poll: float = 1.0, alive: Callable[[], None] | None = None, unit: int | None = None) -> int:
        """Take a filled slot (FILLED -> READING), waiting until there is one to take.

        With ``unit``: the slot holding that unit, waiting for it even while later units are
        filled (in-order consumption: two runs then consume the same units at the same steps).
        This cannot deadlock when the supervisor dispatches a rank's units in increasing order
        (`RankLedger`): every unit below ``unit`` is consumed, so ``unit`` was dispatched before
        any filled one and holds a slot of its own, or its generator died, its slot was
        reclaimed, and the supervisor's next claim on this queue is for ``unit`` again.
        Without ``unit``: the filled slot with the lowest unit (arrival order, no waiting).

        Raises `StreamClosed` once the queue is closed, `OwnerDied` if the launcher is gone,
        or whatever ``alive()`` raises; both are checked at least every ``poll`` seconds.
        """
        while True:
            filled = np.flatnonzero(self._header[:, _STATE] == FILLED)
            if unit is not None:
                filled = filled[self._header[filled, _UNIT] == unit]
            if len(filled):
                slot = int(filled[np.argmin(self._header[filled, _UNIT])])
                self._header[slot, _STATE] = READING
                return slot
            self.check_open()
            if alive is not None:
                alive()
            self.filled.wait(poll)

    def try_get(self, unit: int | None = None) -> int | None:
        """`get` without waiting: the slot taken (FILLED -> READING), or None when none is ready.

        Raises `StreamClosed` / `OwnerDied` as `get` does, so a replaying consumer that never
        waits still learns that the stream is over."""
        filled = np.flatnonzero(self._header[:, _STATE] == FILLED)
        if unit is not None:
            filled = filled[self._header[filled, _UNIT] == unit]
        if len(filled):
            slot = int(filled[np.argmin(self._header[filled, _UNIT])])
            self._header[slot, _STATE] = READING
            return slot
        self.check_open()
        return None

    def unit(self, slot: int) -> int:
        return int(self._header[slot, _UNIT])

    def release(self, slot: int) -> None:
        """READING -> FREE: the consumer is done with the slot's memory."""
        self._header[slot, _STATE] = FREE
        self.freed.ring()

    @property
    def closed(self) -> bool:
        return bool(self._meta[_CLOSED])

    def check_open(self) -> None:
        if self._meta[_CLOSED]:
            raise StreamClosed(bytes(self._error[: self._meta[_ERROR_LEN]]).decode(errors="replace"))
        owner = int(self._meta[_OWNER])
        if owner != os.getpid() and os.getppid() != owner:
            raise OwnerDied(f"the launcher (pid {owner}) that owns the stream has exited")

    # -- anyone -----------------------------------------------------------------------------

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self._header[:, _STATE] == state))
