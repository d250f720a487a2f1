"""Benchmark scores against an image-by-image recomputation; subset models score the common classes."""

import pytest
import torch
from conftest import write_benchmark, write_checkpoint, write_image_folder
from PIL import Image

from streamgen.errors import UsageError
from streamgen.evaluate.benchmark_eval import (
    benchmark_transform,
    evaluate_benchmark,
    load_classifier,
    tab1_markdown,
    tab2_markdown,
    training_crop,
)
from streamgen.evaluate.benchmarks import check_folder, synsets
from streamgen.plan.classes import imagenet100_wnids
from streamgen.train.augment import eval_transform

KEYS = ["n01443537", "n01484850", "n01494475", "n01498041"]  # ImageNet-R classes (and ImageNet-1K)
CROP = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny forward passes on a busy shared CPU are many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", KEYS)


def expected_scores(model, folder, present_only: bool) -> tuple[float, float]:
    """Top-1/top-5 recomputed here, image by image with PIL, with the documented transform."""
    transform = eval_transform(CROP)
    present = sorted(KEYS.index(p.name) for p in folder.iterdir() if p.is_dir())
    hits1 = hits5 = n = 0
    with torch.no_grad():
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            label = KEYS.index(class_dir.name)
            for image_path in sorted(class_dir.iterdir()):
                logits = model(transform(Image.open(image_path).convert("RGB"))[None])[0]
                if present_only:
                    mask = torch.full_like(logits, float("-inf"))
                    mask[present] = 0
                    logits = logits + mask
                ranked = logits.argsort(descending=True).tolist()
                hits1 += ranked[0] == label
                hits5 += label in ranked[:5]
                n += 1
    return 100 * hits1 / n, 100 * hits5 / n


def evaluate(model, root, name=None, **kw):
    benchmark, samples = check_folder(root, list(model.hparams.class_keys), "--data", name)
    return evaluate_benchmark(model, benchmark, samples, benchmark_transform(CROP), batch_size=5, workers=0, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [None, "in-r"])
@pytest.mark.parametrize("all_classes", [False, True])
def test_scores_match_an_image_by_image_recomputation(tmp_path, model, name, all_classes):
    """A generic folder predicts among all classes; ImageNet-R's protocol among the folder's (unless all_classes)."""
    folder = write_image_folder(tmp_path / "val", KEYS[1:], per_class=4)  # 3 of the model's 4 classes
    result = evaluate(model, folder, name, all_classes=all_classes)
    restricted = name == "in-r" and not all_classes
    top1, top5 = expected_scores(model, folder, present_only=restricted)
    assert (result.images, result.classes, result.folder_classes, result.skipped) == (12, 3, 3, 0)
    assert result.predicted_among == (3 if restricted else 4)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)


@pytest.mark.timeout(180)
def test_an_imagenet100_model_scores_the_classes_it_shares_with_each_benchmark(tmp_path):
    keys = imagenet100_wnids()
    model = write_checkpoint(tmp_path / "in100.ckpt", keys)
    val = evaluate(model, write_benchmark(tmp_path, "in-val", per_class=2))
    assert (val.folder_classes, val.classes, val.images, val.predicted_among) == (1000, 100, 200, 100)
    assert "100 of its 1000 classes" in val.coverage()
    common = len(set(keys) & set(synsets("in-r")))
    r = evaluate(model, write_benchmark(tmp_path, "in-r"))
    assert (r.dataset, r.folder_classes, r.classes, r.images, r.predicted_among) == (
        "in-r",
        200,
        common,
        common,
        common,
    )
    v2 = evaluate(model, write_benchmark(tmp_path, "in-v2:threshold0.7"))
    assert (v2.dataset, v2.variant, v2.classes, v2.images) == ("in-v2", "threshold0.7", 100, 100)


