"""The checkpoint a run resumes from, read once for all of the launcher's checks.

The launcher checks a ``--resume`` checkpoint three ways before anything starts (the network it
holds, the stream's or the cache's position): each reads it through `read_checkpoint`, which
loads it once, memory-mapped (a ResNet-50 checkpoint with its optimiser is hundreds of MB).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from streamgen.errors import UsageError
from streamgen.train.run_folder import last_checkpoint


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


# Settings that make the resumed part another experiment: refused when they differ (dotted keys
# of config.yaml; a section name covers all its keys).
SCIENCE = (
    "source",
    "model",
    "prompt",
    "classes",
    "class_counts",
    "seed",
    "generator.resolution",
    "generator.steps",
    "generator.guidance",
    "generator.scheduler",
    "generator.dtype",
    "generator.safety_checker",
    "generator.max_redraws",
    "stream.resolution",
    "cache",
)
NOT_COMPARED = ("resume", "out", "name")  # where a resumed run continues is the checkpoint's folder


def resolve_resume(path: str) -> str:
    """``--resume`` as a checkpoint file (`streamgen.train.run_folder.last_checkpoint`)."""
    return last_checkpoint(path, "--resume")


def run_folder_of(checkpoint: str) -> Path | None:
    """The run folder a checkpoint was written in (``.../version_K/checkpoints/X.ckpt``), if it is one."""
    folder = Path(checkpoint).resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _is_science(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SCIENCE)


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted): the settings of a resumed run that differ from its first part's
    ``config.yaml``, each as ``key old -> new``. Refused: what alters the science (`SCIENCE`)
    and a smaller budget; accepted: everything else (a longer ``train.max_steps``, a larger budget)."""
    old, new = _flat(saved), _flat(now)
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in NOT_COMPARED or key in NOT_COMPARED:
            continue
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        change = f"{key} {a} -> {b}"
        if key == "train.budget_gpu_hours":
            smaller = b is not None and (a is None or b < a)
            # No budget before: a new one is a limit, not a change of what was run so far.
            (refused if smaller and a is not None else accepted).append(change)
        elif _is_science(key):
            refused.append(change)
        else:
            accepted.append(change)
    return refused, accepted


def check_resume_settings(checkpoint: str, now: dict[str, Any]) -> list[str]:
    """The accepted changes against the checkpoint's run folder config (`changed_settings`); a
    one-line UsageError for a refused one. Nothing to compare outside a run folder."""
    import yaml

    folder = run_folder_of(checkpoint)
    if folder is None:
        return []
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    refused, accepted = changed_settings(saved, now)
    if refused:
        flags = " ".join(f"--{c.split(' ')[0]} {c.split(' ', 1)[1].split(' -> ')[0]}" for c in refused)
        raise UsageError(
            f"--resume {checkpoint}: this run would change {'; '.join(refused)}, which alters the experiment: "
            f"resume with {flags}, or start a new run"
        )
    return accepted


def resumed_position(checkpoint: str) -> str:
    """'step N (I images, G GPU-hours)' of a checkpoint, for the launcher's start-up line."""
    state = read_checkpoint(checkpoint)
    compute = (state.get("callbacks") or {}).get("ComputeMonitor") or {}
    parts = []
    if "images_seen" in compute:
        parts.append(f"{int(compute['images_seen'])} images seen")
    held = [compute.get(k) for k in ("generator_device_seconds", "trainer_device_seconds")]
    if all(isinstance(v, (int, float)) for v in held):
        parts.append(f"{sum(held) / 3600:.4f} GPU-hours held")
    return f"step {state.get('global_step', '?')}" + (f" ({', '.join(parts)})" if parts else "")
