"""The body of one generator process: build a generator, then serve the supervisor's jobs.

`worker_main` takes jobs (rank, slot, unit) from the supervisor (`streamgen.stream.supervisor`),
makes the unit's images with its generator (`make_generator`: Stable Diffusion, or the built-in
``fake`` and ``shapes`` ones; a ``class_conditional`` generator is also handed each sample's
label), writes them with their labels and ids straight into the queue slot and commits.
`GeneratorStats` holds each generator's counters in shared memory for the dashboard;
`FaultInjection` is the testing hook that makes a generator fail on purpose.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from streamgen.config import GeneratorConfig
from streamgen.generate.diffusion import DiffusionGenerator
from streamgen.generate.fake import FAKE, FakeGenerator
from streamgen.generate.shapes import SHAPES, ShapesGenerator
from streamgen.plan.samples import SamplePlan, unit_ids
from streamgen.stream.queue import SharedBuffer, SlotQueue, avoid_named_semaphores

FAULT_ENV = "STREAMGEN_INJECT_FAULT"  # testing hook, see `FaultInjection`


def make_generator(cfg: GeneratorConfig, model: str, out_resolution: int, device: torch.device):
    if model == FAKE:
        return FakeGenerator(cfg, out_resolution, device)
    if model == SHAPES:
        return ShapesGenerator(cfg, out_resolution, device)
    return DiffusionGenerator(cfg, model, out_resolution, device)


class GeneratorStats:
    """Per-generator counters in shared memory; row g is written by generator g only."""

    FIELDS = ("images", "redraws", "busy_seconds", "units", "restarts")

    def __init__(self, generators: int) -> None:
        self.generators = generators
        self.buffer = SharedBuffer(8 * generators * len(self.FIELDS), "streamgen-stats")
        self._attach()

    def _attach(self) -> None:
        self.table = self.buffer.array(np.float64, (self.generators, len(self.FIELDS)), 0)

    def __getstate__(self) -> dict:
        return {"generators": self.generators, "buffer": self.buffer}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def add(self, g: int, field: str, value: float) -> None:
        self.table[g, self.FIELDS.index(field)] += value

    def total(self, field: str) -> float:
        return float(self.table[:, self.FIELDS.index(field)].sum())


@dataclass(frozen=True)
class FaultInjection:
    """A testing hook: ``STREAMGEN_INJECT_FAULT=kind:generator:after_units[:lives]``.

    Generator ``generator`` (``*``: every generator) fails while writing its unit number
    ``after_units`` (0-based: images written, slot not committed), in its first ``lives`` lives
    (default 1; restarts count lives). ``kind`` is ``raise`` (an exception in the loop),
    ``kill`` (SIGKILL to itself, mid-batch) or ``stop`` (SIGSTOP to itself: a hang, as a
    wedged CUDA context behaves, for the watchdog to find).
    """

    kind: str
    generator: int | None  # None: every generator
    after_units: int
    lives: int = 1

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        kind, generator, after, *lives = spec.split(":")
        which = None if generator == "*" else int(generator)
        return cls(kind, which, int(after), int(lives[0]) if lives else 1)

    def maybe_fail(self, generator: int, life: int, units_done: int) -> None:
        if self.generator not in (None, generator) or life >= self.lives or units_done != self.after_units:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return  # continued (SIGCONT) instead of killed: carry on as if nothing happened
        raise RuntimeError(f"injected fault in generator {generator} (life {life}, unit {units_done})")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a generator process needs; pickled into it at spawn."""

    index: int
    life: int  # 0 for the first start, +1 per restart
    device: str
    threads: int
    model: str
    cfg: GeneratorConfig
    plan: SamplePlan
    unit_size: int
    out_resolution: int


def worker_main(spec: WorkerSpec, conn, queues: list[SlotQueue], stats: GeneratorStats) -> None:
    """One generator process: build the model, then serve jobs until told to stop."""
    # The launcher owns shutdown: a Ctrl-C or a SIGTERM sent to the whole process group (a
    # terminal, GNU timeout, SLURM) is its to turn into a stop; it ends generators with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    avoid_named_semaphores()
    try:
        _serve(spec, conn, queues, stats)
    except (EOFError, BrokenPipeError):
        pass  # the supervisor is gone: nothing left to serve
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1)


def _serve(spec: WorkerSpec, conn, queues: list[SlotQueue], stats: GeneratorStats) -> None:
    started = time.monotonic()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for q in queues:
            q.pin_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    generator = make_generator(spec.cfg, spec.model, spec.out_resolution, device)
    generator.warmup()
    conn.send(("ready", time.monotonic() - started))
    fault = FaultInjection.from_env()
    units_done = 0
    while (job := conn.recv()) is not None:
        rank, slot, unit = job
        t0 = time.monotonic()
        view = queues[rank].view(slot)
        ids = unit_ids(unit, spec.unit_size)
        labels = spec.plan.labels(ids)
        prompts = spec.plan.prompts(ids, labels)
        seeds = spec.plan.noise_seeds(ids).tolist()
        redraws_before = generator.redraws
        # A class-conditional generator (--model shapes) draws from the label, SD from the prompt.
        conditioning = {"labels": labels} if getattr(generator, "class_conditional", False) else {}
        generator.generate_into(view.images, prompts, seeds, **conditioning)  # device -> pinned slot, async
        if fault is not None:
            fault.maybe_fail(spec.index, spec.life, units_done)
        view.labels.copy_(torch.from_numpy(labels))
        view.ids.copy_(torch.from_numpy(ids))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the slot is complete in memory
        queues[rank].commit(slot)
        units_done += 1
        stats.add(spec.index, "images", spec.unit_size)
        stats.add(spec.index, "units", 1)
        stats.add(spec.index, "redraws", generator.redraws - redraws_before)
        stats.add(spec.index, "busy_seconds", time.monotonic() - t0)
        conn.send(("done", rank, unit))
