import multiprocessing as mp
import os
import pickle
import time

import pytest
import torch

from streamgen.stream.queue import FILLED, FREE, READING, WRITING, Doorbell, OwnerDied, SlotQueue, StreamClosed

SPAWN = mp.get_context("spawn")


def make_queue(slots=3, unit=4, res=8) -> SlotQueue:
    return SlotQueue(slots, unit, res, Doorbell())


def test_slot_life_cycle_and_lowest_unit_first():
    q = make_queue()
    a, b, c = q.claim(0, unit=7), q.claim(1, unit=5), q.claim(0, unit=9)
    assert q.claim(1, unit=11) is None  # full: the supervisor waits
    assert q.count(WRITING) == 3
    for slot in (a, c, b):
        q.commit(slot)
    assert q.count(FILLED) == 3
    got = [q.get(poll=0.01) for _ in range(3)]
    assert [q.unit(s) for s in got] == [5, 7, 9]
    assert q.count(READING) == 3
    for s in got:
        q.release(s)
    assert q.count(FREE) == 3 and q.freed.wait(0)


def test_in_order_get_waits_for_the_expected_unit():
    q = make_queue()
    late, early = q.claim(0, unit=6), q.claim(1, unit=5)
    q.commit(late)  # unit 6 arrives first
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _get_within(q, unit=5, seconds=0.3)  # ...but the consumer waits for 5
    assert time.monotonic() - started >= 0.3 and q.count(FILLED) == 1
    q.commit(early)
    assert q.unit(q.get(poll=0.01, unit=5)) == 5
    assert q.unit(q.get(poll=0.01, unit=6)) == 6
    assert q.count(READING) == 2


def _get_within(q: SlotQueue, unit: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds

    def alive() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError

    return q.get(poll=0.05, alive=alive, unit=unit)


def test_reclaim_frees_only_uncommitted_slots():
    q = make_queue()
    slot = q.claim(0, unit=3)
    assert q.reclaim(slot, 3) and q.count(FREE) == 3
    slot = q.claim(0, unit=4)
    q.commit(slot)
    assert not q.reclaim(slot, 4)  # delivered: must not be made again


def test_closed_queue_raises_with_the_reason():
    q = make_queue()
    q.close("generator 0 failed: Traceback ... boom")
    with pytest.raises(StreamClosed, match="boom"):
        q.get(poll=0.01)


def test_views_are_zero_copy_over_the_slot():
    q = make_queue()
    v = q.view(1)
    v.images.fill_(3)
    assert q.view(1).images.data_ptr() == v.images.data_ptr()
    assert q.view(1).images.sum().item() == 3 * v.images.numel()
    assert v.images.shape == (4, 3, 8, 8) and v.labels.shape == (4,) and v.ids.dtype == torch.int64


def test_handles_pass_only_at_spawn():
    with pytest.raises(RuntimeError, match="only be handed to a process when it is spawned"):
        pickle.dumps(make_queue())


def _produce(q: SlotQueue, slot: int, unit: int) -> None:
    v = q.view(slot)
    v.images.fill_(unit)
    v.ids.copy_(torch.arange(unit * 4, unit * 4 + 4))
    q.commit(slot)


@pytest.mark.timeout(60)
def test_a_child_process_writes_what_the_parent_reads():
    q = make_queue()
    slot = q.claim(0, unit=6)
    p = SPAWN.Process(target=_produce, args=(q, slot, 6))
    p.start()
    got = q.get(poll=0.1)  # blocks on the doorbell until the child commits
    p.join(30)
    assert got == slot and q.view(got).images.unique().tolist() == [6]
    assert q.view(got).ids.tolist() == [24, 25, 26, 27]


def _orphan_consumer(q: SlotQueue, result_path: str) -> None:
    try:
        q.get(poll=0.1)
        outcome = "got a slot"
    except OwnerDied as e:
        outcome = f"OwnerDied: {e}"
    with open(result_path, "w") as f:
        f.write(outcome)


def _owner_that_dies(result_path: str) -> None:
    q = make_queue()  # this process owns the queue
    SPAWN.Process(target=_orphan_consumer, args=(q, result_path)).start()
    time.sleep(2)  # let the consumer block on the empty queue
    os._exit(0)  # die without closing anything


@pytest.mark.timeout(60)
def test_a_consumer_whose_owner_died_raises_instead_of_hanging(tmp_path):
    result = tmp_path / "result.txt"
    owner = SPAWN.Process(target=_owner_that_dies, args=(str(result),))
    owner.start()
    owner.join(30)
    deadline = time.monotonic() + 30
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.read_text().startswith("OwnerDied: the launcher")


def test_a_failed_page_lock_is_said_once_per_process_with_cudas_error(monkeypatch):
    import streamgen.stream.queue as queue_module

    class RefusingCudart:
        def cudaHostRegister(self, pointer, size, flags):
            return 2  # cudaErrorMemoryAllocation

        def cudaGetErrorString(self, error):
            return "out of memory"

    monkeypatch.setattr(queue_module, "_pin_failure_said", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: RefusingCudart())
    said: list[str] = []
    assert make_queue().pin_memory(said.append) is False
    assert make_queue().pin_memory(said.append) is False  # a second queue of the same process
    assert len(said) == 1
    assert "cudaHostRegister error 2: out of memory" in said[0] and "ulimit -l" in said[0]


@pytest.mark.gpu
def test_pinned_slots_copy_to_the_gpu():
    q = make_queue()
    q.pin_memory()
    assert q._pinned
    view = q.view(1)
    view.images.fill_(7)
    on_gpu = view.images.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert on_gpu.float().mean().item() == 7


def _in_order_consumer(queue: SlotQueue, units: int, results) -> None:
    """A trainer stand-in that takes units 0, 1, 2, ... whatever order they arrive in."""
    got = []
    for unit in range(units):
        slot = queue.get(poll=0.2, unit=unit)
        got.append((queue.unit(slot), queue.view(slot).ids.tolist()))
        queue.release(slot)
    results.put(got)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["kill:0:1", "raise:1:2"])
