"""Checkpoint writes: streamgen's atomic write vs Lightning's default, side by side.

Lightning's `TorchCheckpointIO` serialises the whole checkpoint into memory first, then has
fsspec write it to a temporary file under ``$TMPDIR`` and move it into place (a copy when the
run folder is on another filesystem: the window in which a kill leaves a truncated file).
`streamgen.train.checkpoint.atomic_save` streams it to a hidden file next to the target, fsyncs and
renames. Both write the same ResNet checkpoint (weights + SGD momentum) to ``--dir``.

    python bench/checkpoint.py --arch resnet50 --dir runs/bench-ckpt
    TMPDIR=/dev/shm python bench/checkpoint.py --arch resnet50 --dir runs/bench-ckpt   # cluster layout

Prints seconds per write and the peak extra memory (RSS) each needed, plus the ratios.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import torchvision
from lightning.fabric.plugins import TorchCheckpointIO

from streamgen.train.checkpoint import AtomicCheckpointIO


def fake_checkpoint(arch: str) -> dict:
    net = torchvision.models.get_model(arch, weights=None, num_classes=1000)
    momentum = {k: torch.randn_like(v) for k, v in net.state_dict().items() if v.is_floating_point()}
    return {"state_dict": net.state_dict(), "optimizer_states": [{"momentum": momentum}], "global_step": 1}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(io, checkpoint: dict, path: Path, repeats: int) -> tuple[float, int]:
    """Seconds per write (best of ``repeats``) and how far the peak RSS rose during them."""
    before = peak_rss()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        best = min(best, time.perf_counter() - started)
    return best, peak_rss() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="torchvision model whose checkpoint is written")
    parser.add_argument(
        "--dir", default="runs/bench-checkpoint", help="folder to write in (the files are removed after)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="writes per method (the best counts)")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = fake_checkpoint(args.arch)
    # streamgen first: the peak-RSS counter only rises, so the method with the smaller peak goes first.
    ours_s, ours_mem = measure(AtomicCheckpointIO(), checkpoint, folder / "atomic.ckpt", args.repeats)
    theirs_s, theirs_mem = measure(TorchCheckpointIO(), checkpoint, folder / "lightning.ckpt", args.repeats)
    size = (folder / "atomic.ckpt").stat().st_size
    for name in ("atomic.ckpt", "lightning.ckpt"):
        (folder / name).unlink()
    print(f"{args.arch} checkpoint: {size / 2**20:.0f} MiB")
    print(f"{'':24}{'s/write':>10}{'extra RSS MiB':>16}")
    print(f"{'streamgen atomic_save':24}{ours_s:10.2f}{ours_mem / 2**20:16.0f}")
    print(f"{'Lightning default':24}{theirs_s:10.2f}{theirs_mem / 2**20:16.0f}")
    print(f"time ratio (Lightning / streamgen): {theirs_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
