"""Trainer-side images/s of the three sources, through the real data modules and augmentation.

    python bench/source.py                                   # 64 px images, batches of 64, resnet18
    python bench/source.py --resolution 128 --crop 112 --batch 128 --steps 40 --repeats 3

Each source feeds the same hand-off (`SourceDataModule.on_after_batch_transfer`: augmentation,
audit trail) and, in the second column, the same model step (ResNet forward, backward, SGD):

- memory: a uint8 tensor in RAM, each batch gathered by fancy indexing in the cache's epoch order
  (the ceiling: what a source costs when reading costs nothing);
- cache: `CacheDataModule` over memory-mapped shards of the same images (written by the build's
  shard writer; warm in the page cache, as a cache smaller than RAM is after its first epoch);
- stream: `StreamDataModule` fed by real generator processes (``--model fake``: no diffusion,
  so what is measured is the queue path, not the generator) through the supervisor, which a
  thread of this process polls as the launcher does.

Rounds alternate between the sources and the median is printed, with each source's ratio to
memory. On a shared machine the figures are noisy: compare columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from streamgen.cache.build import ShardWriter
from streamgen.cache.layout import Layout
from streamgen.cache.reader import epoch_order, rank_batches
from streamgen.config import GeneratorConfig
from streamgen.generate.fake import FAKE
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, UnitCursor
from streamgen.stream.supervisor import Supervisor
from streamgen.stream.worker import WorkerSpec
from streamgen.train.cache_data import CacheDataModule
from streamgen.train.source import SourceDataModule
from streamgen.train.stream_data import StreamDataModule

META = {"classes": "bench", "class_spec": "bench", "seed": 0, "unit_size": 0, "world": 1}


class MemoryDataModule(SourceDataModule):
    """The in-memory baseline: a RAM tensor read in the cache's epoch order, same hand-off."""

    def __init__(self, images: torch.Tensor, batch_size: int, **kw) -> None:
        super().__init__(0, 1, META, **kw)
        self.images, self.batch_size = images, batch_size
        self.labels = torch.arange(len(images)) % 10
        self.step = 0

    def train_dataloader(self):
        def batches():
            epoch = 0
            while True:
                for ids in rank_batches(epoch_order(0, epoch, len(self.images)), 0, 1, self.batch_size):
                    index = torch.from_numpy(ids)
                    yield {"image": self.images[index], "label": self.labels[index], "id": index}
                epoch += 1

        return batches()

    def _mark_consumed(self, batch) -> None:
        self.step += 1


def make_cache(folder: Path, images: np.ndarray, unit: int) -> Layout:
    layout = Layout(str(folder), len(images), unit, images.shape[-1], 4)
    writer = ShardWriter(layout)
    for u in range(layout.units):
        ids = np.arange(u * unit, (u + 1) * unit)
        writer.write(u, images[ids], ids % 10, ids)
    return layout


def make_model(arch: str):
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer


def measure(dm: SourceDataModule, steps: int, warmup: int, model=None) -> float:
    """Images/s handed over (and trained on, with ``model``) after ``warmup`` steps."""
    dm.trainer = SimpleNamespace(global_step=0)
    batches = iter(dm.train_dataloader())
    count = 0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = dm.on_after_batch_transfer(next(batches), 0)
        dm.trainer.global_step += 1
        if model is not None:
            net, optimizer = model
            loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if i >= warmup:
            count += len(batch["label"])
    return count / (time.perf_counter() - start)


class StreamSource:
    """Fake generators + supervisor (polled by a thread) + the rank's StreamDataModule."""

    def __init__(self, args, kw: dict) -> None:
        classes = load_classes("imagenet100:10")
        plan = SamplePlan(classes, PromptTemplate.parse("c"), 0)
        gen = GeneratorConfig(batch_size=args.batch)
        worker = WorkerSpec(0, 0, "cpu", 1, FAKE, gen, plan, args.batch, args.resolution)
        self.supervisor = Supervisor(worker, ["cpu"] * args.generators, [UnitCursor(0, 1)], args.generators + 2)
        self.supervisor.log = lambda message: None
        self.kw = kw
        self._dm: StreamDataModule | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.supervisor.poll(0.2)

    def __enter__(self) -> StreamSource:
        self.supervisor.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.supervisor.shutdown()

    def datamodule(self) -> StreamDataModule:
        """One data module for every measurement: its cursor goes on where the last one stopped."""
        if self._dm is None:
            self._dm = StreamDataModule(self.supervisor.queues[0], 0, 1, META, **self.kw)
        return self._dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="images in memory and in the cache")
    parser.add_argument("--resolution", type=int, default=64, help="side of the stored images")
    parser.add_argument("--crop", type=int, default=56, help="training crop")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (one unit)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the three sources (median shown)")
    parser.add_argument("--arch", default="resnet18", help="torchvision model for the 'with model step' column")
    parser.add_argument("--generators", type=int, default=1, help="fake generator processes for the stream")
    args = parser.parse_args()
    kw = {"crop": args.crop, "min_scale": 0.35}
    r = args.resolution
    pixels = np.random.default_rng(0).integers(0, 256, (args.images, 3, r, r), dtype=np.uint8)
    memory_images = torch.from_numpy(pixels)
    model = make_model(args.arch)
    results: dict[str, dict[str, list[float]]] = {s: {"source": [], "model": []} for s in ("memory", "cache", "stream")}
    with tempfile.TemporaryDirectory() as tmp, StreamSource(args, kw) as stream:
        layout = make_cache(Path(tmp), pixels, args.batch)
        sources = {
            "memory": lambda: MemoryDataModule(memory_images, args.batch, **kw),
            "cache": lambda: CacheDataModule(layout, 0, args.batch, rank=0, world=1, run_meta=META, **kw),
            "stream": stream.datamodule,
        }
        for _ in range(args.repeats):
            for name, make in sources.items():
                results[name]["source"].append(measure(make(), args.steps, args.warmup))
                results[name]["model"].append(measure(make(), max(args.steps // 3, 5), 1, model))
    print(
        f"images/s on the trainer side ({args.batch} x 3 x {r} x {r} uint8 batches, crop {args.crop}, "
        f"{args.arch}, {torch.get_num_threads()} threads, median of {args.repeats})"
    )
    print(f"{'source':8} {'hand-off only':>14} {'vs memory':>10} {'with model step':>16} {'vs memory':>10}")
    base = {col: statistics.median(results["memory"][col]) for col in ("source", "model")}
    for name, cols in results.items():
        hand_off, with_model = statistics.median(cols["source"]), statistics.median(cols["model"])
        print(
            f"{name:8} {hand_off:14.0f} {hand_off / base['source']:10.1%} "
            f"{with_model:16.1f} {with_model / base['model']:10.1%}"
        )


if __name__ == "__main__":
    main()
