"""The sample plan: a pure function of (run seed, sample id).

Every sample has an integer id ``i >= 0``. The plan maps ``(seed, i)`` to the sample's class
(label), its Places scene (for templates with ``{b}``) and its initial-noise seed; nothing else
decides what sample ``i`` is, so the stream is the same whatever the number of generators,
trainers, nodes or the batch size.

- Class balance: each block of C consecutive ids holds every class exactly once, in an order
  drawn from (seed, block). With per-class counts (to mirror a real dataset's imbalance) a
  block holds class c exactly ``counts[c]`` times.
- Scenes: the paper renders every (class, scene) pair, so a class's samples walk through the
  365 Places scenes in a seeded cycle: the j-th sample of class c gets scene
  ``perm(seed, c, j // 365)[j % 365]``. Every class meets every scene once before any scene
  repeats for it, and 1x ImageNet-100 (1300 per class) covers every pair.
- Randomness is a counter-based hash (splitmix64) of (seed, stream, id), so it is stable across
  numpy/torch versions and can be evaluated for any id without replaying a generator.

Units and ranks: ids are grouped into units of ``unit_size`` consecutive ids (one trainer batch,
one queue slot); trainer rank r of a world of T ranks owns units ``u = r + k*T`` (k = 0, 1, ...),
so ranks (and the nodes that hold them) never overlap and leave no gap. `UnitCursor` records
which of a rank's units have been consumed, for exact resume.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamgen.errors import UsageError
from streamgen.plan.classes import ClassSet
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.scenes import places365_scenes

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# One stream per purpose, so that e.g. the class order and the noise seeds are independent.
_CLASS_ORDER, _NOISE, _SCENE, _REDRAW = 1, 2, 3, 4
SEED_MASK = (1 << 63) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_ids(*parts: int | np.ndarray) -> np.ndarray:
    """Hash integers (scalars or arrays, broadcast) to uint64, one splitmix64 round per part."""
    with np.errstate(over="ignore"):
        h = np.zeros(1, dtype=np.uint64)
        for part in parts:
            h = _splitmix64(h ^ np.asarray(part).astype(np.uint64))
    return h


def redraw_seed(seed: int, attempt: int) -> int:
    """The noise seed for the ``attempt``-th redraw of a sample whose image came out bad."""
    return int(hash_ids(_REDRAW, seed, attempt)[0] & np.uint64(SEED_MASK))


def count_images_per_class(root: Path) -> dict[str, int]:
    """Images in each class sub-folder of an ImageFolder tree (e.g. the real ImageNet train set)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    counts = {}
    for entry in os.scandir(root):
        if entry.is_dir():
            counts[entry.name] = sum(
                1 for f in os.scandir(entry.path) if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS)
            )
    return counts


def load_class_counts(path: str | Path, classes: ClassSet) -> np.ndarray:
    """Per-class sample counts: from a ``key count`` text or CSV file (one class per line), or
    counted in a real dataset's ImageFolder tree (one sub-folder of images per class key)."""
    path = Path(path)
    if path.is_dir():
        counts = count_images_per_class(path)
        return _counts_for(classes, counts, f"class counts folder {path}")
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"class counts file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"class counts file {path} is not a text file (it is not UTF-8)") from None
    counts: dict[str, int] = {}
    delimiter = "," if path.suffix == ".csv" else " "
    try:  # strict: an unterminated quote is an error, not a class name
        rows = list(csv.reader(text.splitlines(), delimiter=delimiter, skipinitialspace=True, strict=True))
    except csv.Error as e:
        raise UsageError(f"class counts file {path}: cannot parse it ({e})") from None
    for lineno, row in enumerate(rows, 1):
        row = [r for r in row if r]
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2 or not row[1].isdigit():
            raise UsageError(f"{path}:{lineno}: expected 'class count', got {' '.join(row)!r}")
        counts[row[0]] = int(row[1])
    return _counts_for(classes, counts, f"class counts file {path}")


def _counts_for(classes: ClassSet, counts: dict[str, int], source: str) -> np.ndarray:
    missing = [k for k in classes.keys if k not in counts]
    if missing:
        raise UsageError(f"{source} has no count for {missing[0]} (and {len(missing) - 1} more)")
    result = np.array([counts[k] for k in classes.keys], dtype=np.int64)
    if (result <= 0).any():
        empty = classes.keys[int(np.flatnonzero(result <= 0)[0])]
        raise UsageError(f"{source}: every class needs a count >= 1 ({empty} has none)")
    return result


@dataclass(frozen=True)
class Sample:
    id: int
    label: int
    key: str  # WordNet id or custom class name
    prompt: str
    seed: int  # initial-noise seed


