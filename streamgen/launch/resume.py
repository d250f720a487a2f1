"""The checkpoint a run resumes from, read once for all of the launcher's checks.

The launcher checks a ``--resume`` checkpoint three ways before anything starts (the network it
holds, the stream's or the cache's position): each reads it through `read_checkpoint`, which
loads it once, memory-mapped (a ResNet-50 checkpoint with its optimiser is hundreds of MB).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from streamgen.errors import UsageError


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, or a one-line `UsageError`."""
    try:
        stat = os.stat(path)
    except OSError:
        raise UsageError(f"--resume {path}: no such checkpoint file") from None
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: not a file (give a .ckpt written by train.py)")
    return _load(path, stat.st_mtime_ns, stat.st_size)  # a rewritten file is read again


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch file at all
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"--resume {path}: not a streamgen checkpoint (not a Lightning checkpoint)")
    return checkpoint
