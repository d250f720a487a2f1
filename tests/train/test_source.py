"""The source seam: stream or cache chosen in one place; the cache's reader, epochs and position."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

from streamgen.cache.build import ShardWriter
from streamgen.cache.layout import Layout
from streamgen.cache.reader import CacheReader, epoch_order
from streamgen.plan.samples import unit_ids
from streamgen.train.cache_data import CacheDataModule, consumed_ids

META = {"classes": "abc", "class_spec": "imagenet100:10", "seed": 0, "unit_size": 4, "world": 2}


def unit_pixels(unit: int, size: int, resolution: int) -> np.ndarray:
    return np.random.default_rng(unit).integers(0, 256, (size, 3, resolution, resolution), dtype=np.uint8)


def write_cache(folder: Path, images: int, unit_size: int = 4, resolution: int = 8, shard_units: int = 3) -> Layout:
    """A cache written by the build's shard writer, units in a scrambled order, without generators."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = Layout(str(folder), images, unit_size, resolution, shard_units)
    writer = ShardWriter(layout)
    for unit in np.random.default_rng(0).permutation(layout.units).tolist():
        ids = unit_ids(unit, unit_size)
        writer.write(unit, unit_pixels(unit, unit_size, resolution), ids % 10, ids)
    assert layout.missing() == [] and not list(folder.glob(".shard-*"))
    return layout


