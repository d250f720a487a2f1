"""The transfer datasets of the paper's Tab. 2, read from the user's own copies as released.

Each dataset is read with its standard train/test split into two `ImageList` datasets (image
paths + labels sharing one class list). `torchvision.datasets` parses the release wherever it
knows it (always with ``download=False``); the rest follows the official files. ``ROOT`` is the
folder torchvision expects (the one *holding* the release folder); the release folder itself is
accepted too.

=========  ==========================================================  =====================
name       ROOT holds (torchvision 0.29 layout)                        train / test
=========  ==========================================================  =====================
aircraft   ``fgvc-aircraft-2013b/data/`` (FGVCAircraft, variant)        trainval / test
cars       ``stanford_cars/`` devkit + cars_train/ + cars_test/ +      train / test
           ``cars_test_annos_withlabels.mat`` (StanfordCars)
dtd        ``dtd/dtd/`` images/ + labels/ (DTD, partition 1)           train1+val1 / test1
eurosat    ``eurosat/2750/<class>/`` (EuroSAT RGB)                     seeded split, below
flowers    ``flowers-102/`` jpg/ + imagelabels.mat + setid.mat          train+val / test
           (Flowers102; the .mat files' md5 is not checked)
pets       ``oxford-iiit-pet/`` images/ + annotations/ (OxfordIIITPet)  trainval / test
food       ``food-101/`` images/ + meta/ (Food101)                     train / test
sun397     ``SUN397/`` ClassName.txt + images; Training_01.txt and     Training_01 /
           Testing_01.txt (official Partitions.zip) in ``SUN397/``,    Testing_01
           ``ROOT`` or ``Partitions/`` of either
inat2018   ``train2018.json``, ``val2018.json``, ``train_val2018/``    train / val
inat2019   ``train2019.json``, ``val2019.json``, ``train_val2019/``    train / val
folder     ``train/<class>/*`` and ``test/<class>/*`` (ImageFolder)    train / test
=========  ==========================================================  =====================

Train splits merge the official train and val parts where a dataset has both (as the authors'
transfer code, naver/trex, does: the probe carves its own validation split out of it).

- **EuroSAT** has no official split. As trex (after Feng et al., ICLR 2022): per class, a fixed
  random order (seed 0, NumPy); its first 810 images are the test set (8,100 in all), the rest
  train (18,900). A class of fewer than 1,620 images gives half of them (rounded down) to test.
- **SUN397**: torchvision's SUN397 has no partitions, so partition 1 is read from the official
  ``Training_01.txt`` / ``Testing_01.txt`` (50 + 50 images per class); class names are
  torchvision's (``ClassName.txt`` lines without the ``/a/`` prefix).
- **iNaturalist**: torchvision's INaturalist reads no annotation file (so no train/val split)
  and creates folders; the official json files are read instead. Labels are the
  ``category_id`` of each image's annotation; ``file_name`` is relative to ``ROOT``.

A root that does not match its layout, a name not in the table, a test split with a class that
the train split lacks: `UsageError`, one line. Several generic folders can be told apart in
the logs as ``folder-NAME``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from streamgen.errors import UsageError

EUROSAT_TEST_PER_CLASS = 810
EUROSAT_SEED = 0


class ImageList(Dataset):
    """``(image, label)`` from a list of image paths and labels; ``targets`` without loading any image."""

    def __init__(self, files: list[str], targets: list[int], classes: list[str], transform: Callable | None) -> None:
        self.files, self.targets, self.classes, self.transform = files, targets, classes, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = default_loader(self.files[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


@dataclass(frozen=True)
class TransferSplits:
    name: str
    train: ImageList
    test: ImageList

    @property
    def classes(self) -> list[str]:
        return self.train.classes


@dataclass(frozen=True)
class _Layout:
    folder: str  # the release folder under ROOT ("" when ROOT is the release folder)
    expected: str  # what the error message says should be there
    read: Callable[[Path], tuple[list, list, list[str]]]  # release folder -> (train, test, classes)


# -- readers: release folder -> (train [(path, label)], test [(path, label)], classes) --------------


def _pairs(files, labels) -> list[tuple[str, int]]:
    return [(str(f), int(y)) for f, y in zip(files, labels)]


def _train_test(split, train: str, test: str):
    """(train, test, classes) from ``split(name) -> (samples, classes)``; the classes are the train split's."""
    (train_samples, classes), (test_samples, _) = split(train), split(test)
    return train_samples, test_samples, classes


def _aircraft(base: Path):
    tv = torchvision.datasets

    def split(name: str):
        ds = tv.FGVCAircraft(base.parent, split=name, annotation_level="variant", download=False)
        return _pairs(ds._image_files, ds._labels), ds.classes

    return _train_test(split, "trainval", "test")


def _cars(base: Path):
    def split(name: str):
        ds = torchvision.datasets.StanfordCars(base.parent, split=name, download=False)
        return list(ds._samples), ds.classes

    train, test, classes = _train_test(split, "train", "test")
    return [(str(p), int(y)) for p, y in train], [(str(p), int(y)) for p, y in test], [str(c) for c in classes]