def test_in_order_consumption_survives_a_crashed_generator(monkeypatch, fault):
    """A crash leaves a hole in the unit order (later units fill the other slots); the
    consumer waits for the hole and the stream must not deadlock: the reclaimed unit is the
    supervisor's next claim on the freed slot."""
    from test_supervisor import UNIT, run_until, supervisor

    from streamgen.plan.samples import unit_ids
    from streamgen.stream.worker import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, fault)
    results = SPAWN.Queue()
    with supervisor(generators=3, slots=2, restart_backoff=0.5) as sup:
        # Every generator ready first: the fake units are so fast that 60 of them could all be
        # made before a slow-starting generator 1 takes its third, and the fault would never fire.
        run_until(sup, lambda: sup.all_ready, 90)
        consumer = SPAWN.Process(target=_in_order_consumer, args=(sup.queues[0], 60, results))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 150)
        got = results.get(timeout=10)
        # the fault did happen (its generator's exit is noticed at a later poll than the stream)
        run_until(sup, lambda: sup.stats.total("restarts") == 1, 60)
    assert [u for u, _ in got] == list(range(60))
    assert all(ids == unit_ids(u, UNIT).tolist() for u, ids in got)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_two_runs_of_one_config_consume_the_same_units_at_the_same_steps(train_run, tmp_path):
    """The default order: each rank takes its units in increasing order whatever order its two
    generators finish them in, so the runs see the same samples at the same steps, even when
    a generator crashes in one of them and its unit is made again late (in arrival order the
    trainer, starved, would take the next unit first)."""
    from conftest import read_consumed, read_scalars

    from streamgen.stream.worker import FAULT_ENV

    args = ("--model", "fake", "--generators", "2", "--train.max_steps", "8", "--train.log_every", "1")
    first = train_run(*args, "--name", "a")
    assert first.wait(240) == 0, first.output[-2000:]
    second = train_run(*args, "--name", "b", "--stream.restart_backoff", "0.5", env={FAULT_ENV: "kill:0:2"})
    assert second.wait(240) == 0, second.output[-2000:]
    assert "generator 0 (cpu) died" in second.output
    a, b = (tmp_path / "runs" / name / "version_0" for name in "ab")
    assert read_consumed(a) == read_consumed(b) == [(step, step) for step in range(8)]
    loss_a, loss_b = read_scalars(a)["train/loss"], read_scalars(b)["train/loss"]
    assert [s for s, _ in loss_a] == [s for s, _ in loss_b] == list(range(1, 9))
    assert [v for _, v in loss_a] == pytest.approx([v for _, v in loss_b], rel=1e-5)