def test_the_reader_gathers_any_samples_in_the_order_asked(tmp_path):
    layout = write_cache(tmp_path / "cache", 40)
    reader = CacheReader(layout)
    ids = np.array([39, 0, 17, 17, 5, 12, 38])
    images, labels, got_ids = reader.gather(ids)
    # the oracle: each sample's bytes read straight from its shard file at its documented offset
    for row, i in enumerate(ids.tolist()):
        shard, k = divmod(i, layout.shard_size)
        n = layout.shard_images(shard)
        raw = np.fromfile(layout.shard_path(shard), np.uint8, layout.image_bytes, offset=k * layout.image_bytes)
        assert np.array_equal(images[row].numpy().ravel(), raw)
        assert np.array_equal(raw, unit_pixels(i // 4, 4, 8)[i % 4].ravel())
        assert np.fromfile(layout.shard_path(shard), np.int64, 1, offset=n * (layout.image_bytes + 8) + 8 * k)[0] == i
    assert got_ids.tolist() == ids.tolist() and labels.tolist() == (ids % 10).tolist()


def test_an_epoch_is_a_seeded_permutation_split_between_ranks(tmp_path):
    layout = write_cache(tmp_path / "cache", 44)  # 44 = 2 ranks x 5 batches x 4 + 4 left over
    ranks = [CacheDataModule(layout, 7, 4, rank=r, world=2, run_meta=META, crop=8) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 5
    for epoch in (0, 1):
        batches = [dm.epoch_batches(epoch) for dm in ranks]
        seen = np.concatenate([b.ravel() for b in batches])
        assert len(seen) == len(set(seen.tolist())) == 40  # disjoint; the 4 past whole batches wait
        order = epoch_order(7, epoch, 44)
        assert sorted(order.tolist()) == list(range(44))
        assert batches[1][0].tolist() == order[1:8:2].tolist()  # rank 1: positions 1, 3, 5, 7
    assert not np.array_equal(epoch_order(7, 0, 44), epoch_order(7, 1, 44))  # reshuffled each epoch
    assert np.array_equal(epoch_order(7, 0, 44), epoch_order(7, 0, 44))
    assert not np.array_equal(epoch_order(7, 0, 44), epoch_order(8, 0, 44))  # fixed by the seed


def data_module(layout: Layout, tmp_path: Path, rank: int = 0, log: str = "consumed.tsv") -> CacheDataModule:
    dm = CacheDataModule(
        layout, 3, 4, rank=rank, world=2, run_meta=META, crop=8, preview_every=10, consumed_log=tmp_path / log
    )
    dm.trainer = SimpleNamespace(global_step=0)
    return dm


def hand_over(dm: CacheDataModule, batches, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        out.append(dm.on_after_batch_transfer(next(batches), 0))
        dm.trainer.global_step += 1
    return out


def test_the_cache_hand_off_augments_audits_and_resumes_at_the_same_batch(tmp_path):
    layout = write_cache(tmp_path / "cache", 40)  # 5 batches per rank per epoch
    whole = data_module(layout, tmp_path, log="whole.tsv")
    seen = []
    whole.augment = lambda images: seen.append(images) or images.float()  # the one augmentation callable
    batches = iter(whole.train_dataloader())
    outs = hand_over(whole, batches, 12)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (4, 3, 8, 8)
    assert "preview" in outs[0] and "preview" not in outs[5]  # every preview_every steps
    assert (whole.epoch, whole.batches) == (2, 2)
    whole.teardown("fit")
    rows = consumed_ids(tmp_path / "whole.tsv")
    assert [(s, e, b) for s, e, b, _ in rows] == [(s, s // 5, s % 5) for s in range(12)]
    for epoch in (0, 1):  # rank 0's share of each epoch: no sample twice
        ids = [i for _, e, _, batch in rows for i in batch if e == epoch]
        assert len(ids) == len(set(ids)) == 20

    first = data_module(layout, tmp_path, log="first.tsv")
    hand_over(first, iter(first.train_dataloader()), 7)  # stop mid-epoch 1
    state = first.state_dict()
    assert state["format"] == "streamgen-cache/1" and state["positions"] == [{"rank": 0, "epoch": 1, "batches": 2}]
    second = data_module(layout, tmp_path, log="second.tsv")
    second.trainer.global_step = 7
    second.load_state_dict(state)  # Lightning restores it before iterating
    resumed = hand_over(second, iter(second.train_dataloader()), 5)
    for a, b in zip(resumed, outs[7:]):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["label"], b["label"])
    first.teardown("fit")
    second.teardown("fit")
    assert consumed_ids(tmp_path / "first.tsv") + consumed_ids(tmp_path / "second.tsv") == rows


def test_a_batch_out_of_turn_is_an_error(tmp_path):
    dm = data_module(write_cache(tmp_path / "cache", 40), tmp_path)
    batch = next(iter(dm.train_dataloader()))
    dm.on_after_batch_transfer(dict(batch), 0)
    with pytest.raises(RuntimeError, match="out of turn"):
        dm.on_after_batch_transfer(dict(batch), 0)


def test_the_source_is_chosen_in_one_place(tmp_path):
    from streamgen.config import parse_config
    from streamgen.launch.checks import prepare
    from streamgen.train.datamodule import make_datamodule
    from streamgen.train.stream_data import StreamDataModule

    base = ["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--model", "fake"]
    stream = make_datamodule(prepare(parse_config(base)).source_spec(), 0, tmp_path)
    assert type(stream) is StreamDataModule
    cache_args = [
        "--source",
        "cache",
        "--cache.images",
        "40",
        "--cache.dir",
        str(tmp_path / "c"),
        "--train.epochs",
        "3",
    ]
    job = prepare(parse_config([*base, *cache_args]))
    assert job.steps_per_epoch == 5 and job.cfg.train.max_steps == 15  # 40 images / batches of 8
    cache = make_datamodule(job.source_spec(), 0, tmp_path)
    assert type(cache) is CacheDataModule and cache.layout.images == 40
    assert not (tmp_path / "c").exists()  # the checks create nothing


def _gather_rank(rank: int, store_path: str, out) -> None:
    import torch.distributed as dist

    from streamgen.train.source import gather_json

    dist.init_process_group("gloo", rank=rank, world_size=2, store=dist.FileStore(store_path, 2))
    try:
        mine = {"rank": rank, "done": list(range(rank * 40)), "text": "é" * rank}  # lengths differ by rank
        out.put((rank, gather_json(mine, 2)))
    finally:
        dist.destroy_process_group()


@pytest.mark.long  # two spawned ranks; the 2-rank cache and 2-node runs exercise the same gather end to end
@pytest.mark.timeout(180)
def test_positions_are_gathered_by_tensor_collectives_as_json(tmp_path):
    """Every rank gets every rank's position, through all_gather of JSON bytes (never pickle)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_rank, args=(r, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=150) for _ in procs)
    for p in procs:
        p.join(30)
    want = [{"rank": r, "done": list(range(r * 40)), "text": "é" * r} for r in (0, 1)]
    assert results == {0: want, 1: want}
