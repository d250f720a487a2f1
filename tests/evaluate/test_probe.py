"""The linear probe: the solver against scikit-learn, the regularisation search, features, a whole probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression

from streamgen.evaluate import probe
from streamgen.errors import UsageError
from streamgen.evaluate.probe import (
    backbone_features,
    check_probe_arch,
    evaluate_probe,
    fit_logistic,
    linear_probe,
    select_regularisation,
    stratified_split,
)


def blobs(n: int = 400, dim: int = 10, classes: int = 4, spread: float = 0.5, seed: int = 0):
    """Overlapping Gaussian classes (not separable: the regularisation matters), shifted off zero."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(0, 1, (classes, dim))[y] * spread + rng.normal(0, 1, (n, dim)) + 2.0
    return x, y


def sklearn_fit(x, y, C):
    return LogisticRegression(C=C, tol=1e-7, max_iter=5000).fit(x, y)


@pytest.mark.parametrize("C", [1e-3, 1e-1, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_minimises_scikit_learns_objective(C, dtype):
    x, y = blobs()
    reference = sklearn_fit(x, y, C)
    centred = x - x.mean(0)  # as linear_probe feeds it: only the bias moves
    w, b = fit_logistic(torch.tensor(centred, dtype=dtype), torch.tensor(y), 4, C, tol=1e-7, max_iter=5000)
    coef = w.double().numpy().T
    assert np.abs(coef - reference.coef_).max() < 2e-3 * max(1.0, np.abs(reference.coef_).max())
    ours = (centred @ coef.T + b.double().numpy()).argmax(1)
    assert (ours == reference.predict(x)).mean() > 0.995


def test_chunked_logits_give_the_same_fit(monkeypatch):
    x, y = blobs(n=300)
    t, yt = torch.tensor(x - x.mean(0)), torch.tensor(y)
    whole = fit_logistic(t, yt, 4, 0.1, tol=1e-8)
    monkeypatch.setattr(probe, "CHUNK_ENTRIES", 4 * 140)  # 140 rows at a time: 3 chunks, the last one short
    chunked = fit_logistic(t, yt, 4, 0.1, tol=1e-8)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-8)


def _sklearn_search(x_tr, y_tr, x_va, y_va, grid):
    scores = {C: 100 * sklearn_fit(x_tr, y_tr, C).score(x_va, y_va) for C in grid}
    return max(sorted(scores), key=scores.get), scores


def test_the_search_picks_the_best_value_on_the_validation_split():
    x, y = blobs(n=300, dim=40, spread=0.3)
    tr, va = stratified_split(torch.tensor(y), 0.2, seed=1)
    grid = [10.0**e for e in range(-3, 1)]
    t = torch.tensor(x - x[tr].mean(0), dtype=torch.float64)
    C, val_top1, scores = select_regularisation(
        t[tr], torch.tensor(y[tr]), t[va], torch.tensor(y[va]), 4, grid=grid, refine=False, tol=1e-7
    )
    expected_C, expected = _sklearn_search(x[tr], y[tr], x[va], y[va], grid)
    assert C == max(sorted(scores), key=scores.get) and val_top1 == scores[C]  # the best of its own scores
    assert C == expected_C  # ... which are scikit-learn's scores
    assert all(abs(scores[c] - expected[c]) <= 100 / len(va) + 1e-9 for c in grid)  # at most one image apart
    assert len(set(scores.values())) > 1  # the choice mattered


def test_refinement_tries_the_half_decades_around_the_best():
    x, y = blobs(n=400)
    t, yt = torch.tensor(x - x.mean(0)), torch.tensor(y)
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    C, _, scores = select_regularisation(t[:300], yt[:300], t[300:], yt[300:], 4, grid=grid)
    coarse = max(grid, key=lambda c: (scores[c], -c))
    extra = sorted(set(scores) - set(grid))
    around = [c for c in (coarse / 10**0.5, coarse * 10**0.5) if grid[0] <= c <= grid[-1]]  # within the range
    assert extra == pytest.approx(around) and extra
    assert scores[C] == max(scores.values()) and C == min(c for c in scores if scores[c] == scores[C])


def test_whole_probe_matches_scikit_learn_and_refits_on_train_plus_val(monkeypatch):
    x_all, y_all = blobs(n=1100, spread=0.4, seed=3)  # the same classes: train on the first 500, test on the rest
    x, y, x_test, y_test = x_all[:500], y_all[:500], x_all[500:], y_all[500:]
    sizes = []
    real_fit = probe.fit_logistic
    monkeypatch.setattr(probe, "fit_logistic", lambda f, *a, **k: sizes.append(len(f)) or real_fit(f, *a, **k))
    result = linear_probe(
        torch.tensor(x), torch.tensor(y), torch.tensor(x_test), torch.tensor(y_test), seed=0, tol=1e-6
    )
    assert sizes[-1] == 500 and set(sizes[:-1]) == {400}  # search on the 80%, refit on all
    # scikit-learn, same split and grid, then its own refit on train + val:
    tr, va = stratified_split(torch.tensor(y), 0.2, seed=0)
    grid = [10.0**e for e in range(-5, 7)]
    sk_C, sk_scores = _sklearn_search(x[tr], y[tr], x[va], y[va], grid)
    step = 10**0.5
    more = {C: 100 * sklearn_fit(x[tr], y[tr], C).score(x[va], y[va]) for C in (sk_C / step, sk_C * step)}
    sk_C = max(sorted({**sk_scores, **more}), key={**sk_scores, **more}.get)
    assert result.C == pytest.approx(sk_C)
    sk_top1 = 100 * sklearn_fit(x, y, sk_C).score(x_test, y_test)
    assert abs(result.top1 - sk_top1) <= 0.5
    assert result.n_train == 500 and result.n_test == 600 and result.n_classes == 4


def test_stratified_split_is_per_class_seeded_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[va].numpy()).tolist() == [2, 1, 1]  # int(0.2 n), at least one
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(17))
    assert np.array_equal(stratified_split(y, 0.2, seed=0)[1], va)
    assert any(not np.array_equal(stratified_split(y, 0.2, seed=s)[1], va) for s in range(1, 5))
    with pytest.raises(UsageError, match="at least 2"):
        stratified_split(torch.tensor([0, 0, 1]))


