from types import SimpleNamespace

import pytest
import torch

from streamgen.stream.queue import FREE, Doorbell, SlotQueue
from streamgen.train.stream_data import QueueStream, StreamDataModule, stream_state

META = {"classes": "abc", "class_spec": "imagenet100:10", "seed": 0, "unit_size": 4, "world": 2}


def filled_queue(units: list[int]) -> SlotQueue:
    q = SlotQueue(len(units), 4, 16, Doorbell())
    for unit in units:
        slot = q.claim(0, unit)
        view = q.view(slot)
        view.images.fill_(unit)
        view.labels.copy_(torch.tensor([0, 1, 2, 3]))
        view.ids.copy_(torch.arange(unit * 4, unit * 4 + 4))
        q.commit(slot)
    return q


def data_module(q: SlotQueue, tmp_path, rank: int = 1) -> StreamDataModule:
    dm = StreamDataModule(
        q, rank=rank, world=2, run_meta=META, crop=8, preview_every=1, consumed_log=tmp_path / "consumed.tsv"
    )
    dm.trainer = SimpleNamespace(global_step=7)
    return dm


def test_hand_off_augments_releases_the_slot_and_records_the_unit(tmp_path):
    q = filled_queue([3, 1])
    dm = data_module(q, tmp_path)
    batches = iter(QueueStream(q))
    first = next(batches)
    assert first["unit"] == 1 and first["image"].shape == (4, 3, 16, 16)
    out = dm.on_after_batch_transfer(first, 0)
    assert out["image"].shape == (4, 3, 8, 8) and out["image"].dtype == torch.float32
    assert out["preview"].shape == (4, 3, 16, 16) and out["preview"].unique().tolist() == [1]
    assert q.count(FREE) == 1  # released once augmented
    q.view(first["slot"]).labels.fill_(9)  # a generator reusing the slot must not touch the batch
    assert out["label"].tolist() == [0, 1, 2, 3] and out["id"].tolist() == [4, 5, 6, 7]
    dm.on_after_batch_transfer(next(batches), 0)
    dm.teardown("fit")
    assert dm.cursor.below == 2  # rank 1 of 2: units 1 and 3 are its k = 0 and 1
    assert (tmp_path / "consumed.tsv").read_text() == "7\t1\n7\t3\n"


def test_a_unit_handed_over_twice_is_an_error(tmp_path):
    q = filled_queue([1])
    dm = data_module(q, tmp_path)
    batch = next(iter(QueueStream(q)))
    dm.on_after_batch_transfer(dict(batch), 0)
    with pytest.raises(RuntimeError, match="unit 1 was consumed twice"):
        dm.on_after_batch_transfer(dict(batch), 0)


def test_validation_batches_pass_through(tmp_path):
    dm = data_module(filled_queue([1]), tmp_path)
    batch = (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    assert dm.on_after_batch_transfer(batch, 0) is batch


def test_stream_position_round_trips_through_a_checkpoint(tmp_path):
    dm = data_module(filled_queue([1]), tmp_path)
    for k in (0, 1, 3):
        dm.cursor.mark(k)
    state = dm.state_dict()
    checkpoint = {StreamDataModule.__qualname__: state, "state_dict": {}}
    assert stream_state(checkpoint)["classes"] == "abc"
    assert stream_state({"state_dict": {}}) is None
    other = data_module(filled_queue([1]), tmp_path)
    other.load_state_dict(state)
    assert other.cursor.below == 2 and other.cursor.done == {3}


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_the_trainer_page_locks_its_queue_slots_on_a_gpu(tmp_path, monkeypatch, device, pinned):
    q = filled_queue([1])
    calls = []
    monkeypatch.setattr(q, "pin_memory", lambda *a, **k: calls.append(1) or True)
    dm = data_module(q, tmp_path)
    dm.trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(root_device=torch.device(device)))
    dm.setup("fit")
    assert bool(calls) is pinned  # registration is per process: the generators' does not count here


@pytest.mark.gpu
def test_gpu_trainer_side_registration_succeeds(tmp_path):
    q = filled_queue([1])
    dm = data_module(q, tmp_path)
    dm.trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    dm.setup("fit")
    assert q._pinned
