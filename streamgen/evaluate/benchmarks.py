"""The ImageNet benchmarks as their maintainers release them, read from the folder as extracted.

- ``in-val``: ILSVRC2012_img_val.tar after the usual preparation (valprep.sh, torchvision's
  ImageNet): ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``, 1000 classes;
- ``in-v2``: imagenetv2-{matched-frequency,threshold0.7,top-images}.tar.gz (Hugging Face
  vaishaal/ImageNetV2): ``imagenetv2-<variant>-format-val/<class INDEX 0..999>/<sha1>.jpeg``;
- ``in-sketch``: ImageNet-Sketch.zip: ``sketch/<wnid>/sketch_<k>.JPEG``, 1000 classes;
- ``in-r``: imagenet-r.tar: ``imagenet-r/<wnid>/<rendition>_<k>.jpg`` + ``README.txt``, 200 classes;
- ``in-a``: imagenet-a.tar: ``imagenet-a/<wnid>/<score>_<query>_<p>.jpg`` + ``README.txt``, 200 classes.

ImageNet-V2's folder ``i`` is the i-th class of the standard ImageNet-1K order (the sorted
WordNet ids, as its maintainers' loader ``imagenetv2_pytorch`` reads it: ``int(folder name)``),
so a plain ImageFolder, which sorts ``0, 1, 10, 100, ...`` as strings, would mislabel it.
ImageNet-R/-A's 200 classes are timm's ``imagenet_r_synsets.txt``/``imagenet_a_synsets.txt``
(the same sets as hendrycks' own eval.py); their protocol predicts among those 200 classes.

`resolve` takes the extracted folder, or the folder the archive was extracted into (it then
steps into the one release folder it finds there), detects which benchmark it is (or checks the
name given), and lists its images with their class keys. Anything else laid out as one
sub-folder per class key (a custom validation set) is read as a generic ``folder``.
"""

from __future__ import annotations

import os
import pkgutil
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from streamgen.errors import UsageError
from streamgen.plan.classes import WNID_PATTERN, imagenet1k_wnids

BENCHMARKS = ("in-val", "in-v2", "in-sketch", "in-r", "in-a")
GENERIC = "folder"
TITLES = {"in-val": "IN-Val", "in-v2": "IN-v2", "in-sketch": "IN-Sketch", "in-r": "IN-R", "in-a": "IN-A"}
V2_FOLDER = re.compile(r"^imagenetv2-(matched-frequency|threshold0\.7|top-images)-format-val$")
RELEASE_FOLDERS = ("val", "sketch", "imagenet-r", "imagenet-a")  # + V2_FOLDER
RAW_VAL_IMAGE = re.compile(r"^ILSVRC2012_val_\d{8}\.JPEG$")
# torchvision.datasets.folder.IMG_EXTENSIONS, kept here so that checking a folder imports no torch
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@lru_cache(maxsize=None)
def synsets(name: str) -> tuple[str, ...]:
    """The WordNet ids a benchmark's classes are drawn from (in-r / in-a: its 200; others: ImageNet-1K)."""
    if name in ("in-r", "in-a"):
        data = pkgutil.get_data("timm.data", f"_info/imagenet_{name[-1]}_synsets.txt")
        return tuple(data.decode().split())
    return tuple(imagenet1k_wnids())


@dataclass(frozen=True)
class Benchmark:
    """One benchmark folder: its images and the class key of each."""

    name: str  # one of BENCHMARKS, or GENERIC
    root: Path  # the folder that holds the class folders
    variant: str  # ImageNet-V2's test set (matched-frequency, threshold0.7, top-images); "" otherwise
    samples: tuple[tuple[str, str], ...]  # (image path, class key), in folder order

    @property
    def title(self) -> str:
        label = TITLES.get(self.name, self.root.name)
        # The paper's IN-v2 is MatchedFrequency; the other two test sets get their own column.
        return f"{label} ({self.variant})" if self.variant not in ("", "matched-frequency") else label

    @property
    def classes(self) -> list[str]:
        return sorted({key for _, key in self.samples})

    @property
    def predicts_among_its_classes(self) -> bool:
        """ImageNet-R and -A are scored with predictions restricted to their 200 classes."""
        return self.name in ("in-r", "in-a")


def parse_data_spec(text: str) -> tuple[str | None, str]:
    """``NAME=ROOT`` -> (NAME, ROOT); a plain path -> (None, path). Raises on an unknown NAME."""
    name, sep, root = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z][\w-]*", name) or Path(text).exists():
        return None, text
    if name not in BENCHMARKS:
        raise UsageError(
            f"--data {text}: unknown dataset name '{name}'; use one of {', '.join(BENCHMARKS)} (or a plain folder)"
        )
    return name, root