class SamplePlan:
    """(seed, id) -> label, scene, noise seed and prompt; vectorised over id arrays."""

    def __init__(
        self,
        classes: ClassSet,
        template: PromptTemplate,
        seed: int = 0,
        counts: np.ndarray | None = None,
    ) -> None:
        template.check_classes(classes)
        self.classes = classes
        self.template = template
        self.seed = int(seed)
        counts = np.ones(len(classes), dtype=np.int64) if counts is None else np.asarray(counts)
        # A block is the multiset of labels (class c repeated counts[c] times) in a seeded order.
        self._counts = counts.astype(np.int64)
        self._pool = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._scene_cycles: dict[tuple[int, int], np.ndarray] = {}

    @property
    def block_size(self) -> int:
        return len(self._pool)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """A block's labels by position, and each position's rank among its class in the block."""
        cached = self._block_cache.get(block)
        if cached is None:
            keys = hash_ids(_CLASS_ORDER, self.seed, block, np.arange(self.block_size))
            order = self._pool[np.argsort(keys, kind="stable")]
            by_class = np.argsort(order, kind="stable")
            first_of_class = np.searchsorted(order[by_class], order[by_class], side="left")
            rank = np.empty_like(order)
            rank[by_class] = np.arange(len(order)) - first_of_class
            if len(self._block_cache) >= 4:  # generators walk blocks forward: keep a few
                self._block_cache.pop(next(iter(self._block_cache)))
            cached = self._block_cache[block] = (order, rank)
        return cached

    def _block_order(self, block: int) -> np.ndarray:
        return self._block(block)[0]

    def labels(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        return self._labels_and_occurrences(ids)[0]

    def _labels_and_occurrences(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's label, and how many earlier ids have that label (its occurrence index)."""
        ids = np.asarray(ids, dtype=np.int64)
        blocks, positions = np.divmod(ids, self.block_size)
        labels = np.empty(ids.shape, dtype=np.int64)
        occurrences = np.empty(ids.shape, dtype=np.int64)
        for block in np.unique(blocks):
            mask = blocks == block
            order, rank = self._block(int(block))
            labels[mask] = order[positions[mask]]
            occurrences[mask] = block * self._counts[labels[mask]] + rank[positions[mask]]
        return labels, occurrences

    def noise_seeds(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return (hash_ids(_NOISE, self.seed, ids) & np.uint64(SEED_MASK)).astype(np.int64)

    def scenes(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Index into `places365_scenes()` of each sample's background (see the module docstring)."""
        labels, occurrences = self._labels_and_occurrences(ids)
        n_scenes = len(places365_scenes())
        cycles, positions = np.divmod(occurrences, n_scenes)
        out = np.empty(labels.shape, dtype=np.int64)
        for label, cycle in {(int(a), int(b)) for a, b in zip(labels.tolist(), cycles.tolist())}:
            mask = (labels == label) & (cycles == cycle)
            out[mask] = self._scene_cycle(label, cycle)[positions[mask]]
        return out

    def _scene_cycle(self, label: int, cycle: int) -> np.ndarray:
        """A seeded permutation of the scenes: class ``label``'s ``cycle``-th walk through them."""
        perm = self._scene_cycles.get((label, cycle))
        if perm is None:
            n_scenes = len(places365_scenes())
            perm = np.argsort(hash_ids(_SCENE, self.seed, label, cycle, np.arange(n_scenes)), kind="stable")
            if len(self._scene_cycles) >= 4096:
                self._scene_cycles.pop(next(iter(self._scene_cycles)))
            self._scene_cycles[label, cycle] = perm
        return perm

    def prompts(self, ids: Iterable[int] | np.ndarray, labels: np.ndarray | None = None) -> list[str]:
        ids = np.asarray(ids, dtype=np.int64)
        labels = self.labels(ids) if labels is None else labels
        classes = self.classes.classes
        if not self.template.uses_background:
            return [self.template.render(classes[label]) for label in labels.tolist()]
        scenes = places365_scenes()
        return [
            self.template.render(classes[label], scenes[s])
            for label, s in zip(labels.tolist(), self.scenes(ids).tolist())
        ]

    def samples(self, ids: Iterable[int] | np.ndarray) -> list[Sample]:
        ids = np.asarray(ids, dtype=np.int64)
        labels = self.labels(ids)
        prompts = self.prompts(ids, labels)
        seeds = self.noise_seeds(ids)
        return [
            Sample(int(i), int(lab), self.classes.classes[lab].key, p, int(s))
            for i, lab, p, s in zip(ids.tolist(), labels.tolist(), prompts, seeds.tolist())
        ]


def unit_ids(unit: int, unit_size: int) -> np.ndarray:
    """The sample ids of one unit: ``[unit*B, (unit+1)*B)``."""
    return np.arange(unit * unit_size, (unit + 1) * unit_size, dtype=np.int64)


def rank_unit(rank: int, world: int, k: int) -> int:
    """The k-th unit owned by trainer rank ``rank`` of ``world``."""
    return rank + k * world


@dataclass
class UnitCursor:
    """Which of one rank's units (by rank-local index k) have been consumed.

    ``below``: every k < below is consumed; ``done``: consumed k >= below. Units arrive in
    nearly increasing order, so ``done`` stays as small as the in-flight window.
    """

    rank: int
    world: int
    below: int = 0
    done: set[int] = field(default_factory=set)

    def is_done(self, k: int) -> bool:
        return k < self.below or k in self.done

    def mark(self, k: int) -> None:
        if self.is_done(k):
            raise RuntimeError(f"rank {self.rank}: unit {rank_unit(self.rank, self.world, k)} was consumed twice")
        self.done.add(k)
        while self.below in self.done:
            self.done.remove(self.below)
            self.below += 1

    def pending(self) -> Iterator[int]:
        """Rank-local indices not yet consumed, in increasing order (an infinite iterator)."""
        k = self.below
        while True:
            if k not in self.done:
                yield k
            k += 1

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "below": self.below, "done": sorted(self.done)}

    @classmethod
    def from_state_dict(cls, state: dict) -> UnitCursor:
        return cls(state["rank"], state["world"], int(state["below"]), set(map(int, state["done"])))
