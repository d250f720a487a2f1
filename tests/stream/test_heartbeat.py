"""The trainer watchdog's rules, on a clock the test moves; and the beats across a real spawn."""

import time

import pytest

from streamgen.stream.heartbeat import BEAT_HOOKS, Heartbeats, TrainerStalled, TrainerWatch
from streamgen.stream.supervisor import SPAWN


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def beat_at(beats: Heartbeats, rank: int, when: float, waiting: bool = False) -> None:
    beats.beat(rank, waiting)
    beats.table[rank, 0] = when  # the beat's time, as if made at ``when``


def test_a_rank_silent_longer_than_the_timeout_is_named():
    clock, beats = Clock(), Heartbeats(1)
    watch = TrainerWatch(beats, timeout=30, startup=600, first_rank=4, clock=clock)
    beat_at(beats, 0, clock.now)
    clock.now += 29
    watch.check()  # quiet for 29 s: fine
    clock.now += 2
    with pytest.raises(TrainerStalled, match=r"trainer rank 4 made no progress for 31 s \(no step") as stalled:
        watch.check()
    assert stalled.value.row == 0 and "--train.hang_timeout 30" in str(stalled.value)


def test_waiting_for_data_is_progress_but_a_rank_stopped_while_waiting_is_not():
    clock, beats = Clock(), Heartbeats(1)
    watch = TrainerWatch(beats, timeout=30, startup=600, clock=clock)
    for _ in range(100):  # slow generators: the rank waits, beating about once a second
        clock.now += 1
        beat_at(beats, 0, clock.now, waiting=True)
        watch.check()
    clock.now += 31  # then it is stopped
    with pytest.raises(TrainerStalled, match="it was waiting for data"):
        watch.check()


def test_a_starting_rank_gets_the_startup_allowance():
    clock, beats = Clock(), Heartbeats(2)
    watch = TrainerWatch(beats, timeout=30, startup=600, clock=clock)
    clock.now += 599
    watch.check()  # neither has stepped yet: loading, DDP set-up
    clock.now += 2
    with pytest.raises(TrainerStalled, match="made no progress for 601 s"):
        watch.check()


def test_ddp_ranks_waiting_in_a_collective_are_not_blamed_while_one_still_beats():
    clock, beats = Clock(), Heartbeats(2)
    watch = TrainerWatch(beats, timeout=30, startup=600, clock=clock)
    beat_at(beats, 0, clock.now)  # rank 0 entered a collective and waits there for rank 1
    for _ in range(60):  # rank 1 waits for its data, beating
        clock.now += 1
        beat_at(beats, 1, clock.now, waiting=True)
        watch.check()
    clock.now += 40  # now rank 1 is stopped too: rank 0's last beat is older, but it waited for rank 1
    with pytest.raises(TrainerStalled, match="trainer rank 1 made no progress for 40 s") as stalled:
        watch.check()
    assert stalled.value.row == 1


def test_of_ranks_stopped_in_a_step_the_one_silent_longest_is_named():
    clock, beats = Clock(), Heartbeats(3)
    watch = TrainerWatch(beats, timeout=30, startup=600, clock=clock)
    for rank, age in ((0, 40), (1, 55), (2, 35)):
        beat_at(beats, rank, clock.now - age)
    with pytest.raises(TrainerStalled, match="trainer rank 1 made no progress for 55 s"):
        watch.check()


def _beat_in_child(pulse) -> None:
    pulse.beat(waiting=True)


@pytest.mark.timeout(60)
def test_a_spawned_rank_beats_into_the_launchers_memory():
    beats = Heartbeats(2)
    before = time.monotonic()
    child = SPAWN.Process(target=_beat_in_child, args=(beats.pulse(1),))
    child.start()
    child.join(50)
    assert child.exitcode == 0
    last, waiting = beats.last(1)
    assert before < last <= time.monotonic() and waiting  # one clock for every process
    assert beats.last(0) == (None, False)
    assert set(beats.pulse(0).hooks()) == set(BEAT_HOOKS)
    beats.close()