def _subfolders(root: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    except OSError as e:
        raise UsageError(f"{root}: cannot be read ({e.strerror})") from None


def _is_class_folder(name: str) -> bool:
    return bool(WNID_PATTERN.match(name)) or name.isdigit()


def _release_root(root: Path, flag: str) -> Path:
    """The folder holding the class folders: ``root`` itself, or the one release folder inside it."""
    subfolders = _subfolders(root)
    if any(_is_class_folder(name) for name in subfolders):
        return root
    releases = [name for name in subfolders if name in RELEASE_FOLDERS or V2_FOLDER.match(name)]
    if len(releases) > 1:
        raise UsageError(
            f"{flag} {root}: holds several benchmarks ({', '.join(releases)}); pass each folder on its own"
        )
    return root / releases[0] if releases else root


def _check_not_raw_val(root: Path, flag: str) -> None:
    try:
        raw = any(RAW_VAL_IMAGE.match(entry.name) for entry in root.iterdir())
    except OSError:
        return
    if raw:
        raise UsageError(
            f"{flag} {root}: holds the raw ImageNet validation images in one folder; sort them into one folder "
            "per WordNet id first (the usual valprep.sh, or torchvision.datasets.ImageNet with the devkit)"
        )


def _detect(root: Path, folders: list[str]) -> str:
    if folders and all(name.isdigit() and int(name) < 1000 for name in folders):
        return "in-v2"
    if not folders or not all(WNID_PATTERN.match(name) for name in folders):
        return GENERIC
    present = set(folders)
    for name in ("in-r", "in-a"):
        if present == set(synsets(name)):
            return name
    if present <= set(synsets("in-val")):
        return "in-sketch" if root.name == "sketch" or _sketch_files(root / folders[0]) else "in-val"
    return GENERIC


def _sketch_files(folder: Path) -> bool:
    """ImageNet-Sketch's files are ``sketch_<k>.JPEG``: recognised even when ``sketch/`` was renamed."""
    try:
        return any(entry.name.startswith("sketch_") for entry in os.scandir(folder))
    except OSError:
        return False


def _check_named(name: str, root: Path, folders: list[str], flag: str) -> None:
    """The folder holds what benchmark ``name`` releases, or one line says what was expected."""
    if name == "in-v2":
        bad = [f for f in folders if not (f.isdigit() and int(f) < 1000)]
        expected = "class-index folders 0..999 (imagenetv2-<variant>-format-val as extracted)"
    else:
        known = set(synsets(name))
        bad = [f for f in folders if f not in known]
        release = {"in-val": "val/ after the usual preparation", "in-sketch": "sketch/ from ImageNet-Sketch.zip"}
        where = release.get(name, f"{name.replace('in-', 'imagenet-')}/ from its tar")
        expected = f"one folder per WordNet id of its {len(known)} classes ({where})"
    if not folders or bad:
        found = f"found '{bad[0]}'" if bad else "found no class folders"
        raise UsageError(f"{flag} {name}={root}: expected {expected}; {found}")


def _list_images(root: Path, folders: list[str]) -> list[tuple[str, str]]:
    """(path, folder name) for every image file under each class folder, in sorted order (as ImageFolder)."""
    samples = []
    for folder in folders:
        for dirpath, _, files in sorted(os.walk(root / folder, followlinks=True)):
            samples += [(os.path.join(dirpath, f), folder) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return samples


def resolve(root: str | Path, name: str | None = None, flag: str = "--data") -> Benchmark:
    """The benchmark in ``root`` (detected, or checked against ``name``) with its images; raises UsageError."""
    if name is not None and name not in BENCHMARKS:
        raise UsageError(f"{flag}: unknown dataset name '{name}'; use one of {', '.join(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UsageError(f"{flag} {root}: {what}; give the folder of a benchmark as extracted from its archive")
    root = _release_root(root, flag)
    folders = _subfolders(root)
    if not folders:
        _check_not_raw_val(root, flag)
        raise UsageError(f"{flag} {root}: no class folders (expected one sub-folder of images per class)")
    if name is None:
        name = _detect(root, folders)
    else:
        _check_named(name, root, folders, flag)
    samples = _list_images(root, folders)
    if name == "in-v2":
        wnids = synsets("in-v2")
        samples = [(path, wnids[int(folder)]) for path, folder in samples]
    if not samples:
        raise UsageError(f"{flag} {root}: its class folders hold no images ({', '.join(IMG_EXTENSIONS)})")
    match = V2_FOLDER.match(root.name)
    variant = match.group(1) if name == "in-v2" and match else ""
    return Benchmark(name, root, variant, tuple(samples))


def model_samples(benchmark: Benchmark, class_keys: list[str], flag: str) -> list[tuple[str, int]]:
    """The benchmark's images of the model's classes, with the model's label for each; raises if there are none."""
    label_of = {key: label for label, key in enumerate(class_keys)}
    samples = [(path, label_of[key]) for path, key in benchmark.samples if key in label_of]
    if not samples:
        raise UsageError(
            f"{flag} {benchmark.root}: none of its {len(benchmark.classes)} classes (e.g. {benchmark.classes[0]}) is "
            f"a class of the model (e.g. {class_keys[0]}); give a folder of the classes it was trained on"
        )
    return samples


def check_folder(
    root: str | Path, class_keys: list[str], flag: str, name: str | None = None
) -> tuple[Benchmark, list[tuple[str, int]]]:
    """The folder exists, has a known layout and images of the model's classes; raises UsageError."""
    benchmark = resolve(root, name, flag)
    return benchmark, model_samples(benchmark, class_keys, flag)
