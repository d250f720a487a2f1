"""The source stage: where a trainer rank's batches come from, and the hand-off to the model.

Two sources, chosen in one place (`streamgen.train.datamodule.make_datamodule`, from ``--source``):

- ``stream`` (`streamgen.train.stream_data.StreamDataModule`): every batch is a queue slot freshly filled
  by the generators, consumed once;
- ``cache`` (`streamgen.train.cache_data.CacheDataModule`): epochs over the fixed first N
  samples of the same plan, read from memory-mapped shards.

Both are a `SourceDataModule`, which owns everything they share, so the two arms of a
comparison differ only in where batches come from: the augmentation (``self.augment``, one
callable on whole uint8 batches on the trainer's device), the preview copy for TensorBoard,
the audit trail of consumed samples (``consumed-rank{r}.tsv``) and the real-image validation
loader. A subclass provides ``train_dataloader``, the record of what was consumed
(`_mark_consumed`, which also writes the audit line) and what to do once a batch's pixels are
no longer needed (`_after_hand_off`, e.g. free a queue slot).

A testing hook, ``STREAMGEN_AUDIT_PIXELS=1``, also appends to ``pixels-rank{r}.tsv`` one line
per image the rank trains on (step, id, label, `pixel_digest` of its stream image), so that a
test can check, batch by batch, that the label and the pixels of each image are those the plan
makes for its id (tests/launch/test_learning.py). Off by default: it is per-sample Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from streamgen.train.augment import train_augment

PREVIEW_IMAGES = 16
AUDIT_PIXELS_ENV = "STREAMGEN_AUDIT_PIXELS"  # testing hook: see the module docstring


def pixel_digest(images: torch.Tensor) -> torch.Tensor:
    """One int64 per uint8 image ``[B, 3, R, R]``: a position-weighted sum of its pixels (any
    change of one pixel changes it)."""
    flat = images.reshape(len(images), -1).to(torch.int64)
    weights = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int64) % 65521 + 1
    return (flat * weights).sum(1)


class SourceDataModule(L.LightningDataModule):
    """The shared hand-off: train batches are dicts ``{"image": uint8 [B,3,R,R], "label", "id", ...}``."""

    def __init__(
        self,
        rank: int,
        world: int,
        run_meta: dict[str, Any],
        crop: int,
        min_scale: float = 0.08,
        val_loader: Callable[[], Any] | None = None,
        preview_every: int = 0,
        consumed_log: Path | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world = rank, world
        self.run_meta = run_meta  # what a checkpoint must match to be resumed: classes, seed, ...
        self.crop, self.min_scale = crop, min_scale
        self.val_loader = val_loader  # real-image validation batches, when the run has a val_dir
        self.preview_every = preview_every
        self.consumed_log = consumed_log
        self._log_file = None
        self._pixel_file = None
        self.audit_pixels = os.environ.get(AUDIT_PIXELS_ENV) == "1"
        # uint8 [B, 3, H, W] on the trainer's device -> normalised float [B, 3, crop, crop]
        self.augment: Callable[[torch.Tensor], torch.Tensor] = lambda images: train_augment(
            images, self.crop, self.min_scale
        )

    # -- loaders ----------------------------------------------------------------------------

    def val_dataloader(self) -> Any:
        # Batches are (images, labels, skipped): unreadable images are left out, counted and named
        # (`streamgen.evaluate.realdata.val_loader`, given by the rank's wiring).
        return self.val_loader() if self.val_loader is not None else []

    # -- the hand-off to the model ----------------------------------------------------------

    def is_train_batch(self, batch: Any) -> bool:
        return isinstance(batch, dict) and "image" in batch and "id" in batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.is_train_batch(batch):
            return batch  # a validation batch
        return self._hand_off(batch)

    def _hand_off(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A train batch of uint8 images on the trainer's device -> the model's batch."""
        images = batch["image"]
        on_source_memory = images.device.type == "cpu" and self.shares_memory  # no device copy was made
        out = {
            "image": self.augment(images),
            "label": batch["label"].clone() if on_source_memory else batch["label"],
            "id": batch["id"].clone() if on_source_memory else batch["id"],
        }
        out.update({k: v for k, v in batch.items() if k not in ("image", "label", "id", "slot")})
        # PREVIEW_IMAGES stream images, over as many batches as that takes (the dashboard gathers them)
        if self.preview_every and self.trainer.global_step % self.preview_every < -(-PREVIEW_IMAGES // len(images)):
            out["preview"] = images[:PREVIEW_IMAGES].clone()
        if self.audit_pixels:
            self._audit_pixels(images, out["label"], out["id"])
        self._after_hand_off(batch, images.device)
        self._mark_consumed(batch)
        return out

    def _audit_pixels(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """The testing hook's line per image: step, id, label, pixel digest (see the module docstring)."""
        if self.consumed_log is None:
            return
        if self._pixel_file is None:
            self._pixel_file = open(Path(self.consumed_log).parent / f"pixels-rank{self.rank}.tsv", "a", buffering=1)
        step = self.trainer.global_step
        rows = zip(ids.tolist(), labels.tolist(), pixel_digest(images).tolist())
        self._pixel_file.write("".join(f"{step}\t{i}\t{lab}\t{d}\n" for i, lab, d in rows))

    # Whether train batches on the CPU are views of memory the source reuses (a queue slot).
    shares_memory = False

    def _after_hand_off(self, batch: dict[str, Any], device: torch.device) -> None:
        """The batch's source pixels are no longer needed once the copy to ``device`` is done."""

    def _mark_consumed(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def _audit(self, line: str) -> None:
        """Append one line to ``consumed-rank{r}.tsv`` (line-buffered: a crash loses at most one)."""
        if self.consumed_log is None:
            return
        if self._log_file is None:
            trim_audit(self.consumed_log, int(line.split("\t", 1)[0]))
            self._log_file = open(self.consumed_log, "a", buffering=1)
        self._log_file.write(line + "\n")

    def teardown(self, stage: str) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._pixel_file is not None:
            self._pixel_file.close()
            self._pixel_file = None

    # -- every rank's position in checkpoints -------------------------------------------------

    def gather_positions(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's position (``mine`` on this rank), for the checkpoint. Trainer.save_checkpoint
        calls state_dict on every rank, so the gather is a collective every rank joins."""
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            return gather_json(mine, self.world)
        return [mine]

    def own_position(self, positions: list[dict[str, Any]], what: str) -> dict[str, Any]:
        """This rank's entry of a checkpoint's gathered positions."""
        mine = [p for p in positions if p["rank"] == self.rank]
        if not mine:
            raise RuntimeError(f"the checkpoint holds no {what} for rank {self.rank}")
        return mine[0]


def trim_audit(path: Path, from_step: int) -> None:
    """A resumed run continues in its own folder: the lines of steps it is about to redo (lost
    since the checkpoint) are dropped first, so the audit trail holds each step once."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except OSError:
        return  # a new run: nothing to trim
    kept = [line for line in lines if line.split("\t", 1)[0].isdigit() and int(line.split("\t", 1)[0]) < from_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gather_json(mine: dict[str, Any], world: int) -> list[Any]:
    """Every rank's ``mine`` (plain JSON data), gathered with tensor collectives: JSON bytes in a
    uint8 tensor, never pickle (all_gather_object would unpickle whatever a peer sends)."""
    import json

    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(json.dumps(mine).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [json.loads(c[: int(n.item())].cpu().numpy().tobytes()) for c, n in zip(chunks, sizes)]
