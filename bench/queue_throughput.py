"""Throughput of the shared-memory stream vs torch.multiprocessing.Queue vs a plain memcpy.

    python bench/queue_throughput.py                    # 64 x 224 x 224 x 3 uint8 batches, 1/2/4 producers
    python bench/queue_throughput.py --batches 400 --producers 1 2 4 8

streamgen's path is the real one: the supervisor hands each producer process a job
(rank, slot, unit), the producer writes a batch into the slot (one copy, as a generator writes
its output) and commits; one consumer takes slots as zero-copy tensors and releases them.
The baseline producers put a freshly shared tensor of the same bytes on a
torch.multiprocessing.Queue (what a naive design does); memcpy is one process copying the
same bytes between buffers larger than the caches.
"""

import argparse
import os
import time

import torch
import torch.multiprocessing as tmp

from streamgen.config import GeneratorConfig
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, UnitCursor
from streamgen.stream.supervisor import SPAWN, Supervisor
from streamgen.stream.worker import WorkerSpec


def copy_worker(spec: WorkerSpec, conn, queues, stats) -> None:
    """A producer that 'generates' by copying a ready batch into its slot."""
    torch.set_num_threads(1)
    source = torch.randint(0, 256, (spec.unit_size, 3, spec.out_resolution, spec.out_resolution), dtype=torch.uint8)
    conn.send(("ready", 0.0))
    while (job := conn.recv()) is not None:
        rank, slot, unit = job
        view = queues[rank].view(slot)
        view.images.copy_(source)
        view.ids.fill_(unit)
        queues[rank].commit(slot)
        conn.send(("done", rank, unit))


def _consumer(queue, batches: int, result) -> None:
    """A trainer stand-in in its own process: take each slot as a tensor, release it."""
    for i in range(batches + 20):
        if i == 20:  # after warm-up
            start = time.perf_counter()
        slot = queue.get()
        queue.view(slot).images  # the zero-copy tensor a trainer would get
        queue.release(slot)
    result.put(batches / (time.perf_counter() - start))


def bench_streamgen(producers: int, batches: int, batch: int, res: int, slots: int) -> float:
    plan = SamplePlan(load_classes("imagenet100:10"), PromptTemplate.parse("c"))
    spec = WorkerSpec(0, 0, "cpu", 1, "fake", GeneratorConfig(batch_size=batch), plan, batch, res)
    sup = Supervisor(spec, ["cpu"] * producers, [UnitCursor(0, 1)], slots, worker=copy_worker, log=lambda m: None)
    result = SPAWN.SimpleQueue()
    with sup:
        while not sup.all_ready:
            sup.poll(0.1)
        consumer = SPAWN.Process(target=_consumer, args=(sup.queues[0], batches, result))
        consumer.start()
        while consumer.is_alive():
            sup.poll(0.5, extra=[consumer.sentinel])
        return result.get()


def _tmq_producer(q, received, n: int, batch: int, res: int) -> None:
    torch.set_num_threads(1)
    source = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8)
    for _ in range(n):
        t = torch.empty_like(source).share_memory_()  # fresh shared storage, as new data needs
        t.copy_(source)
        q.put(t)
    q.put(None)
    received.wait()  # a sender must outlive the receiver's rebuild of its tensors


def bench_torch_queue(producers: int, batches: int, batch: int, res: int) -> float:
    ctx = tmp.get_context("spawn")
    q, received = ctx.Queue(maxsize=8), ctx.Event()
    per = (batches + 20) // producers + 1
    procs = [ctx.Process(target=_tmq_producer, args=(q, received, per, batch, res)) for _ in range(producers)]
    for p in procs:
        p.start()
    got, finished, start = 0, 0, None
    while finished < producers:
        t = q.get()
        if t is None:
            finished += 1
            continue
        got += 1
        if got == 20:
            start, counted = time.perf_counter(), 0
        elif start is not None:
            counted += 1
        del t
    elapsed = time.perf_counter() - start
    received.set()
    for p in procs:
        p.join()
    return counted / elapsed


def bench_memcpy(batches: int, batch: int, res: int) -> float:
    nbytes = batch * 3 * res * res
    pool = max(2, (300 << 20) // nbytes)  # rotate over ~300 MB: no cache effects
    src = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8) for _ in range(pool)]
    dst = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(pool)]
    torch.set_num_threads(1)
    for i in range(pool):
        dst[i].copy_(src[i])
    start = time.perf_counter()
    for i in range(batches):
        dst[i % pool].copy_(src[(i + 1) % pool])
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--producers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    gb = args.batch * 3 * args.resolution**2 / 1e9
    memcpy = max(bench_memcpy(args.batches, args.batch, args.resolution) for _ in range(3))
    print(
        f"batch: {args.batch} x 3 x {args.resolution} x {args.resolution} uint8 = {gb * 1e3:.1f} MB; {os.cpu_count()} CPU cores"
    )
    print(f"memcpy (1 process, 1 thread): {memcpy:8.1f} batches/s {memcpy * gb:6.2f} GB/s")
    print(
        f"{'producers':>9} {'streamgen b/s':>14} {'GB/s':>6} {'% memcpy':>9} {'torch mp.Queue b/s':>19} {'GB/s':>6} {'speed-up':>9}"
    )
    for n in args.producers:
        ours = bench_streamgen(n, args.batches, args.batch, args.resolution, args.slots)
        theirs = bench_torch_queue(n, args.batches, args.batch, args.resolution)
        print(
            f"{n:>9} {ours:>14.1f} {ours * gb:>6.2f} {100 * ours / memcpy:>8.0f}% {theirs:>19.1f} {theirs * gb:>6.2f} {ours / theirs:>8.1f}x"
        )


if __name__ == "__main__":
    main()
