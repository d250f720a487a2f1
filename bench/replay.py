"""Does ``--stream.reuse auto`` keep a trainer busy when generation is 10x slower than training?

Measures, side by side in one process on one device:

1. **in-memory**: the trainer's steps/s on batches already in memory (the upper bound: the
   trainer never waits), in rounds alternating with (2), so that a busy machine slows both alike;
2. **reuse auto**: the same trainer fed through a real `SlotQueue` and the real
   `streamgen.train.stream_data.ReplayDataModule` hand-off, by a producer thread that commits
   one unit every ``--slowdown`` (10) trainer step times: steps/s, the share of wall time
   spent waiting for data, and the fresh fraction;
3. the cost of **composing a batch from the buffer** (the draw and the gather, what replay adds
   to every step) against the step time.

    python bench/replay.py --threads 2                       # CPU, small settings
    python bench/replay.py --device cuda --arch resnet50 --batch 256 --resolution 256 --crop 224 \
        --buffer 16384 --steps 200

The target (issue 19): reuse auto at >= 90% of the in-memory steps/s.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision

from streamgen.stream.queue import FREE, Doorbell, SlotQueue
from streamgen.train.augment import train_augment
from streamgen.train.replay import AutoSchedule, ReplayBuffer, ReplaySettings
from streamgen.train.stream_data import ReplayDataModule


def make_step(args, device: torch.device):
    """One training step (forward, backward, SGD update) on a uint8 batch, as the trainer does it."""
    model = torchvision.models.get_model(args.arch, num_classes=100).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        x = train_augment(images, args.crop, 0.35).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), labels % 100)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def producer(queue: SlotQueue, period: list[float], stop: threading.Event) -> None:
    """A generator of ``period[0]`` seconds per unit (the bench keeps it at 10 in-memory step times,
    measured as it goes): the first at once, then one every period, in order."""
    unit, batch = 0, queue.unit_size
    last = -math.inf
    while not stop.is_set():
        while not stop.is_set() and time.perf_counter() < last + period[0]:
            stop.wait(0.01)  # the pace may change while waiting
        last = time.perf_counter()
        while queue.count(FREE) == 0 and not stop.is_set():
            stop.wait(0.01)
        if stop.is_set():
            return
        slot = queue.claim(0, unit)
        view = queue.view(slot)
        view.images.copy_(torch.randint(0, 256, view.images.shape, dtype=torch.uint8))
        view.labels.copy_(torch.arange(unit * batch, (unit + 1) * batch) % 100)
        view.ids.copy_(torch.arange(unit * batch, (unit + 1) * batch))
        queue.commit(slot)
        unit += 1


def side_by_side(args, device, step, tmp: Path) -> dict[str, float]:
    """In-memory and reuse-auto steps in alternating rounds, so that a busy machine slows both alike."""
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    for _ in range(args.warmup):
        step(images, labels)
    sync(device)
    times = []
    for _ in range(max(3, args.warmup)):
        t = time.perf_counter()
        step(images, labels)
        sync(device)
        times.append(time.perf_counter() - t)
    step_seconds = sorted(times)[len(times) // 2]  # the median sets the generator's pace

    queue = SlotQueue(3, args.batch, args.resolution, Doorbell())
    settings = ReplaySettings(reuse=None, capacity=args.buffer, max_steps=10**9, seed=0, on_device=True)
    data = ReplayDataModule(queue, settings, tmp / "replay", rank=0, world=1, run_meta={}, crop=args.crop)
    data.trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(root_device=device))
    data.setup("fit")
    data.augment = lambda images: images  # the step augments, as for the in-memory batches
    stop = threading.Event()
    period = [args.slowdown * step_seconds]
    thread = threading.Thread(target=producer, args=(queue, period, stop), daemon=True)
    thread.start()
    items = iter(data.train_dataloader().dataset)
    memory_s = replay_s = 0.0
    global_step = 0

    def replay_step() -> None:
        nonlocal global_step
        item = next(items)  # a unit in its slot (the buffer copies it to the device), or none
        data.trainer.global_step = global_step
        batch = data.on_after_batch_transfer(item, 0)
        step(batch["image"], batch["label"])
        global_step += 1

    try:
        replay_step()  # the first unit: the buffer is empty until it arrives
        sync(device)
        waited0, fresh0 = data.stream.wait_seconds, data.fresh_images
        for _ in range(-(-args.steps // args.round)):
            t = time.perf_counter()
            for _ in range(args.round):
                step(images, labels)
            sync(device)
            memory_s += time.perf_counter() - t
            period[0] = args.slowdown * (time.perf_counter() - t) / args.round  # the pace, as measured now
            t = time.perf_counter()
            for _ in range(args.round):
                replay_step()
            sync(device)
            replay_s += time.perf_counter() - t
    finally:
        stop.set()
        thread.join()
        data.teardown("fit")
    steps = -(-args.steps // args.round) * args.round
    return {
        "memory_steps_per_s": steps / memory_s,
        "steps_per_s": steps / replay_s,
        "wait_fraction": (data.stream.wait_seconds - waited0) / replay_s,
        "fresh_fraction": (data.fresh_images - fresh0) / (steps * args.batch),
        "steps": steps,
        "period": args.slowdown * memory_s / steps,
        "units": data.cursor.below,
    }


def composition_cost(args, device) -> float:
    """Seconds to draw one replay batch from a full buffer and gather it (what replay adds per step)."""
    buffer = ReplayBuffer(args.buffer, args.resolution, device)
    schedule = AutoSchedule(args.batch, 0, 0)
    units = args.buffer // args.batch
    for u in range(units):
        ids = torch.arange(u * args.batch, (u + 1) * args.batch)
        images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
        buffer.take(buffer.add(images, ids % 100, ids, 2**62, evict=True))
    times = []
    for i in range(args.warmup + 20):
        sync(device)
        started = time.perf_counter()
        taken = buffer.take(schedule.draw(buffer, i, fresh_unit=False).slots)
        taken["image"].sum()  # the gather has happened
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--crop", type=int, default=56)
    parser.add_argument("--buffer", type=int, default=1024, help="replay buffer, samples")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--round", type=int, default=5, help="steps of each source per alternating round")
    parser.add_argument("--slowdown", type=float, default=10.0, help="generator time per unit / trainer step time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    step = make_step(args, device)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        auto = side_by_side(args, device, step, Path(tmp))
    memory = auto["memory_steps_per_s"]
    compose = composition_cost(args, device)
    step_ms = 1000.0 / memory
    print(f"device {device}, {args.arch}, batch {args.batch} at {args.resolution} px (crop {args.crop}), "
          f"buffer {args.buffer}, generator {args.slowdown:g}x slower than the trainer, {auto['steps']} steps each, "
          f"alternating in rounds of {args.round}")  # fmt: skip
    print(f"in-memory source:  {memory:8.2f} steps/s ({step_ms:.1f} ms/step)")
    print(
        f"reuse auto:        {auto['steps_per_s']:8.2f} steps/s = {auto['steps_per_s'] / memory:.0%} of in-memory, "
        f"wait fraction {auto['wait_fraction']:.3f}, fresh fraction {auto['fresh_fraction']:.3f} "
        f"(the generator made a unit every {auto['period']:.2f} s on average, {auto['units']} in all, also during "
        "the in-memory rounds: about 2/slowdown of the replay steps' images are fresh)"
    )
    print(
        f"buffer batch:      {compose * 1000:8.2f} ms to draw and gather {args.batch} of {args.buffer} samples "
        f"= {compose * 1000 / step_ms:.1%} of a step"
    )
    if not math.isfinite(auto["steps_per_s"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
