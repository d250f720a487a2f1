"""The dashboard and the terminal: is the run healthy, is it starved, what is it learning.

TensorBoard (`StreamLogger` + `StreamMonitor`, rank 0 only, no collectives, so nothing here
can deadlock DDP). **One step convention**: every tag is logged at ``trainer.global_step``,
the number of optimizer updates done (Lightning's own ``self.log`` would use one less), so
``train/*``, ``stream/*``, ``val/*`` and ``probe/*`` points of the same moment share a step.
There is no ``epoch`` tag (the stream has no epochs).

- ``train/loss``, ``train/top1_stream`` (from the model), ``train/lr`` (the scheduled LR;
  ``train.lr`` in the config is per 256 images and is scaled to the global batch: both are
  stated in the ``config`` text and in the tag's description);
- ``stream/trainer_wait_fraction``: the share of wall time rank 0 spent blocked waiting for
  its next batch (the data module's ``wait_seconds``): 0 = never starved, 1 = always;
- ``stream/queue_fill``: filled slots / slots of rank 0's queue, averaged over every step of
  the window (the slot count is in the chart title and the config);
- ``stream/generator_images_per_s`` (the node's generators), ``stream/generator<g>_images_per_s``
  (each) and ``stream/trainer_images_per_s`` (all ranks): on one custom-scalars chart. A
  custom-scalars chart colours its lines by run (and tells a run's tags apart only by a small
  symbol), so each rate is also written as ``throughput/images_per_s`` of its own sub-run
  (``RUN/throughput/generators``, ``.../generator<g>``, ``.../trainers``): the chart draws
  that tag, one colour per producer and consumer;
- ``stream/redraws``, ``stream/generator_restarts``: totals so far (integers);
- ``workers/<role><i>_gpu_util`` (%) and ``workers/<role><i>_gpu_memory_gib`` for every
  trainer and generator GPU, read with NVML (nothing is logged on CPU);
- ``stream/samples``: at least 16 stream images at the stream resolution (enlarged by a whole
  factor when small, so the caption fits), each captioned with its class; ``stream/prompts``:
  their id, class, WordNet id, scene and prompt, in grid order;
- ``config`` (text) and the HPARAMS tab: the resolved config (``config.yaml`` in the run
  folder: every ``auto`` replaced by what ran), with the final metrics.

Smoothing: TensorBoard smooths every scalar in the browser and cannot be told not to per tag.
So integer counts are logged so that smoothing cannot invent a state: the queue is logged as
a fill fraction averaged over the window (a smoothed average is still an average), counters
only grow (read them with smoothing 0 or the tooltip's "Value"). Group order: the Time Series
page sorts tag groups alphabetically (and opens only the first ones), which no log can change;
the devices go under ``workers`` to sort after ``stream``, ``train`` and ``val``, and the link
of `streamgen.train.dashboard` (first line of the ``config`` text, and printed by the launcher) pins
the train, stream and val cards at the top of the page. The **Custom Scalars** page is the
curated overview, in the order train, stream, val, probe, compute, devices.

The terminal (`StepProgressBar`): one bar in global steps with loss, top-1, images/s, wait
fraction, ETA (and, with a replay buffer, ``uses=``: images seen per unique image) on a terminal; when stdout is not a terminal (SLURM, nohup, a pipe), one
plain timestamped ``key=value`` line every ``log_every`` steps instead, never a carriage return.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from streamgen.plan.samples import SamplePlan
from streamgen.stream.queue import FILLED, SlotQueue
from streamgen.stream.worker import GeneratorStats
from streamgen.train.compute import ScoresWhileTraining
from streamgen.train.dashboard import dashboard_query, pinned_tags

# Rates written again, each into a sub-run of its own, for a chart with one colour per line.
THROUGHPUT = re.compile(r"stream/(?P<who>(?:node\d+_)?generator\d*|trainer)_images_per_s")
THROUGHPUT_RUNS = {"generator": "generators", "trainer": "trainers"}  # the totals
THROUGHPUT_TAG = "throughput/images_per_s"
PREVIEW_IMAGES = 16
CAPTION_MIN_TILE = 128  # smaller stream images are enlarged (nearest, a whole factor) to this
DESCRIPTIONS = {
    "train/loss": "training loss (cross-entropy, train.label_smoothing) on the stream batch of rank 0",
    "train/top1_stream": "top-1 on the stream batch of rank 0, before the update (images never seen before)",
    "train/lr": "SGD learning rate after warm-up/cosine; config train.lr is per 256 images, scaled to the global batch",
    "stream/trainer_wait_fraction": "share of rank 0's wall time spent blocked waiting for data: 0 fed, 1 starved",
    "stream/queue_fill": "filled slots / slots of rank 0's queue, averaged over the steps of the window",
    "stream/generator_images_per_s": "images made per second by this node's generators",
    "stream/trainer_images_per_s": "images consumed per second by all trainer ranks",
    "stream/redraws": "total black/non-finite images redrawn (an integer)",
    "stream/generator_restarts": "total generator crashes survived (an integer)",
}


def quiet_libraries() -> None:
    """Silence what Lightning and torch print that is not a warning, at the source.

    Lightning's informational messages (tips, the GPU/TPU and "LOCAL_RANK" banners,
    "Initializing distributed", "`Trainer.fit` stopped") go through its two loggers at INFO;
    its warnings go through ``warnings`` (and its loggers at WARNING) and stay. One known
    deprecation from inside Lightning 2.6 (torch's ``LeafSpec``), not ours to fix, is muted.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # A resumed run continues in its own folder (streamgen.launch.resume): its checkpoints are there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


# -- TensorBoard --------------------------------------------------------------------------


class StreamLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger with one step convention and no ``epoch`` tag.

    ``global_step`` (set by `StreamMonitor.setup`) gives the step of every scalar: Lightning
    passes its own count (one less during training and validation), which is ignored.
    Each tag of `DESCRIPTIONS` carries its description (the info tooltip in TensorBoard).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_step: Callable[[], int] | None = None
        self.descriptions = dict(DESCRIPTIONS)
        self._described: set[str] = set()
        self._throughput: dict[str, Any] = {}  # sub-run name -> its SummaryWriter

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.global_step is not None:
            step = self.global_step()
        for tag, value in metrics.items():
            if tag == "epoch":
                continue
            self.add_scalar(tag, float(value.item() if isinstance(value, torch.Tensor) else value), step)

    def add_scalar(self, tag: str, value: float, step: int | None) -> None:
        rate = THROUGHPUT.fullmatch(tag)
        if rate is not None:
            self._throughput_writer(THROUGHPUT_RUNS.get(rate["who"], rate["who"])).add_scalar(
                THROUGHPUT_TAG, value, step
            )
        description = self.descriptions.get(tag)
        if description is None or tag in self._described:
            self.experiment.add_scalar(tag, value, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

        self._described.add(tag)  # TensorBoard reads a tag's metadata from its first event
        metadata = SummaryMetadata(
            summary_description=description, plugin_data=SummaryMetadata.PluginData(plugin_name="scalars")
        )
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value, metadata=metadata)])
        self.experiment._get_file_writer().add_summary(summary, step)

    @rank_zero_only
    def log_run(self, resolved: dict[str, Any], notes: list[str], metrics: list[str], layout: dict) -> None:
        """The resolved config as text (after ``notes``) and hyper-parameters, and the custom-scalars layout."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.experiment
        head = "".join(f"- {note}\n" for note in notes)
        writer.add_text("config", f"{head}\n```yaml\n{yaml.safe_dump(resolved, sort_keys=False)}```", 0)
        _, ssi, _ = hparams(hparam_values(resolved), dict.fromkeys(metrics, 0.0))
        # Only the session, no experiment summary: TensorBoard then builds the HPARAMS table from every
        # run of the logdir, each setting marked where it differs between runs (the table shows those
        # first), with every scalar any run logged as a metric (its latest value: the final one). One
        # run's experiment summary would stand for all, with only its own metrics (no val/top1 when
        # it had no val set).
        writer._get_file_writer().add_summary(ssi, 0)
        writer.add_custom_scalars(layout)

    def _throughput_writer(self, name: str):
        if name not in self._throughput:
            from torch.utils.tensorboard import SummaryWriter

            self._throughput[name] = SummaryWriter(os.path.join(self.log_dir, "throughput", name))
        return self._throughput[name]

    @rank_zero_only
    def finalize(self, status: str) -> None:
        for writer in self._throughput.values():
            writer.close()
        self._throughput = {}
        super().finalize(status)

    @rank_zero_only
    def log_run_end(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        _, _, sei = hparams({}, {})  # session end: status SUCCESS
        self.experiment._get_file_writer().add_summary(sei, self.global_step() if self.global_step else None)
        self.experiment.flush()


def hparam_values(resolved: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat ``section.key`` -> int/float/str/bool, as TensorBoard's HPARAMS plugin takes them.

    A null (a setting this run did not use: no cache on a stream run, no budget) is the text
    'None', so that every run of a logdir has every key and TensorBoard marks a setting as
    differing (its table shows those first) where one run has it and another has not."""
    flat: dict[str, Any] = {}
    for key, value in resolved.items():
        if isinstance(value, dict):
            flat.update(hparam_values(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = str(value)
    return flat


def dashboard_layout(
    slots: int, lr: float, peak_lr: float, generators: int, val: bool = True, probes: bool = True, devices: bool = True
) -> dict:
    """The Custom Scalars page: the overview, in the order a researcher reads it; no chart for what
    the run does not log (no val set, no probes, no GPU), where TensorBoard would draw empty axes."""
    layout = {
        "1 train": {
            "loss": ["Multiline", ["train/loss"]],
            "top-1 on the stream (unseen images)": ["Multiline", ["train/top1_stream"]],
            f"learning rate (config {lr:g} per 256 images; peak {peak_lr:g} for the global batch)": [
                "Multiline",
                ["train/lr"],
            ],
        },
        "2 stream": {
            # One colour per line: each rate is its own sub-run (see THROUGHPUT).
            f"images/s: {generators} generator(s), each and in total (throughput/generators), vs trainers": [
                "Multiline",
                [THROUGHPUT_TAG],
            ],
            "trainer wait fraction (1 = starved: generation is the bottleneck)": [
                "Multiline",
                ["stream/trainer_wait_fraction"],
            ],
            f"queue fill (fraction of {slots} slots)": ["Multiline", ["stream/queue_fill"]],
            "redraws and generator restarts (totals)": ["Multiline", ["stream/redraws", "stream/generator_restarts"]],
            "fresh fraction of the images trained on (1: no replay)": ["Multiline", ["stream/fresh_fraction"]],
        },
        # Accuracies (fractions) apart from the loss and the skipped count, whose scales would flatten them.
        "3 val": {
            "top-1 and top-5 on real images": ["Multiline", [r"val/top\d"]],
            "against compute (x: milli-GPU-hours, 1500 = 1.5 GPU-hours)": ["Multiline", [r"val_by_gpu_hours/top\d"]],
            "loss on real images, unreadable images skipped": ["Multiline", ["val/loss", "val/skipped_images"]],
        },
        "4 probe": {"linear probes": ["Multiline", [r"probe/.*"]]},
        "5 compute": {
            "GPU-hours held (generators, trainers, total)": ["Multiline", [r"compute/.*gpu_hours"]],
            "images seen and unique images": ["Multiline", ["data/images_seen", "data/unique_images"]],
            "uses per unique image (images seen / unique)": ["Multiline", ["data/mean_uses"]],
        },
        "6 devices": {
            "GPU utilisation (%)": ["Multiline", [r"workers/.*_gpu_util"]],
            "GPU memory (GiB)": ["Multiline", [r"workers/.*_gpu_memory_gib"]],
        },
    }
    for category, shown in (("3 val", val), ("4 probe", probes), ("6 devices", devices)):
        if not shown:
            del layout[category]
    return layout


class GpuReader:
    """Utilisation and memory of named CUDA devices through NVML; empty without NVML or GPUs."""

    def __init__(self, devices: dict[str, int]) -> None:
        self.handles: dict[str, Any] = {}
        if not devices or not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no driver library: nothing to read
            return
        self._nvml = pynvml
        for name, index in devices.items():
            try:
                uuid = str(torch.cuda.get_device_properties(index).uuid)  # CUDA and NVML orders may differ
                uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                self.handles[name] = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                self.handles[name] = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> dict[str, float]:
        out = {}
        for name, handle in self.handles.items():
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                used = self._nvml.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:
                continue
            out[f"workers/{name}_gpu_util"] = float(util)
            out[f"workers/{name}_gpu_memory_gib"] = used / 2**30
        return out


class StreamMonitor(L.Callback):
    """Logs the stream, the LR and the devices every ``log_every`` steps; see the module docstring.

    ``queue`` and ``stats`` may be None for a source without generators (a cache): the
    stream's generator and queue tags are then left out.
    """

    def __init__(
        self,
        queue: SlotQueue | None,
        stats: GeneratorStats | None,
        plan: SamplePlan,
        world: int,
        log_every: int = 50,
        devices: dict[str, int] | None = None,
        run_config: Path | None = None,
        max_steps: int | None = None,
        model: str | None = None,
    ) -> None:
        self.queue, self.stats, self.plan = queue, stats, plan
        self.model = model  # its tokenizer gives the prompts as SD receives them (the preview table)
        self._tokenizer: Any = None
        self.world, self.log_every, self.max_steps = world, log_every, max_steps
        self.devices = devices or {}
        self.run_config = run_config  # the resolved config.yaml
        self.latest: dict[str, float] = {}  # the last window's figures, for the progress bar
        self._last: tuple[float, int, float, np.ndarray] | None = None  # time, step, waited, made
        self._fill: list[float] = []
        self._preview: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._gpus: GpuReader | None = None
        self._node_made: np.ndarray | None = None  # several nodes: the last gathered images made per rank

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, StreamLogger):
            trainer.logger.global_step = lambda: trainer.global_step

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        self._gpus = GpuReader(self.devices)
        if isinstance(trainer.logger, StreamLogger) and self.run_config is not None and self.run_config.is_file():
            self._log_run(trainer, yaml.safe_load(self.run_config.read_text()))

    def _log_run(self, trainer: L.Trainer, resolved: dict[str, Any]) -> None:
        train, stream = resolved["train"], resolved["stream"]
        global_batch = stream["batch_size"] * self.world
        peak = float(train["lr"]) * global_batch / 256
        pinned = pinned_tags(resolved["source"] == "stream", bool(train.get("val_dir")))
        notes = [
            f"dashboard: [Time Series with train, stream and val pinned first]({dashboard_query(pinned)}) "
            f"(with `tensorboard --logdir` on the run's output folder)",
            f"learning rate: train.lr {train['lr']} is per 256 images; the global batch is {global_batch} "
            f"({stream['batch_size']} x {self.world} ranks), so the peak LR is {train['lr']} x {global_batch} / 256 "
            f"= {peak:g} (train/lr)",
            f"queue: {stream['slots']} slots per rank (stream/queue_fill is a fraction of them)",
            f"order: each rank consumes its units in {stream.get('order', 'arrival')} order",
            "values are what ran: every auto and default decided (config.yaml in the run folder)",
        ]
        trainer.logger.descriptions["train/lr"] += f" (config {train['lr']}, peak {peak:g})"
        trainer.logger.descriptions["stream/queue_fill"] += f" ({stream['slots']} slots)"
        metrics = ["train/loss", "train/top1_stream"]
        if train.get("val_dir"):
            metrics += ["val/top1", "val/top5"]
        for probe in (train.get("probes") or "").split(","):  # NAME=ROOT,...
            if "=" in probe:
                metrics.append(f"probe/{probe.split('=', 1)[0].strip()}/top1")
        if any(hasattr(c, "total_gpu_hours") for c in trainer.callbacks):
            metrics.append("compute/total_gpu_hours")
        layout = dashboard_layout(
            stream["slots"],
            float(train["lr"]),
            peak,
            resolved["generators"],
            val=bool(train.get("val_dir")),
            probes=any(m.startswith("probe/") for m in metrics),
            devices=bool(self._gpus is not None and self._gpus.handles),
        )
        trainer.logger.log_run(resolved, notes, metrics, layout)

    def _logs_at(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def _gather_nodes(self, trainer: L.Trainer) -> np.ndarray:
        """Several nodes: each node's images made so far and each rank's queue fill, from every
        rank (a collective: every rank calls it at the same steps). Rows: node, made, fill."""
        made = self.stats.total("images") if self.stats is not None and trainer.local_rank == 0 else 0.0
        fill = self.queue.count(FILLED) / self.queue.slots if self.queue is not None else 0.0
        import torch.distributed as dist

        mine = torch.tensor([[float(trainer.node_rank), made, fill]], dtype=torch.float64)
        mine = mine.to(trainer.strategy.root_device)  # gloo: CPU; NCCL: this rank's GPU
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return torch.cat(gathered).cpu().numpy()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        nodes = self._gather_nodes(trainer) if trainer.num_nodes > 1 and self._logs_at(step) else None
        if not trainer.is_global_zero or trainer.logger is None:
            return
        if "preview" in batch:
            self._add_preview(trainer, batch, step)
        if self.queue is not None:
            self._fill.append(self.queue.count(FILLED) / self.queue.slots)
        now, waited = time.monotonic(), data_wait_seconds(trainer.datamodule)
        made = self.stats.table[:, GeneratorStats.FIELDS.index("images")].copy() if self.stats is not None else None
        if self._last is None:
            self._last = (now, step, waited, made)
            self._node_made = nodes
            return
        if not self._logs_at(step):
            return
        metrics = self._window(trainer, batch, now, step, waited, made)
        if nodes is not None:
            metrics.update(self._node_window(nodes, now - self._last[0]))
        self.latest = {**metrics, "step": step, "steps_per_s": (step - self._last[1]) / max(now - self._last[0], 1e-9)}
        trainer.logger.log_metrics(metrics, step=step)
        self._last, self._fill = (now, step, waited, made), []

    def _window(self, trainer: L.Trainer, batch: dict, now: float, step: int, waited: float, made) -> dict:
        t0, step0, waited0, made0 = self._last
        seconds = max(now - t0, 1e-9)
        metrics = {
            "train/lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            "stream/trainer_wait_fraction": min(1.0, (waited - waited0) / seconds),
            "stream/trainer_images_per_s": (step - step0) * len(batch["id"]) * self.world / seconds,
        }
        if self.queue is not None:
            metrics["stream/queue_fill"] = float(np.mean(self._fill)) if self._fill else 0.0
        if self.stats is not None:
            per_generator = (made - made0) / seconds
            metrics["stream/generator_images_per_s"] = float(per_generator.sum())
            if len(per_generator) > 1:
                for g, rate in enumerate(per_generator):
                    metrics[f"stream/generator{g}_images_per_s"] = float(rate)
            metrics["stream/redraws"] = int(self.stats.total("redraws"))
            metrics["stream/generator_restarts"] = int(self.stats.total("restarts"))
        if self._gpus is not None:
            metrics.update(self._gpus.read())
        return metrics

    def _node_window(self, nodes: np.ndarray, seconds: float) -> dict[str, float]:
        """Throughput over all nodes: generator images/s summed, and each node's own, with its queue fill."""

        def made_per_node(rows: np.ndarray | None) -> dict[int, float]:
            if rows is None:
                return {}
            return {int(n): float(rows[rows[:, 0] == n, 1].sum()) for n in np.unique(rows[:, 0])}

        now_made, before = made_per_node(nodes), made_per_node(self._node_made)
        self._node_made = nodes
        seconds = max(seconds, 1e-9)
        metrics = {"stream/generator_images_per_s": (sum(now_made.values()) - sum(before.values())) / seconds}
        for n, made in now_made.items():
            metrics[f"stream/node{n}_generator_images_per_s"] = (made - before.get(n, 0.0)) / seconds
            metrics[f"stream/node{n}_queue_fill"] = float(nodes[nodes[:, 0] == n, 2].mean())
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and isinstance(trainer.logger, StreamLogger):
            trainer.logger.log_run_end()

    # -- previews ---------------------------------------------------------------------------

    def _add_preview(self, trainer: L.Trainer, batch: dict, step: int) -> None:
        images = batch["preview"].cpu()
        self._preview.append((images, batch["id"][: len(images)].cpu()))
        if sum(len(i) for i, _ in self._preview) < PREVIEW_IMAGES:
            return  # the data module sends them over the next few batches
        images = torch.cat([i for i, _ in self._preview])[:PREVIEW_IMAGES]
        ids = torch.cat([i for _, i in self._preview])[:PREVIEW_IMAGES].numpy()
        self._preview = []
        if self._tokenizer is None and self.model is not None:
            from streamgen.generate.tokens import load_tokenizer

            self._tokenizer = load_tokenizer(self.model) or False  # False: none to load, not tried again
        rows = preview_rows(self.plan, ids, self._tokenizer or None)
        writer = trainer.logger.experiment
        writer.add_image("stream/samples", captioned_grid(images, [r["class"] for r in rows]), step)
        writer.add_text("stream/prompts", prompt_table(rows), step)


def data_wait_seconds(datamodule) -> float:
    """Seconds the data module has spent blocked fetching batches (its ``wait_seconds``, or
    that of its ``stream``); 0 for a source that does not count them."""
    for source in (datamodule, getattr(datamodule, "stream", None)):
        seconds = getattr(source, "wait_seconds", None)
        if seconds is not None:
            return float(seconds)
    return 0.0


def preview_rows(plan: SamplePlan, ids: np.ndarray, tokenizer: Any = None) -> list[dict[str, Any]]:
    """For each sample id: tile, id, class (its first lemma), WordNet id, scene and prompt, the
    prompt as SD receives it (cut at CLIP's 77 tokens by ``tokenizer``, the model's own)."""
    from streamgen.generate.tokens import received

    labels = plan.labels(ids)
    prompts = received(tokenizer, plan.prompts(ids, labels))
    if plan.template.uses_background:
        from streamgen.plan.prompts import places365_scenes

        scenes = [places365_scenes()[s] for s in plan.scenes(ids).tolist()]
    else:
        scenes = ["-"] * len(ids)
    rows = []
    for tile, (sid, label, scene, prompt) in enumerate(zip(ids.tolist(), labels.tolist(), scenes, prompts)):
        cls = plan.classes.classes[label]
        name = cls.lemmas.split(",")[0].strip() or cls.key
        rows.append({"tile": tile, "id": sid, "class": name, "wnid": cls.key, "scene": scene, "prompt": prompt})
    return rows


def prompt_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table in grid order (row by row, 4 tiles a row)."""
    header = "| tile | sample id | class | WordNet id | scene | prompt |\n|---|---|---|---|---|---|\n"
    return header + "\n".join(
        f"| {r['tile']} | {r['id']} | {r['class']} | {r['wnid']} | {r['scene']} | {r['prompt']} |" for r in rows
    )


def captioned_grid(images: torch.Tensor, captions: list[str], nrow: int = 4, padding: int = 2) -> torch.Tensor:
    """uint8 ``[N, 3, R, R]`` -> one uint8 ``[3, H, W]`` grid, each tile's caption drawn on it.

    Tiles smaller than `CAPTION_MIN_TILE` are enlarged by a whole factor (nearest: every
    stream pixel becomes a block, nothing is interpolated) so that the caption is legible.
    """
    import torchvision
    from PIL import Image, ImageDraw, ImageFont

    factor = max(1, math.ceil(CAPTION_MIN_TILE / images.shape[-1]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    side = images.shape[-1]
    font = ImageFont.load_default(size=max(10, side // 10))
    tiles = []
    for image, caption in zip(images, captions):
        tile = Image.fromarray(image.permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile, "RGBA")
        while caption and draw.textlength(caption, font=font) > side - 4:
            caption = caption[:-1]
        height = font.getbbox("Ag")[3] + 4
        draw.rectangle([0, side - height, side, side], fill=(0, 0, 0, 170))  # a band the text reads on
        draw.text((2, side - height + 1), caption, font=font, fill=(255, 255, 255, 255))
        tiles.append(torch.from_numpy(np.array(tile)).permute(2, 0, 1))
    return torchvision.utils.make_grid(torch.stack(tiles), nrow=nrow, padding=padding)


# -- the terminal -------------------------------------------------------------------------


# No tqdm ETA or rate (they count evaluation pauses): ours comes in the postfix.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"  # tqdm puts ", " before the postfix


class StepProgressBar(ProgressBar):
    """One bar in global steps (on a terminal) or plain lines every ``log_every`` steps.

    The figures come from `StreamMonitor.latest` (images/s, wait, queue, LR), from the model's
    progress-bar metrics (loss, top-1) and from the `streamgen.train.compute.ComputeMonitor`
    (GPU-hours, and the ETA: to ``max_steps`` or the budget, whichever comes first, at its
    smoothed step time, blind to evaluation pauses), when present. Each validation and probe
    result is a line when it is computed; the end of fit prints a summary (steps, images,
    loss, validation, GPU-hours, wall time, checkpoint). The bar keeps loss, wait and img/s
    within 80 columns (top-1 and the ETA come after them).
    """

    def __init__(
        self, monitor: StreamMonitor, log_every: int, stream=None, tty: bool | None = None, clock=time.monotonic
    ) -> None:
        super().__init__()
        self.monitor, self.log_every = monitor, log_every
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._enabled = True
        self._bar = None
        self._last_line: tuple[int, str] | None = None  # (step, gpu_hours) of the last plain line
        self._said_probes: dict[str, int] = {}
        self.val: dict[str, float] = {}  # the latest validation's metrics, for the summary

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self._enabled or not self.tty:
            return
        from tqdm import tqdm

        width_known = shutil.get_terminal_size((0, 0)).columns > 0  # a bare pty reports 0 columns
        self._bar = tqdm(
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            desc="train",
            unit="step",
            file=self.stream,
            dynamic_ncols=width_known,
            ncols=None if width_known else 80,
            nrows=None if width_known else 20,  # tqdm prints nothing on a terminal of 0 rows
            bar_format=BAR_FORMAT,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._enabled:
            return
        step = trainer.global_step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(self._postfix(trainer), refresh=False)
        elif step % self.log_every == 0 and step != trainer.max_steps and not trainer.should_stop:
            self._line(trainer, step)  # the last step's line comes at the end, with the final figures
        self._say_probes(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        self.val = metrics
        shown = " ".join(
            f"{k.removeprefix('val/')}={100 * v:.2f}%"
            if k in ("val/top1", "val/top5")
            else f"{k.removeprefix('val/')}={v:.4g}"
            for k, v in metrics.items()
            if k in ("val/top1", "val/top5", "val/loss")
        )
        self._say(f"validation at step {trainer.global_step}: {shown}{self._gpu_hours_text(trainer)}")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(trainer), refresh=False)
            self._bar.close()  # prints the final state once
            self._bar = None
        elif self._enabled and trainer.global_step > 0:
            line = (trainer.global_step, self._gpu_hours_text(trainer))
            if line != self._last_line:  # the final figures (a validation may have run since the last line)
                self._line(trainer, trainer.global_step)
        self._say_probes(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero and trainer.global_step > 0:
            self._say(self.summary(trainer))

    def summary(self, trainer: L.Trainer) -> str:
        """The end of fit in one line: what was done, what it learnt, what it cost, where it is."""
        f = self._figures(trainer)
        compute = _compute(trainer)
        parts = [f"{trainer.global_step} steps"]
        if compute is not None:
            parts.append(f"{compute.images_seen} images seen ({compute.unique_images} unique)")
        parts.append(f"loss {f['loss']:.4f}")
        if "val/top1" in self.val:
            parts.append(f"val top-1 {100 * self.val['val/top1']:.2f}%")
        if compute is not None:
            parts.append(f"{compute.total_gpu_hours:.4f} GPU-hours")
            wall = (compute.ended or compute.clock()) - min(
                compute.ledger.started, compute.ledger.generators_started or math.inf
            )
            parts.append(f"wall {dt.timedelta(seconds=round(wall))}")
        saver = getattr(trainer, "checkpoint_callback", None)
        if saver is not None and getattr(saver, "dirpath", None):
            parts.append(f"checkpoint {Path(saver.dirpath) / 'last.ckpt'}")
        return "done: " + ", ".join(parts)

    def _say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(f"streamgen: {text}", file=self.stream)
        else:
            print(f"streamgen: {text}", file=self.stream, flush=True)

    def _say_probes(self, trainer: L.Trainer) -> None:
        """A line for each linear-probe score made since the last call."""
        if not trainer.is_global_zero:
            return
        for probe in (cb for cb in trainer.callbacks if isinstance(cb, ScoresWhileTraining)):
            for name, last in probe.last.items():
                if self._said_probes.get(name) != last.get("step"):
                    self._said_probes[name] = last.get("step")
                    self._say(f"linear probe {name} at step {last.get('step')}: top-1 {float(last['top1']):.2f}%")

    def _figures(self, trainer: L.Trainer) -> dict[str, float]:
        shown = {k: float(v) for k, v in trainer.progress_bar_metrics.items()}
        latest = self.monitor.latest
        return {
            "loss": shown.get("train/loss", math.nan),
            "top1": shown.get("train/top1_stream", math.nan),
            "gen_img_s": latest.get("stream/generator_images_per_s", math.nan),
            "train_img_s": latest.get("stream/trainer_images_per_s", math.nan),
            "wait": latest.get("stream/trainer_wait_fraction", math.nan),
            "queue": latest.get("stream/queue_fill", math.nan),
            "lr": latest.get("train/lr", math.nan),
        }

    def _eta(self, trainer: L.Trainer) -> str:
        compute = _compute(trainer)
        seconds = compute.eta_seconds(trainer.global_step, trainer.max_steps) if compute is not None else None
        if seconds is None:
            return "?"
        return str(dt.timedelta(seconds=round(seconds)))

    def _gpu_hours_text(self, trainer: L.Trainer) -> str:
        compute = _compute(trainer)
        return f" gpu_hours={float(compute.total_gpu_hours):.4f}" if compute is not None else ""

    def _postfix(self, trainer: L.Trainer) -> str:
        f = self._figures(trainer)
        compute = _compute(trainer)
        uses = ""
        if compute is not None and getattr(compute, "fresh_seen", None) is not None:  # a replay buffer
            uses = f" uses={float(compute.mean_uses):.2f}"
        return (
            f"loss={f['loss']:.3f} wait={f['wait']:.0%} img/s={f['train_img_s']:.0f} "
            f"eta={self._eta(trainer)} top1={f['top1']:.2f}{uses}"
        )

    def _line(self, trainer: L.Trainer, step: int) -> None:
        f = self._figures(trainer)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        fields = [
            f"step={step}/{trainer.max_steps}",
            f"loss={f['loss']:.4f}",
            f"top1={f['top1']:.4f}",
            f"gen_img_s={f['gen_img_s']:.1f}",
            f"train_img_s={f['train_img_s']:.1f}",
            f"wait={f['wait']:.3f}",
            f"queue={f['queue']:.3f}",
            f"lr={f['lr']:.6g}",
            f"eta={self._eta(trainer)}",
        ]
        compute = _compute(trainer)
        if compute is not None and getattr(compute, "fresh_seen", None) is not None:  # a replay buffer
            fields.append(f"uses={float(compute.mean_uses):.2f}")
        gpu_hours = self._gpu_hours_text(trainer)
        print(stamp, " ".join(fields) + gpu_hours, file=self.stream, flush=True)
        self._last_line = (step, gpu_hours)


def _compute(trainer: L.Trainer):
    """The run's compute accounting (`streamgen.train.compute.ComputeMonitor`), if it has one."""
    return next((c for c in trainer.callbacks if hasattr(c, "total_gpu_hours")), None)


def gpu_devices(generator_devices: list[str], trainer_devices: list[int] | int) -> dict[str, int]:
    """NVML names -> CUDA indices of this node's GPUs: ``generator<g>`` and ``trainer<i>``."""
    named = {f"generator{g}": int(d.split(":")[1]) for g, d in enumerate(generator_devices) if d.startswith("cuda:")}
    if isinstance(trainer_devices, list):
        named.update({f"trainer{i}": int(d) for i, d in enumerate(trainer_devices)})
    return named
