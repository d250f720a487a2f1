"""Transfer datasets: each release layout, built in miniature exactly as released, read with its splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from streamgen.errors import UsageError
from streamgen.evaluate.probe import probe_transform
from streamgen.evaluate.transfer import check_probes, dataset_names, load_transfer, parse_probes


def jpg(path: Path, seed: int = 0, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format="JPEG")
    return path


def read(splits) -> tuple[dict[str, int], dict[str, int]]:
    """{file name: label} of each split."""
    return (
        {Path(f).name: y for f, y in zip(splits.train.files, splits.train.targets)},
        {Path(f).name: y for f, y in zip(splits.test.files, splits.test.targets)},
    )


# -- the layouts, as each dataset is released ----------------------------------------------------


def make_aircraft(root: Path) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    trainval = [("1000001", "707-320"), ("1000002", "A300B4"), ("1000003", "Cessna 172"), ("1000004", "A300B4")]
    test = [("2000001", "Cessna 172"), ("2000002", "707-320")]
    for name, rows in (("trainval", trainval), ("test", test)):
        (data / f"images_variant_{name}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
        for i, _ in rows:
            jpg(data / "images" / f"{i}.jpg")


def test_aircraft_variant_trainval_test(tmp_path):
    make_aircraft(tmp_path)
    splits = load_transfer("aircraft", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["707-320", "A300B4", "Cessna 172"]
    assert train == {"1000001.jpg": 0, "1000002.jpg": 1, "1000003.jpg": 2, "1000004.jpg": 1}
    assert test == {"2000001.jpg": 2, "2000002.jpg": 0}
    # the release folder itself is accepted too
    assert read(load_transfer("aircraft", tmp_path / "fgvc-aircraft-2013b")) == (train, test)


def _mat_struct(rows: list[dict]) -> np.ndarray:
    fields = list(rows[0])
    out = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            out[0, i][f] = row[f]
    return out


def make_cars(root: Path) -> None:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    classes = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT Hatchback 2011"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": classes.reshape(1, -1)})

    def annos(rows):
        return _mat_struct(
            [{"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 10, "class": c, "fname": f} for f, c in rows]
        )

    train = [("00001.jpg", 1), ("00002.jpg", 3), ("00003.jpg", 2), ("00004.jpg", 1)]
    test = [("00001.jpg", 3), ("00002.jpg", 2)]
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos(train)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos(test)})
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for f, _ in rows:
            jpg(base / folder / f)


def test_stanford_cars_devkit_layout(tmp_path):
    make_cars(tmp_path)
    splits = load_transfer("cars", tmp_path)
    assert splits.classes[1] == "Acura RL Sedan 2012" and len(splits.classes) == 3
    assert splits.train.targets == [0, 2, 1, 0] and splits.test.targets == [2, 1]  # 1-based in the .mat files
    assert all("cars_train" in f for f in splits.train.files) and all("cars_test" in f for f in splits.test.files)


def make_dtd(root: Path) -> None:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    rows = {"train": [], "val": [], "test": []}
    for c in classes:
        for i in range(1, 6):
            jpg(base / "images" / c / f"{c}_{i:04d}.jpg")
        rows["train"] += [f"{c}/{c}_0001.jpg", f"{c}/{c}_0002.jpg"]
        rows["val"] += [f"{c}/{c}_0003.jpg"]
        rows["test"] += [f"{c}/{c}_0004.jpg", f"{c}/{c}_0005.jpg"]
    (base / "labels").mkdir()
    for split, lines in rows.items():
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
        (base / "labels" / f"{split}2.txt").write_text("\n".join(lines[::-1]) + "\n")  # another partition


def test_dtd_partition_1_train_plus_val(tmp_path):
    make_dtd(tmp_path)
    splits = load_transfer("dtd", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["banded", "blotchy", "zigzagged"]
    assert len(train) == 9 and len(test) == 6  # train1 + val1, test1
    assert train["blotchy_0003.jpg"] == 1 and test["zigzagged_0005.jpg"] == 2


def make_eurosat(root: Path, per_class: dict[str, int]) -> None:
    for c, n in per_class.items():
        for i in range(1, n + 1):
            jpg(root / "eurosat" / "2750" / c / f"{c}_{i}.jpg")


def test_eurosat_fixed_seeded_split(tmp_path, monkeypatch):
    make_eurosat(tmp_path, {"AnnualCrop": 10, "Forest": 7, "River": 6})
    splits = load_transfer("eurosat", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["AnnualCrop", "Forest", "River"]
    # half of each small class (rounded down) is test; together they are the whole dataset, disjoint
    assert sorted(np.bincount(list(test.values())).tolist()) == [3, 3, 5]
    assert len(train) + len(test) == 23 and not set(train) & set(test)
    assert read(load_transfer("eurosat", tmp_path)) == (train, test)  # fixed: the same split every time
    monkeypatch.setattr("streamgen.evaluate.transfer.EUROSAT_TEST_PER_CLASS", 2)  # the real rule: 810 per class
    assert np.bincount(load_transfer("eurosat", tmp_path).test.targets).tolist() == [2, 2, 2]


def make_flowers(root: Path) -> None:
    base = root / "flowers-102"
    labels = [1, 2, 1, 2, 3, 3, 1, 2, 3]  # image_00001 .. image_00009
    for i in range(1, len(labels) + 1):
        jpg(base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    scipy.io.savemat(
        base / "setid.mat",
        {"trnid": np.array([[1, 2, 5]]), "valid": np.array([[3, 4, 6]]), "tstid": np.array([[7, 8, 9]])},
    )


def test_flowers102_train_plus_val(tmp_path):
    make_flowers(tmp_path)
    train, test = read(load_transfer("flowers", tmp_path))
    assert train == {
        "image_00001.jpg": 0,
        "image_00002.jpg": 1,
        "image_00005.jpg": 2,
        "image_00003.jpg": 0,
        "image_00004.jpg": 1,
        "image_00006.jpg": 2,
    }
    assert test == {"image_00007.jpg": 0, "image_00008.jpg": 1, "image_00009.jpg": 2}


def make_pets(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    trainval = [("Abyssinian_1", 1, 1), ("american_bulldog_1", 2, 2), ("Abyssinian_2", 1, 1), ("Bengal_1", 3, 1)]
    test = [("Bengal_2", 3, 1), ("american_bulldog_2", 2, 2)]
    for split, rows in (("trainval", trainval), ("test", test)):
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{i} {c} {s} 1\n" for i, c, s in rows))
        for i, _, _ in rows:
            jpg(base / "images" / f"{i}.jpg")


def test_oxford_pets_trainval_test(tmp_path):
    make_pets(tmp_path)
    splits = load_transfer("pets", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["Abyssinian", "American Bulldog", "Bengal"]
    assert train == {"Abyssinian_1.jpg": 0, "american_bulldog_1.jpg": 1, "Abyssinian_2.jpg": 0, "Bengal_1.jpg": 2}
    assert test == {"Bengal_2.jpg": 2, "american_bulldog_2.jpg": 1}


def make_food(root: Path, test_classes: tuple[str, ...] = ("apple_pie", "sushi")) -> None:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    train = {
        "apple_pie": ["apple_pie/101", "apple_pie/102"],
        "sushi": ["sushi/201", "sushi/202"],
        "bibimbap": ["bibimbap/301"],
    }
    test = {c: [f"{c}/9{i}"] for i, c in enumerate(test_classes)}
    for split, meta in (("train", train), ("test", test)):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for paths in meta.values():
            for p in paths:
                jpg(base / "images" / f"{p}.jpg")


def test_food101_labels_follow_class_names_across_splits(tmp_path):
    make_food(tmp_path)
    splits = load_transfer("food", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["apple_pie", "bibimbap", "sushi"]
    assert train == {"101.jpg": 0, "102.jpg": 0, "201.jpg": 2, "202.jpg": 2, "301.jpg": 1}
    assert test == {"90.jpg": 0, "91.jpg": 2}  # sushi is class 2 in train although 1 in test.json's own order


def make_sun397(root: Path, partitions_in: str = "") -> None:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    training, testing = [], []
    for k, c in enumerate(classes):
        for i in range(4):
            jpg(base / c.strip("/") / f"sun_{k}{i}.jpg")
        training += [f"{c}/sun_{k}0.jpg", f"{c}/sun_{k}1.jpg"]
        testing += [f"{c}/sun_{k}2.jpg"]  # sun_k3.jpg is in no partition-1 split
    folder = root / partitions_in
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Training_01.txt").write_text("\n".join(training) + "\n")
    (folder / "Testing_01.txt").write_text("\n".join(testing) + "\n")


@pytest.mark.parametrize("partitions_in", ["", "SUN397", "Partitions"])
def test_sun397_partition_1(tmp_path, partitions_in):
    make_sun397(tmp_path, partitions_in)
    splits = load_transfer("sun397", tmp_path)
    train, test = read(splits)
    assert splits.classes == ["abbey", "apartment_building/outdoor", "bakery/shop"]  # torchvision's names
    assert len(train) == 6 and test == {"sun_02.jpg": 0, "sun_12.jpg": 1, "sun_22.jpg": 2}
    assert train["sun_11.jpg"] == 1 and all(Path(f).is_file() for f in splits.train.files)


def make_inat(root: Path, year: str, val_categories: tuple[int, ...] = (5, 9)) -> None:
    folder = {"2018": "Plantae", "2019": "Plants"}[year]

    def write(split: str, items: list[tuple[int, int]]):
        images, annotations = [], []
        for image_id, category in items:
            name = f"train_val{year}/{folder}/{category}/{image_id:04x}.jpg"
            jpg(root / name)
            images.append({"id": image_id, "file_name": name, "width": 16, "height": 12})
            annotations.append({"id": 1000 + image_id, "image_id": image_id, "category_id": category})
        annotations.reverse()  # the join is by image_id, not by position
        (root / f"{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": [{"id": c} for c in (5, 7, 9)]})
        )

    write("train", [(1, 5), (2, 7), (3, 9), (4, 5)])
    write("val", [(10 + i, c) for i, c in enumerate(val_categories)])


@pytest.mark.parametrize("year", ["2018", "2019"])
def test_inaturalist_official_json(tmp_path, year):
    make_inat(tmp_path, year)
    splits = load_transfer(f"inat{year}", tmp_path)
    assert splits.classes == ["5", "7", "9"]  # category ids, in order
    assert splits.train.targets == [0, 1, 2, 0] and splits.test.targets == [0, 2]
    assert all(Path(f).is_file() for f in splits.train.files + splits.test.files)


def make_folder(root: Path, test_classes=("cat", "dog")) -> None:
    for c in ("cat", "dog", "eel"):
        jpg(root / "train" / c / "a.jpg")
        jpg(root / "train" / c / "b.jpg")
    for c in test_classes:
        jpg(root / "test" / c / "t.jpg")


def test_generic_folder_maps_test_classes_by_name(tmp_path):
    make_folder(tmp_path, ("dog", "eel"))
    splits = load_transfer("folder-mine", tmp_path)
    assert splits.classes == ["cat", "dog", "eel"] and splits.test.targets == [1, 2]
    assert len(splits.train) == 6


def test_images_come_out_as_the_probe_sees_them(tmp_path):
    make_folder(tmp_path)
    splits = load_transfer("folder", tmp_path, probe_transform(crop=8))
    image, label = splits.test[1]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1


# -- bad input: one line ---------------------------------------------------------------------------

MAKERS = {
    "aircraft": make_aircraft,
    "cars": make_cars,
    "dtd": make_dtd,
    "flowers": make_flowers,
    "pets": make_pets,
    "food": make_food,
    "sun397": make_sun397,
    "inat2018": lambda root: make_inat(root, "2018"),
}


@pytest.mark.parametrize("name", sorted(set(dataset_names()) - {"folder"}))
def test_a_root_without_the_layout_is_one_line_naming_what_was_expected(tmp_path, name):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(UsageError) as e:
        load_transfer(name, tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and "expected" in message


def test_the_wrong_dataset_for_a_root_is_refused(tmp_path):
    make_dtd(tmp_path)
    with pytest.raises(UsageError, match="food-101/"):
        load_transfer("food", tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        load_transfer("dtd", tmp_path / "missing")


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda root: make_folder(root, ("dog", "fox")), "folder"),
        (lambda root: make_food(root, ("apple_pie", "ramen")), "food"),
        (lambda root: make_inat(root, "2019", (5, 8)), "inat2019"),
    ],
)
def test_test_classes_absent_from_training_are_refused(tmp_path, make, name):
    make(tmp_path)
    with pytest.raises(UsageError, match="absent from the train split"):
        load_transfer(name, tmp_path)


def test_unknown_names_and_bad_specs(tmp_path):
    with pytest.raises(UsageError, match="aircraft, cars, dtd"):
        parse_probes(f"imagenet={tmp_path}")
    with pytest.raises(UsageError, match="NAME=ROOT"):
        parse_probes("dtd")
    with pytest.raises(UsageError, match="must differ"):
        parse_probes(f"dtd={tmp_path},dtd={tmp_path}")
    make_dtd(tmp_path / "d")
    make_pets(tmp_path / "p")
    assert check_probes(f"dtd={tmp_path / 'd'}, pets={tmp_path / 'p'}") == [
        ("dtd", str(tmp_path / "d")),
        ("pets", str(tmp_path / "p")),
    ]
    with pytest.raises(UsageError, match=r"^--train.probes: pets="):
        check_probes(f"dtd={tmp_path / 'd'},pets={tmp_path / 'd'}")


def test_every_maker_layout_is_read(tmp_path):
    # guards the bad-input test above: each layout it breaks is one that does read when present
    for name, make in MAKERS.items():
        make(tmp_path / name)
        assert len(load_transfer(name, tmp_path / name).train) > 0
