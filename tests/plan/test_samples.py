import numpy as np
import pytest

from streamgen.errors import UsageError
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, UnitCursor, load_class_counts, rank_unit, redraw_seed, unit_ids
from streamgen.stream.supervisor import RankLedger


@pytest.fixture(scope="module")
def classes():
    return load_classes("imagenet100")


def plan_for(classes, seed=0, template="c_hc_b", counts=None):
    return SamplePlan(classes, PromptTemplate.parse(template), seed=seed, counts=counts)


def test_plan_is_a_pure_function_of_seed_and_id(classes):
    ids = np.arange(0, 5000, 7)
    a, b = plan_for(classes), plan_for(classes)
    assert a.samples(ids) == b.samples(ids)
    # evaluated in any order or chunking, an id gets the same sample
    shuffled = np.random.default_rng(0).permutation(ids)
    by_id = {s.id: s for s in plan_for(classes).samples(shuffled)}
    assert [by_id[i] for i in ids.tolist()] == a.samples(ids)
    other = plan_for(classes, seed=1).samples(ids)
    assert [s.label for s in other] != [s.label for s in a.samples(ids)]


def test_each_block_holds_every_class_once(classes):
    plan = plan_for(classes)
    for block in range(3):
        labels = plan.labels(np.arange(block * 100, (block + 1) * 100))
        assert sorted(labels.tolist()) == list(range(100))
    assert plan.labels(np.arange(100)).tolist() != plan.labels(np.arange(100, 200)).tolist()


def test_weighted_blocks_follow_the_counts(classes, tmp_path):
    small = load_classes("imagenet100:3")
    path = tmp_path / "counts.txt"
    path.write_text("".join(f"{k} {n}\n" for k, n in zip(small.keys, (5, 1, 2))))
    counts = load_class_counts(path, small)
    plan = plan_for(small, template="c", counts=counts)
    assert plan.block_size == 8
    labels = plan.labels(np.arange(80))
    assert np.bincount(labels).tolist() == [50, 10, 20]
    for block in range(10):
        assert np.bincount(labels[block * 8 : (block + 1) * 8]).tolist() == [5, 1, 2]


def test_bad_counts_file(classes, tmp_path):
    small = load_classes("imagenet100:2")
    path = tmp_path / "counts.txt"
    path.write_text(f"{small.keys[0]} 3\n")
    with pytest.raises(UsageError, match="no count for"):
        load_class_counts(path, small)
    path.write_text(f"{small.keys[0]} three\n")
    with pytest.raises(UsageError, match="expected 'class count'"):
        load_class_counts(path, small)


def test_noise_seeds_and_scenes(classes):
    plan = plan_for(classes)
    seeds = plan.noise_seeds(np.arange(10000))
    assert len(set(seeds.tolist())) == 10000 and (seeds >= 0).all()
    scenes = plan.scenes(np.arange(10000))
    assert scenes.min() >= 0 and scenes.max() < 365 and len(set(scenes.tolist())) > 300
    assert redraw_seed(5, 1) != redraw_seed(5, 2) != 5
    assert all(" inside " in p for p in plan.prompts(np.arange(10)))
    assert all(" inside " not in p for p in plan_for(classes, template="c_hc").prompts(np.arange(10)))


@pytest.mark.parametrize("nodes, ranks_per_node", [(1, 1), (1, 4), (2, 3)])
def test_units_split_across_ranks_and_nodes_with_no_overlap_and_no_gap(nodes, ranks_per_node):
    world = nodes * ranks_per_node
    unit_size = 16
    seen = []
    for node in range(nodes):
        for local in range(ranks_per_node):
            rank = node * ranks_per_node + local
            for k in range(50):
                seen.extend(unit_ids(rank_unit(rank, world, k), unit_size).tolist())
    assert sorted(seen) == list(range(50 * world * unit_size))


def test_generators_take_disjoint_units_from_the_ledger():
    ledger = RankLedger(UnitCursor(rank=1, world=2))
    taken = {g: [] for g in range(3)}
    for step in range(30):
        taken[step % 3].append(ledger.take())
    ledger.give_back(taken[0][-1])  # a generator died before delivering it
    redo = ledger.take()
    assert redo == taken[0][-1]
    flat = [u for units in taken.values() for u in units]
    assert len(set(flat)) == len(flat) == 30
    assert sorted(flat) == [rank_unit(1, 2, k) for k in range(30)]


def test_cursor_marks_each_unit_once_and_resumes_the_rest():
    cursor = UnitCursor(rank=0, world=1)
    for k in (0, 1, 3, 4):
        cursor.mark(k)
    assert cursor.below == 2 and cursor.done == {3, 4}
    with pytest.raises(RuntimeError, match="consumed twice"):
        cursor.mark(3)
    restored = UnitCursor.from_state_dict(cursor.state_dict())
    pending = restored.pending()
    assert [next(pending) for _ in range(4)] == [2, 5, 6, 7]


@pytest.mark.parametrize("counts", [None, "weighted"])
def test_every_class_meets_every_scene_once_per_cycle(counts):
    """The paper renders every (class, scene) pair: one cycle gives each class all 365 scenes once."""
    classes = load_classes("imagenet100:12")
    weights = None if counts is None else np.arange(1, len(classes) + 1)
    plan = SamplePlan(classes, PromptTemplate.parse("c_hc_b"), seed=5, counts=weights)
    per_class = plan.block_size // len(classes) if weights is None else weights
    ids = np.arange(365 * plan.block_size)  # exactly 365 x counts[c] samples of each class c
    labels, scenes = plan.labels(ids), plan.scenes(ids)
    for label in range(len(classes)):
        mine = scenes[labels == label]
        times = per_class if weights is None else int(weights[label])
        assert np.array_equal(np.bincount(mine, minlength=365), np.full(365, times))
        first = mine[:365]  # before any scene repeats, the first 365 samples meet them all
        assert len(set(first.tolist())) == 365


def test_scenes_do_not_depend_on_how_ids_are_batched(classes):
    plan = SamplePlan(classes, PromptTemplate.parse("c_hc_b"), seed=2)
    ids = np.arange(5000)
    whole = plan.scenes(ids)
    other = SamplePlan(classes, PromptTemplate.parse("c_hc_b"), seed=2)  # a fresh process's view
    pieces = np.concatenate([other.scenes(chunk) for chunk in np.array_split(ids[::-1], 37)])[::-1]
    assert np.array_equal(whole, pieces)
    assert not np.array_equal(whole, SamplePlan(classes, PromptTemplate.parse("c_hc_b"), seed=3).scenes(ids))


def test_class_counts_from_a_real_imagefolder_tree(classes, tmp_path):
    root = tmp_path / "train"
    for i, key in enumerate(classes.keys):
        (root / key).mkdir(parents=True)
        for j in range(i + 1):
            (root / key / f"{j}.JPEG").write_bytes(b"")  # counted by name: files are not opened
        (root / key / "notes.txt").write_text("not an image")
    counts = load_class_counts(root, classes)
    assert counts.tolist() == list(range(1, len(classes) + 1))
    (root / classes.keys[0] / "0.JPEG").unlink()
    with pytest.raises(UsageError, match=f"{classes.keys[0]} has none"):
        load_class_counts(root, classes)