@pytest.mark.timeout(120)
def test_a_truncated_image_is_skipped_and_counted(tmp_path, model):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=2)
    data = (folder / KEYS[0] / "0.png").read_bytes()
    (folder / KEYS[0] / "0.png").write_bytes(data[: len(data) // 2])
    result = evaluate(model, folder)
    assert (result.images, result.skipped) == (7, 1)
    assert result.skipped_examples[0].startswith(str(folder / KEYS[0] / "0.png"))
    assert "1 unreadable image(s) skipped" in result.coverage()


@pytest.mark.timeout(120)
def test_a_folder_of_only_unreadable_images_has_no_score(tmp_path, model):
    folder = tmp_path / "val" / KEYS[0]
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    result = evaluate(model, folder.parent)
    assert (result.images, result.skipped, result.top1, result.top5) == (0, 1, None, None)


def test_the_crop_comes_from_the_checkpoints_run(tmp_path):
    run = tmp_path / "runs" / "x" / "version_0"
    write_checkpoint(run / "checkpoints" / "last.ckpt", KEYS, crop=48)
    assert training_crop(run / "checkpoints" / "last.ckpt") == (48, str(run / "config.yaml"))
    write_checkpoint(tmp_path / "alone.ckpt", KEYS)
    assert training_crop(tmp_path / "alone.ckpt") == (None, "")


def test_the_default_transform_is_the_standard_evaluation(tmp_path):
    image = Image.new("RGB", (70, 50), (10, 200, 30))
    assert torch.equal(benchmark_transform(CROP)(image), eval_transform(CROP)(image))
    assert benchmark_transform(CROP, resize=64)(image).shape == (3, CROP, CROP)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_text("hello")
    with pytest.raises(UsageError, match="not a streamgen classifier checkpoint"):
        load_classifier(bad, torch.device("cpu"))
    with pytest.raises(UsageError, match="does not exist"):
        load_classifier(tmp_path / "nope.ckpt", torch.device("cpu"))


def test_markdown_tables(tmp_path, model):
    folder = write_image_folder(tmp_path / "val", KEYS, per_class=1)
    result = evaluate(model, folder, "in-val")
    tab1 = tab1_markdown("run", [result]).splitlines()
    assert tab1[0] == "| Model | IN-Val | IN-v2 | IN-Sketch | IN-R | IN-A |"
    assert tab1[2] == f"| run | {result.top1:.2f} | - | - | - | - |"
    probes = [{"dataset": "pets", "top1": 50.0, "top1_std": 1.5}, {"dataset": "dtd", "top1": 30.0, "top1_std": 0.0}]
    assert tab2_markdown("run", probes).splitlines()[2] == "| run | 50.00 ± 1.50 | 30.00 | 40.00 |"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("all_classes", [False, True])
def test_a_subset_model_on_imagenet_r_is_scored_with_both_prediction_sets_and_tabled_labelled(
    tmp_path, model, all_classes
):
    """The model knows 4 classes, ImageNet-R shares 3 of them: among the 3 (the protocol) and among all
    4 (--all_classes) both come out of one pass, each equal to the image-by-image recomputation."""
    folder = write_image_folder(tmp_path / "imagenet-r", KEYS[1:], per_class=4)
    r = evaluate(model, folder, "in-r", all_classes=all_classes)
    shared, every = expected_scores(model, folder, present_only=True), expected_scores(model, folder, False)
    chosen, other = (every, shared) if all_classes else (shared, every)
    assert (r.predicted_among, r.other_among) == ((4, 3) if all_classes else (3, 4))
    assert (r.top1, r.top5) == pytest.approx(chosen) and (r.other_top1, r.other_top5) == pytest.approx(other)
    tab1 = tab1_markdown("run", [r]).splitlines()
    assert tab1[0] == "| Model | IN-Val | IN-v2 | IN-Sketch | IN-R (among 3 shared) | IN-R (among all 4) | IN-A |"
    assert tab1[2] == f"| run | - | - | - | {shared[0]:.2f} | {every[0]:.2f} | - |"
    full = evaluate(model, write_image_folder(tmp_path / "all", KEYS, per_class=1), "in-r")
    assert full.other_among is None and "IN-R |" in tab1_markdown("run", [full])  # nothing to choose: one column
