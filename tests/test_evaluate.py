import json
import subprocess

import lightning
import pytest
import torch
from conftest import PYTHON, ROOT, write_image_folder
from PIL import Image

from streamgen.augment import eval_transform
from streamgen.model import Classifier

KEYS = ["n01558993", "n01692333", "n01729322", "n01735189"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Classifier("resnet18", KEYS)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path, model.eval()


def expected_scores(model, folder, present_only: bool) -> tuple[float, float]:
    """Top-1/top-5 recomputed here, image by image, with the documented transform."""
    transform = eval_transform(32)
    present = sorted(KEYS.index(p.name) for p in folder.iterdir())
    hits1 = hits5 = n = 0
    with torch.no_grad():
        for class_dir in sorted(folder.iterdir()):
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


def run_eval(*args):
    return subprocess.run([PYTHON, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("all_classes", [False, True])
def test_eval_reports_the_top1_top5_it_should(tmp_path, checkpoint, all_classes):
    path, model = checkpoint
    folder = write_image_folder(tmp_path / "val", KEYS[1:], per_class=4)  # 3 of the 4 classes
    out = tmp_path / "r.json"
    flags = ["--all-classes"] if all_classes else []
    result = run_eval(path, "--data", folder, "--crop", 32, "--workers", 0, "--out", out, *flags)
    assert result.returncode == 0, result.stderr
    (reported,) = json.loads(out.read_text())
    top1, top5 = expected_scores(model, folder, present_only=not all_classes)
    assert reported["images"] == 12 and reported["classes"] == 3
    assert reported["top1"] == pytest.approx(top1) and reported["top5"] == pytest.approx(top5)
    assert f"{top1:.2f}" in result.stdout


@pytest.mark.timeout(120)
def test_classes_the_model_does_not_know(tmp_path, checkpoint):
    path, _ = checkpoint
    folder = write_image_folder(tmp_path / "val", [KEYS[0], "n09999999"], per_class=2)
    result = run_eval(path, "--data", folder, "--crop", 32, "--workers", 0)
    assert result.returncode == 2
    assert "not classes of the model, e.g. n09999999" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_eval(path, "--data", folder, "--crop", 32, "--workers", 0, "--ignore-extra-classes")
    assert result.returncode == 0 and " 2 " in result.stdout.splitlines()[1]


@pytest.mark.timeout(120)
def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_text("hello")
    result = run_eval(bad, "--data", tmp_path)
    assert result.returncode == 2 and "not a streamgen classifier checkpoint" in result.stderr
