"""Unreadable images are skipped, counted in the main process and named; readable ones load as torchvision's."""

import io

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image
from torch.utils.data import DataLoader

from streamgen.evaluate.realdata import (
    SHOW_SKIPPED,
    CountSkipped,
    ImageList,
    Unreadable,
    drop_unreadable,
    labelled_image_folder,
    val_loader,
)
from streamgen.train.augment import eval_transform

KEYS = ["n01440764", "n01443537"]


def truncated_jpeg(path, seed=0):
    """A JPEG cut in half, as an interrupted copy leaves it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def spoil(folder, count: int) -> list[str]:
    """``count`` unreadable files among the folder's images: truncated JPEGs, a non-image, a broken PNG."""
    bad = []
    for i in range(count):
        path = folder / KEYS[i % 2] / f"bad{i}.jpg"
        kind = i % 3
        if kind == 0:
            truncated_jpeg(path, i)
        elif kind == 1:
            path.write_bytes(b"this is not an image")
        else:
            path = path.with_suffix(".png")
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        bad.append(str(path))
    return bad


def test_readable_images_load_like_torchvision(tmp_path):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=2)
    dataset = labelled_image_folder(folder, KEYS, eval_transform(32))
    import torchvision

    oracle = torchvision.datasets.ImageFolder(str(folder), transform=eval_transform(32))
    assert len(dataset) == len(oracle) == 4
    for i in range(4):
        (image, label), (expected, expected_label) = dataset[i], oracle[i]
        assert label == expected_label and torch.equal(image, expected)


def test_an_unreadable_image_is_a_marker_and_left_out_of_its_batch(tmp_path):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=2)
    (bad,) = spoil(folder, 1)
    dataset = labelled_image_folder(folder, KEYS, eval_transform(32))
    markers = [item for item in (dataset[i] for i in range(len(dataset))) if isinstance(item, Unreadable)]
    assert [m.path for m in markers] == [bad] and "truncated" in markers[0].reason
    images, labels, skipped = drop_unreadable([dataset[i] for i in range(len(dataset))])
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1] and skipped == [str(markers[0])]


def test_a_batch_of_unreadable_images_is_empty():
    images, labels, skipped = drop_unreadable([Unreadable("a.jpg", "x"), Unreadable("b.jpg", "y")])
    assert images.numel() == 0 and labels.numel() == 0 and len(skipped) == 2


@pytest.mark.timeout(120)
def test_skipped_images_are_counted_across_workers_and_the_first_few_named(tmp_path, capfd):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=3)
    bad = spoil(folder, SHOW_SKIPPED + 2)
    dataset = labelled_image_folder(folder, KEYS, eval_transform(16))
    loader = CountSkipped(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=drop_unreadable), "val_dir")
    seen = sum(len(labels) for _, labels, _ in loader)
    assert seen == 6 and loader.count == len(bad)
    assert len(loader.examples) == SHOW_SKIPPED and all(e.split(" (")[0] in bad for e in loader.examples)
    named = [line for line in capfd.readouterr().err.splitlines() if "skipped an unreadable image" in line]
    assert len(named) == SHOW_SKIPPED
    list(loader)  # a second pass (the next validation) counts again, names no more
    assert loader.count == 2 * len(bad)
    assert "skipped an unreadable image" not in capfd.readouterr().err


def test_validation_ranks_share_the_folder(tmp_path):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=3)
    spoil(folder, 1)
    shares = [
        [label for _, labels, _ in val_loader(str(folder), KEYS, eval_transform(16), 2, 0, rank, 2) for label in labels]
        for rank in range(2)
    ]
    # 7 files padded to 8 (DistributedSampler repeats the first, a class-0 image); the unreadable one is left out
    assert sorted(shares[0] + shares[1]) == [0, 0, 0, 0, 1, 1, 1]


def test_image_list_keeps_targets():
    dataset = ImageList([("a.jpg", 3), ("b.jpg", 1)])
    assert dataset.targets == [3, 1] and isinstance(dataset[0], Unreadable)


def test_validation_logs_skipped_images_and_scores_only_readable_ones():
    """The model's side of the contract: a batch of only unreadable images is counted, not scored."""
    from streamgen.train.model import Classifier

    model = Classifier("resnet18", KEYS).eval()
    logged = []
    model.log = lambda name, value, **kw: logged.append((name, float(value), kw.get("reduce_fx", "mean")))
    with torch.no_grad():
        model.validation_step(drop_unreadable([Unreadable("a.jpg", "x"), Unreadable("b.jpg", "y")]), 0)
        assert logged == [("val/skipped_images", 2.0, "sum")]
        model.validation_step(drop_unreadable([(torch.zeros(3, 16, 16), 1), Unreadable("c.jpg", "z")]), 1)
    assert logged[1] == ("val/skipped_images", 1.0, "sum")
    assert {name for name, _, _ in logged[2:]} == {"val/top1", "val/top5", "val/loss"}
