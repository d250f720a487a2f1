"""The launcher's stop request, shared with every trainer rank.

One word of anonymous shared memory (`streamgen.stream.queue.SharedBuffer`), handed to the trainer
processes when they are spawned. The launcher sets it (`StopControl.request`) on Ctrl-C, on
SIGTERM (a cluster's pre-emption) or when no generator is left; each rank reads it after every
step and while it waits for data (`streamgen.train.checkpoint.StopAndSave`), stops after the same
step as the others, and saves ``last.ckpt``. This module imports no deep-learning library: the
launcher uses it before anything starts.
"""

from __future__ import annotations

import numpy as np

from streamgen.stream.queue import SharedBuffer

_REQUESTED, _REASON_LEN = range(2)
_CONTROL_BYTES = 4096
_REASON_OFFSET = 64


class StopControl:
    """A stop request in shared memory: set by the launcher, read by every trainer rank.

    Handed to trainer processes when they are spawned (like the queues); the first reason wins.
    """

    def __init__(self) -> None:
        self.buffer = SharedBuffer(_CONTROL_BYTES, "streamgen-control")
        self._attach()

    def __getstate__(self) -> dict:
        return {"buffer": self.buffer}

    def __setstate__(self, state: dict) -> None:
        self.buffer = state["buffer"]
        self._attach()

    def _attach(self) -> None:
        self._words = self.buffer.array(np.int64, (2,), 0)
        self._reason = self.buffer.array(np.uint8, (_CONTROL_BYTES - _REASON_OFFSET,), _REASON_OFFSET)

    def request(self, reason: str) -> bool:
        """Ask every rank to stop after its current step and save; True for the first request."""
        if self._words[_REQUESTED]:
            return False
        data = reason.encode()[: len(self._reason)]
        self._reason[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._words[_REASON_LEN] = len(data)
        self._words[_REQUESTED] = 1  # written last: a reader that sees it sees the reason
        return True

    @property
    def requested(self) -> bool:
        return bool(self._words[_REQUESTED])

    @property
    def reason(self) -> str:
        return bytes(self._reason[: self._words[_REASON_LEN]]).decode(errors="replace")

    def close(self) -> None:
        self.buffer.close()
