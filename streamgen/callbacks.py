"""Lightning callbacks: stream throughput to TensorBoard, sample previews, a step progress bar.

`StreamMonitor` logs, every ``log_every`` steps and from rank 0 only (no collectives, so it
cannot deadlock DDP):

- ``stream/trainer_images_per_s``: images consumed per second by all trainer ranks;
- ``stream/generator_images_per_s``: images made per second by this node's generators;
- ``stream/queue_depth``: filled slots waiting in rank 0's queue (0 means the trainer is
  starved, i.e. generation is the bottleneck; ``stream.slots`` means the generators are);
- ``stream/redraws`` and ``stream/generator_restarts``: totals so far;

and every ``preview_every`` steps an image grid of generated samples (``stream/samples``) with
their prompts as text (``stream/prompts``).
"""

from __future__ import annotations

import time

import lightning as L
import torchvision
from lightning.pytorch.callbacks import TQDMProgressBar

from streamgen.generator import GeneratorStats
from streamgen.plan import SamplePlan
from streamgen.queue import FILLED, SlotQueue


class StreamMonitor(L.Callback):
    def __init__(
        self, queue: SlotQueue, stats: GeneratorStats, plan: SamplePlan, world: int, log_every: int = 50
    ) -> None:
        self.queue, self.stats, self.plan = queue, stats, plan
        self.world, self.log_every = world, log_every
        self._last: tuple[float, int, float] | None = None  # (time, step, generated)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        step = trainer.global_step
        if "preview" in batch:
            self._log_preview(trainer, batch, step)
        now, generated = time.monotonic(), self.stats.total("images")
        if self._last is None:
            self._last = (now, step, generated)
            return
        if step % self.log_every:
            return
        t0, step0, generated0 = self._last
        dt = max(now - t0, 1e-9)
        images_per_step = len(batch["label"]) * self.world
        trainer.logger.log_metrics(
            {
                "stream/trainer_images_per_s": (step - step0) * images_per_step / dt,
                "stream/generator_images_per_s": (generated - generated0) / dt,
                "stream/queue_depth": self.queue.count(FILLED),
                "stream/redraws": self.stats.total("redraws"),
                "stream/generator_restarts": self.stats.total("restarts"),
            },
            step=step,
        )
        self._last = (now, step, generated)

    def _log_preview(self, trainer: L.Trainer, batch: dict, step: int) -> None:
        images = batch["preview"]
        ids = batch["id"][: len(images)].cpu().numpy()
        prompts = self.plan.prompts(ids)
        grid = torchvision.utils.make_grid(images.cpu(), nrow=4, padding=2)
        writer = trainer.logger.experiment
        writer.add_image("stream/samples", grid, step)
        rows = "\n".join(f"| {i} | {int(sid)} | {p} |" for i, (sid, p) in enumerate(zip(ids, prompts)))
        writer.add_text("stream/prompts", f"| grid position | sample id | prompt |\n|---|---|---|\n{rows}", step)


class StepProgressBar(TQDMProgressBar):
    """The stream has no epochs: show global steps out of ``max_steps`` (continuing on resume)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)