def _dtd(base: Path, partition: int = 1):
    # torchvision numbers classes within each split file; name them across splits.
    parts = {}
    for name in ("train", "val", "test"):
        ds = torchvision.datasets.DTD(base.parent.parent, split=name, partition=partition, download=False)
        parts[name] = [(str(f), ds.classes[y]) for f, y in zip(ds._image_files, ds._labels)]
    classes = sorted({c for c in (c for _, c in parts["train"] + parts["val"])})
    index = {c: i for i, c in enumerate(classes)}
    train = [(f, index[c]) for f, c in parts["train"] + parts["val"]]
    test = [(f, index.get(c, -1)) for f, c in parts["test"]]
    return train, test, classes


def _eurosat(base: Path):
    ds = torchvision.datasets.EuroSAT(base.parent, download=False)
    rng = np.random.default_rng(EUROSAT_SEED)
    train, test = [], []
    for label in range(len(ds.classes)):
        files = sorted(path for path, y in ds.samples if y == label)
        order = rng.permutation(len(files))
        n_test = min(EUROSAT_TEST_PER_CLASS, len(files) // 2)
        test += [(files[i], label) for i in order[:n_test]]
        train += [(files[i], label) for i in order[n_test:]]
    return sorted(train), sorted(test), list(ds.classes)


class _Flowers102(torchvision.datasets.Flowers102):
    """torchvision's reader without the md5 check of the two .mat files (present is enough)."""

    def _check_integrity(self) -> bool:
        return all((self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid")) and (
            self._images_folder.is_dir()
        )


def _flowers(base: Path):
    def split(name: str):
        ds = _Flowers102(base.parent, split=name, download=False)
        return _pairs(ds._image_files, ds._labels)

    labels = {y for _, y in split("train") + split("val") + split("test")}
    return split("train") + split("val"), split("test"), [str(i) for i in range(max(labels) + 1)]


def _pets(base: Path):
    def split(name: str):
        ds = torchvision.datasets.OxfordIIITPet(base.parent, split=name, target_types="category", download=False)
        return _pairs(ds._images, ds._labels), ds.classes

    return _train_test(split, "trainval", "test")


def _food(base: Path):
    def split(name: str):
        ds = torchvision.datasets.Food101(base.parent, split=name, download=False)
        return [(str(f), ds.classes[y]) for f, y in zip(ds._image_files, ds._labels)], ds.classes

    train, test, classes = _train_test(split, "train", "test")
    index = {c: i for i, c in enumerate(classes)}  # each split numbers the classes of its own json
    return [(f, index[c]) for f, c in train], [(f, index.get(c, -1)) for f, c in test], classes


def _sun397(base: Path, partition: int = 1):
    with open(base / "ClassName.txt") as f:
        classes = [line.strip()[3:] for line in f if line.strip()]  # "/a/abbey" -> "abbey", as torchvision
    index = {c: i for i, c in enumerate(classes)}
    folder = _sun397_partitions(base)

    def split(name: str):
        out = []
        for line in (folder / f"{name}_{partition:02d}.txt").read_text().split():
            parts = line.strip("/").split("/")  # a/abbey/sun_x.jpg
            out.append((str(base.joinpath(*parts)), index.get("/".join(parts[1:-1]), -1)))
        return out

    train = split("Training")
    if any(y < 0 for _, y in train):
        raise UsageError(f"{folder / 'Training_01.txt'} names classes absent from {base / 'ClassName.txt'}")
    return train, split("Testing"), classes


def _sun397_partitions(base: Path) -> Path:
    for folder in (base, base.parent, base / "Partitions", base.parent / "Partitions"):
        if (folder / "Training_01.txt").is_file() and (folder / "Testing_01.txt").is_file():
            return folder
    raise FileNotFoundError("Training_01.txt")


def _inat(year: str):
    def read(base: Path):
        def split(name: str):
            with open(base / f"{name}{year}.json") as f:
                content = json.load(f)
            category = {a["image_id"]: a["category_id"] for a in content["annotations"]}
            return [(str(base / im["file_name"]), int(category[im["id"]])) for im in content["images"]]

        train, test = split("train"), split("val")
        ids = sorted({y for _, y in train})
        index = {c: i for i, c in enumerate(ids)}
        return (
            [(f, index[y]) for f, y in train],
            [(f, index.get(y, -1)) for f, y in test],
            [str(c) for c in ids],
        )

    return read


def _folder(base: Path):
    train = torchvision.datasets.ImageFolder(str(base / "train"))
    test = torchvision.datasets.ImageFolder(str(base / "test"))
    return (
        list(train.samples),
        [(p, train.class_to_idx.get(test.classes[y], -1)) for p, y in test.samples],
        list(train.classes),
    )


LAYOUTS: dict[str, _Layout] = {
    "aircraft": _Layout(
        "fgvc-aircraft-2013b",
        "fgvc-aircraft-2013b/data/ with images/, variants.txt, images_variant_{trainval,test}.txt (FGVC-Aircraft 2013b)",
        _aircraft,
    ),
    "cars": _Layout(
        "stanford_cars",
        "stanford_cars/ with devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat, "
        "cars_train/, cars_test/ (torchvision StanfordCars)",
        _cars,
    ),
    "dtd": _Layout("dtd/dtd", "dtd/dtd/ with images/ and labels/{train,val,test}1.txt (DTD r1.0.1)", _dtd),
    "eurosat": _Layout("eurosat", "eurosat/2750/ with one folder of .jpg per class (EuroSAT RGB)", _eurosat),
    "flowers": _Layout(
        "flowers-102", "flowers-102/ with jpg/, imagelabels.mat and setid.mat (Oxford Flowers-102)", _flowers
    ),
    "pets": _Layout(
        "oxford-iiit-pet",
        "oxford-iiit-pet/ with images/ and annotations/{trainval,test}.txt (Oxford-IIIT Pet)",
        _pets,
    ),
    "food": _Layout("food-101", "food-101/ with images/ and meta/{train,test}.json (Food-101)", _food),
    "sun397": _Layout(
        "SUN397",
        "SUN397/ with ClassName.txt and the class folders, and Training_01.txt + Testing_01.txt "
        "(Partitions.zip) in SUN397/ or next to it",
        _sun397,
    ),
    "inat2018": _Layout(
        "", "train2018.json, val2018.json and train_val2018/ (iNaturalist 2018 as released)", _inat("2018")
    ),
    "inat2019": _Layout(
        "", "train2019.json, val2019.json and train_val2019/ (iNaturalist 2019 as released)", _inat("2019")
    ),
    "folder": _Layout("", "train/<class>/ and test/<class>/ image folders", _folder),
}


def dataset_names() -> list[str]:
    return list(LAYOUTS)


def layout_of(name: str) -> _Layout:
    """The layout of a dataset name (``folder-NAME`` is a generic folder); UsageError listing the names."""
    key = "folder" if name.startswith("folder-") else name
    if key not in LAYOUTS:
        raise UsageError(
            f"unknown transfer dataset {name!r}: use one of {', '.join(LAYOUTS)} (or folder-NAME for a train/ + test/ folder)"
        )
    return LAYOUTS[key]


def release_folder(name: str, root: str | Path) -> Path:
    """The release folder inside ``root`` (``root`` itself when it already is the release folder)."""
    layout, root = layout_of(name), Path(root)
    if not root.is_dir():
        raise UsageError(f"{name}={root}: no such folder; expected a folder holding {layout.expected}")
    if layout.folder and root.parts[-len(Path(layout.folder).parts) :] == Path(layout.folder).parts:
        return root
    return root / layout.folder if layout.folder else root


def load_transfer(name: str, root: str | Path, transform: Callable | None = None) -> TransferSplits:
    """The train and test splits of dataset ``name`` read from ``root``; UsageError when they do not fit."""
    layout, base = layout_of(name), release_folder(name, root)
    try:
        train, test, classes = layout.read(base)
    except (OSError, RuntimeError, KeyError, ValueError, IndexError, json.JSONDecodeError) as e:
        # torchvision says "Dataset not found"; a missing/odd file raises OSError/KeyError: name the layout.
        detail = f" ({type(e).__name__}: {e})" if not isinstance(e, RuntimeError) else ""
        raise UsageError(f"{name}={root} does not hold the expected layout: {layout.expected}{detail}") from None
    if not train or not test:
        raise UsageError(f"{name}={root}: the {'train' if not train else 'test'} split is empty ({layout.expected})")
    missing = sorted({p for p, y in test if y < 0})
    if missing:
        raise UsageError(
            f"{name}={root}: {len(missing)} test image(s) belong to classes absent from the train split, e.g. {missing[0]}"
        )
    return TransferSplits(
        name,
        ImageList([p for p, _ in train], [y for _, y in train], classes, transform),
        ImageList([p for p, _ in test], [y for _, y in test], classes, transform),
    )


def parse_probes(spec: str | None) -> list[tuple[str, str]]:
    """``"NAME=ROOT[,NAME=ROOT]"`` -> ``[(NAME, ROOT), ...]``; names checked, roots not yet."""
    if not spec:
        return []
    probes = []
    for item in spec.split(","):
        name, sep, root = item.strip().partition("=")
        if not sep or not name or not root:
            raise UsageError(f"probe {item.strip()!r} must be NAME=ROOT, e.g. dtd=/data/dtd")
        layout_of(name)
        probes.append((name, root))
    names = [n for n, _ in probes]
    if len(set(names)) < len(names):
        raise UsageError(f"probe names must differ (got {', '.join(names)}); name generic folders folder-NAME")
    return probes


def check_probes(spec: str | None, flag: str = "--train.probes") -> list[tuple[str, str]]:
    """Parse ``NAME=ROOT[,...]`` and read every root's splits now: bad input is one line, before anything starts."""
    try:
        probes = parse_probes(spec)
        for name, root in probes:
            load_transfer(name, root)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    return probes