def test_test_classes_without_training_images_are_refused():
    x = torch.randn(8, 3)
    with pytest.raises(UsageError, match="no training image"):
        linear_probe(x, torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]), x[:2], torch.tensor([0, 2]))


# -- features -------------------------------------------------------------------------------------


def test_features_are_the_pooled_backbone_output_whatever_the_head():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = backbone_features(net, images)
        reference = torch.nn.Sequential(*list(net.children())[:-1])(images).flatten(1)  # the net without fc
        assert features.shape == (3, 512)
        torch.testing.assert_close(features, reference)
        net.fc = torch.nn.Sequential(torch.nn.Linear(512, 128), torch.nn.ReLU(), torch.nn.Linear(128, 7))  # a head
        torch.testing.assert_close(backbone_features(net, images), reference)
    assert not net.avgpool._forward_hooks  # the hook is removed


def test_a_streamgen_classifier_with_a_trex_head_gives_its_backbone_features():
    from streamgen.train.model import Classifier

    model = Classifier(arch="resnet18", class_keys=["a", "b", "c"], head="trex").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone_features(model, images), model.net(images))  # fc is Identity there
        assert backbone_features(model, images).shape == (2, 512) and model(images).shape == (2, 3)


def test_images_are_transformed_as_trex_transforms_them():
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 210, 3), dtype=np.uint8))
    trex = T.Compose(  # naver/trex transfer/data/__init__.py, load_dataset
        [
            T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(64),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    torch.testing.assert_close(probe.probe_transform(64)(image), trex(image))


def test_architectures_without_pooled_features_are_refused():
    check_probe_arch("resnet50")
    with pytest.raises(UsageError, match="avgpool"):
        check_probe_arch("vit_b_16")


# -- a whole probe on images ----------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def draw_shapes(root, per_class: int, seed: int, size: int = 32) -> None:
    """``root/<colour>_<shape>/i.png``: a red or blue solid disc or striped square on grey, anywhere."""
    rng = np.random.default_rng(seed)
    for colour, rgb in COLOURS.items():
        for shape in ("disc", "stripes"):
            folder = root / f"{colour}_{shape}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (size, size), (128, 128, 128))
                r = size // 3
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                draw = ImageDraw.Draw(image)
                if shape == "disc":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
                else:
                    for k in range(-r, r, 4):
                        draw.rectangle((cx - r, cy + k, cx + r, cy + k + 1), fill=rgb)
                image.save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    draw_shapes(root / "train", 30, seed=0)
    draw_shapes(root / "test", 15, seed=1)
    return root


@pytest.fixture(scope="module")
def random_backbone():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.timeout(300)
def test_a_random_backbone_probes_coloured_shapes_well(shapes, random_backbone):
    result = evaluate_probe(random_backbone, "folder", str(shapes), crop=32, batch_size=64, workers=0, seeds=2)
    assert result["top1"] >= 90.0, result
    assert result["n_train"] == 120 and result["n_test"] == 60 and result["n_classes"] == 4
    assert result["seeds"] == 2 and len(result["C"]) == 2 and result["seconds"] > 0


@pytest.mark.timeout(300)
def test_shuffled_labels_give_chance(shapes, random_backbone, monkeypatch):
    from streamgen.evaluate import transfer

    real = transfer.load_transfer

    def shuffled(*args, **kwargs):
        splits = real(*args, **kwargs)
        rng = np.random.default_rng(0)
        splits.train.targets = rng.permutation(splits.train.targets).tolist()
        return splits

    monkeypatch.setattr(transfer, "load_transfer", shuffled)
    result = evaluate_probe(random_backbone, "folder", str(shapes), crop=32, batch_size=64, workers=0, seeds=1)
    assert result["top1"] <= 45.0, result  # chance is 25%; 60 test images


def test_subset_keeps_at_most_k_per_class(shapes, random_backbone):
    result = evaluate_probe(random_backbone, "folder", str(shapes), crop=32, workers=0, subset=5)
    assert result["n_train"] == 20 and result["n_test"] == 20
