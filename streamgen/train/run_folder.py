"""A run folder (``runs/NAME/version_K``, written by train.py) named where a checkpoint is wanted.

``train.py --resume RUN_DIR`` and ``eval.py RUN_DIR`` take the folder for its newest
``checkpoints/last.ckpt``; plain Python (no torch), so the launcher's checks stay quick.
"""

from __future__ import annotations

from pathlib import Path

from streamgen.errors import UsageError

LAST = "last.ckpt"


def last_checkpoint(path: str, flag: str) -> str:
    """``path`` as a checkpoint file: a file (or nothing) as given; a run folder gives its
    ``checkpoints/last.ckpt``; a folder of runs (``runs/NAME``) the newest of its versions'."""
    folder = Path(path)
    if not folder.is_dir():
        return path  # a file, or nothing: the reader of the checkpoint says which
    own = folder / "checkpoints" / LAST
    if own.is_file():
        return str(own)
    found = [p for p in folder.glob(f"version_*/checkpoints/{LAST}") if p.is_file()]
    if found:
        return str(max(found, key=lambda p: p.stat().st_mtime_ns))
    raise UsageError(
        f"{flag} {path}: a folder without checkpoints/{LAST}: give a run folder (runs/NAME/version_K) or a .ckpt file"
    )
