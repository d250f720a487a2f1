"""Linear probes: frozen backbone features + multinomial logistic regression (the paper's Tab. 2).

The protocol is the one the authors' own transfer code runs (naver/trex, ``transfer/``:
``data/__init__.py``, ``feature_extraction.py``, ``classifier_training.py``,
``logreg_trainer.py``, ``data/utils.py``), which Tab. 2 of *Fake it till you make it* reuses:

- **Features**: the backbone's global-average-pooled output (2048-d for a ResNet-50): trex
  replaces ``model.fc`` by ``Identity``; here a forward hook on ``avgpool`` takes the same
  tensor, so a head added after the pooling (a projector, a t-ReX head) never leaks into the
  features. Images: ``Resize(crop, bicubic)`` of the shorter side then ``CenterCrop(crop)`` and
  ImageNet normalisation, no augmentation (trex: ``Resize(image_size, BICUBIC)``,
  ``CenterCrop(image_size)``, 224). ``resize`` may be given to resize to another size first
  (e.g. ``crop / 0.875``, the ImageNet evaluation habit), but trex does not.
- **Classifier**: L2-regularised multinomial logistic regression solved with L-BFGS, as trex's
  ``LogregSklearnTrainer`` (scikit-learn ``LogisticRegression(penalty="l2", solver="lbfgs")``
  on the raw features: ``--features_norm none``, no standardisation). Here the same objective
  is minimised in torch: ``mean cross-entropy + lam/2 * ||W||^2`` with an unpenalised bias,
  which is scikit-learn's objective for ``C = 1 / (lam * n_train)``, solved until the largest
  gradient entry is below 1e-6 (scikit-learn's criterion; trex keeps its default 1e-4, which on
  2048-d features often stops a few iterations from the start). The features are centred
  on the training mean first: with an unpenalised bias this only moves the bias (the optimum
  W and every prediction are unchanged) but makes L-BFGS converge much faster.
- **Regularisation**: trex samples 30 values of ``C`` in ``[1e-5, 1e6]`` with Optuna on a
  per-class 20% validation split of the training set (``split_trainval``: per class, shuffle,
  the last ``int(0.2 n)`` (at least 1) images are validation), then refits on train+val with
  the best ``C`` and reports top-1 on the test set. Here ``C`` is searched deterministically on
  the same range: one value per decade, then the half-decades on either side of the best,
  each fit warm-started from its neighbour (ties go to the smaller ``C``); the refit starts from
  the chosen fit. Seeds change the validation split; ``seeds=K`` reports the mean and standard
  deviation over K splits. (trex trains its iNaturalist and ImageNet probes with SGD instead;
  here every dataset gets the same L-BFGS solver, the logits computed in row chunks so that
  iNaturalist's 437k x 8142 never exist at once.)
- **Speed**: features are extracted once per probe (batched, ``torch.no_grad``, on the model's
  device) and kept in memory; the solver runs on the features' device (GPU when the model is
  on one) in float32 (float64 on request) with the gradient written in closed form (no
  autograd).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from streamgen.errors import UsageError
from streamgen.train.augment import IMAGENET_MEAN, IMAGENET_STD

C_RANGE = (1e-5, 1e6)  # trex's --clf_C_min / --clf_C_max
VAL_FRACTION = 0.2  # trex's --dataset_per_val
CHUNK_ENTRIES = 2**26  # logits computed in row chunks of this many entries: n x K never exists whole (iNat18)


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # test top-1, percent
    C: float  # chosen inverse regularisation (scikit-learn's convention)
    val_top1: float  # validation top-1 of the chosen C, percent
    n_train: int  # train + val images the final classifier was fitted on
    n_test: int
    n_classes: int


# -- features ---------------------------------------------------------------------------------


def probe_transform(crop: int = 224, resize: int | None = None) -> v2.Compose:
    """trex's transfer transform: bicubic resize of the shorter side, centre crop (on the PIL image, as
    trex's torchvision transforms do), then to a normalised tensor."""
    return v2.Compose(
        [
            v2.Resize(resize or crop, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _network(model_or_net: torch.nn.Module) -> torch.nn.Module:
    """The torchvision network inside a streamgen `Classifier` (its ``.net``), or the network itself."""
    net = getattr(model_or_net, "net", model_or_net)
    if not isinstance(getattr(net, "avgpool", None), torch.nn.Module):
        raise UsageError(
            f"linear probes read the global-average-pooled features of the backbone, but {type(net).__name__} "
            "has no 'avgpool' module (use a ResNet-like torchvision architecture)"
        )
    return net


def backbone_features(model_net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` float32 features: the output of the network's ``avgpool``, taken before any head.

    A forward hook reads the pooled tensor, so whatever follows it (the classifier, a projector)
    does not change the features. The caller sets eval mode and ``no_grad``.
    """
    net = _network(model_net)
    captured: list[torch.Tensor] = []
    handle = net.avgpool.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        net(images)
    finally:
        handle.remove()
    return captured[0].flatten(1).float()


@torch.no_grad()
def extract_features(
    model_or_net: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    workers: int = 4,
    device: torch.device | str | None = None,
    on_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Features of every image of ``dataset`` (which yields ``(image, label)``), in order, on ``device``.

    ``on_batch`` is called after each batch (the training callback's liveness beat)."""
    net = _network(model_or_net)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )
    chunks = []
    try:
        for images, _ in loader:
            chunks.append(backbone_features(net, images.to(device, non_blocking=True)))
            if on_batch is not None:
                on_batch()
    finally:
        net.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0, device=device)


# -- the solver -------------------------------------------------------------------------------


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    C: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    on_eval: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial L2 logistic regression, scikit-learn's objective with inverse regularisation ``C``.

    Minimises ``mean_i CE(x_i W + b, y_i) + lam/2 ||W||^2`` with ``lam = 1 / (C n)`` (the bias is not
    penalised, as in scikit-learn's lbfgs solver) by L-BFGS with a strong-Wolfe line search until the
    largest gradient entry is below ``tol`` (scikit-learn's criterion; its default, 1e-4, which trex
    keeps, often stops a few iterations from the start on 2048-d features: 1e-6 solves to
    convergence), the loss stops changing (float precision) or ``max_iter`` iterations.
    ``features`` should be centred (see `linear_probe`); ``init`` warm-starts from a previous ``(W, b)``;
    ``on_eval`` is called at each loss evaluation (the training callback's liveness beat).
    Returns ``(W [D, K], b [K])`` in ``dtype`` (default: the features' floating type, float32 at least).
    """
    dtype = dtype or (torch.float64 if features.dtype == torch.float64 else torch.float32)
    x = features.to(dtype)
    y = labels.to(x.device).long()
    n, d = x.shape
    lam = 1.0 / (C * n)
    chunk = max(1, min(n, CHUNK_ENTRIES // n_classes))
    w = torch.zeros(d, n_classes, dtype=dtype, device=x.device) if init is None else init[0].to(x).clone()
    b = torch.zeros(n_classes, dtype=dtype, device=x.device) if init is None else init[1].to(x).clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-12 if dtype == torch.float64 else 1e-9,
        history_size=10,  # scipy's default, which scikit-learn uses
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        # Loss and gradient in closed form (no autograd graph): softmax - onehot is the logits' gradient.
        with torch.no_grad():
            loss = 0.5 * lam * (w * w).sum()
            grad_w, grad_b = lam * w, torch.zeros_like(b)
            for start in range(0, n, chunk):
                xs, ys = x[start : start + chunk], y[start : start + chunk]
                log_p = torch.addmm(b, xs, w).log_softmax(1)
                loss -= log_p.gather(1, ys[:, None]).sum() / n
                residual = log_p.exp_()
                residual[torch.arange(len(ys), device=ys.device), ys] -= 1.0
                residual /= n
                grad_w.addmm_(xs.T, residual)
                grad_b += residual.sum(0)
            w.grad, b.grad = grad_w, grad_b
        if on_eval is not None:
            on_eval()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def _accuracy(features: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    predictions = torch.addmm(b, features.to(w), w).argmax(1)
    return 100.0 * (predictions == labels.to(predictions.device)).double().mean().item()


def stratified_split(
    labels: torch.Tensor, fraction: float = VAL_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: per class, a seeded shuffle; ``int(fraction * n)`` (at least 1) go to val.

    trex's ``split_trainval``; a class with fewer than 2 images cannot be split (`UsageError`).
    """
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    train, val = [], []
    for c in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == c)
        if len(idx) < 2:
            raise UsageError(f"class {int(c)} has {len(idx)} training image(s); a linear probe needs at least 2")
        rng.shuffle(idx)
        n_val = max(1, int(len(idx) * fraction))
        train.append(idx[:-n_val])
        val.append(idx[-n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def select_regularisation(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_val: torch.Tensor,
    labels_val: torch.Tensor,
    n_classes: int,
    grid: Sequence[float] | None = None,
    refine: bool = True,
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None,
    **fit_kw,
) -> tuple[float, float, dict[float, float]]:
    """The ``C`` with the best validation top-1: ``(C, val_top1, {C: val_top1})``.

    ``grid`` defaults to one ``C`` per decade over trex's range; with ``refine`` the half-decades on
    either side of the best (within the grid's range) are tried too. Fits go from strong to weak
    regularisation, each warm-started from the nearest solution so far; ties go to the smaller ``C``
    (stronger regularisation). ``solutions``, if given, receives each fit's ``(W, b)``.
    """
    if grid is None:
        lo, hi = (round(math.log10(v)) for v in C_RANGE)
        grid = [10.0**e for e in range(lo, hi + 1)]
    scores: dict[float, float] = {}
    solutions = {} if solutions is None else solutions

    def score(values: Sequence[float]) -> None:
        for C in sorted(values):
            if C in scores:
                continue
            nearest = min(solutions, key=lambda k: abs(math.log(k / C)), default=None)
            init = solutions[nearest] if nearest is not None else None
            solutions[C] = fit_logistic(features_train, labels_train, n_classes, C, init=init, **fit_kw)
            scores[C] = _accuracy(features_val, labels_val, *solutions[C])

    def best() -> float:
        return max(sorted(scores), key=lambda C: scores[C])  # max keeps the first (smallest C) of ties

    score(grid)
    if refine and len(grid) > 1:
        step = math.sqrt(sorted(grid)[1] / sorted(grid)[0])
        C = best()
        score([c for c in (C / step, C * step) if min(grid) <= c <= max(grid)])
    C = best()
    return C, scores[C], dict(sorted(scores.items()))


def linear_probe(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_test: torch.Tensor,
    labels_test: torch.Tensor,
    seed: int = 0,
    grid: Sequence[float] | None = None,
    **fit_kw,
) -> ProbeResult:
    """The whole protocol on extracted features: choose C on a 20% split, refit on all, score the test set."""
    labels_train, labels_test = labels_train.long(), labels_test.long()
    n_classes = int(max(labels_train.max(), labels_test.max())) + 1
    absent = set(labels_test.unique().tolist()) - set(labels_train.unique().tolist())
    if absent:
        raise UsageError(f"the test split has {len(absent)} class(es) with no training image, e.g. label {min(absent)}")
    mean = features_train.float().mean(0)
    x_train, x_test = features_train - mean.to(features_train), features_test - mean.to(features_test)
    train_idx, val_idx = stratified_split(labels_train, VAL_FRACTION, seed)
    device = x_train.device
    tr, va = torch.as_tensor(train_idx, device=device), torch.as_tensor(val_idx, device=device)
    y_train = labels_train.to(device)
    # Centre on the train part only while selecting, as if val were unseen.
    sub_mean = x_train[tr].mean(0)
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    C, val_top1, _ = select_regularisation(
        x_train[tr] - sub_mean,
        y_train[tr],
        x_train[va] - sub_mean,
        y_train[va],
        n_classes,
        grid,
        True,
        solutions,
        **fit_kw,
    )
    # The refit starts from the chosen fit on 80% of the images: the same convex problem's optimum, sooner.
    w, b = fit_logistic(x_train, y_train, n_classes, C, init=solutions[C], **fit_kw)
    top1 = _accuracy(x_test, labels_test, w, b)
    return ProbeResult(top1, C, val_top1, len(labels_train), len(labels_test), n_classes)


# -- a whole probe from a model and a dataset --------------------------------------------------


def per_class_subset(labels: Sequence[int], per_class: int, seed: int = 0) -> list[int]:
    """Indices of at most ``per_class`` images of each class, drawn with a fixed seed, in order."""
    rng = np.random.default_rng(seed)
    labels_np = np.asarray(labels)
    keep = []
    for c in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == c)
        keep.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return sorted(int(i) for i in np.concatenate(keep))


def summarise(results: list[ProbeResult], seconds: float) -> dict:
    """Mean/std over seeds as one JSON-ready dict."""
    top1 = np.array([r.top1 for r in results])
    return {
        "top1": float(top1.mean()),
        "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
        "C": [r.C for r in results],
        "val_top1": [r.val_top1 for r in results],
        "n_train": results[0].n_train,
        "n_test": results[0].n_test,
        "n_classes": results[0].n_classes,
        "seeds": len(results),
        "seconds": seconds,
        "runs": [asdict(r) for r in results],
    }


def probe_features(
    features_train: torch.Tensor,
    labels_train: Sequence[int],
    features_test: torch.Tensor,
    labels_test: Sequence[int],
    seeds: int = 1,
    **probe_kw,
) -> list[ProbeResult]:
    """`linear_probe` for seeds 0..seeds-1 on features already extracted."""
    y_train = torch.as_tensor(list(labels_train), device=features_train.device)
    y_test = torch.as_tensor(list(labels_test), device=features_test.device)
    return [linear_probe(features_train, y_train, features_test, y_test, seed=s, **probe_kw) for s in range(seeds)]


def evaluate_probe(
    model_or_net: torch.nn.Module,
    name: str,
    root: str,
    crop: int = 224,
    batch_size: int = 256,
    workers: int = 4,
    subset: int | None = None,
    seeds: int = 1,
    device: torch.device | str | None = None,
    resize: int | None = None,
) -> dict:
    """Tab. 2 for one dataset: extract train/test features once, probe with ``seeds`` validation splits.

    ``name`` is a `streamgen.evaluate.transfer` dataset name, ``root`` the user's copy; ``device`` (default: where
    the model is) runs the extraction and the solver; ``resize`` (default: ``crop``, as trex) is the
    size of the shorter side before the centre crop; ``subset`` keeps at most that many images per
    class of each split (fixed seed), for quick probes. Returns the `summarise` dict plus ``dataset``
    and ``root``: ``top1`` (mean over seeds), ``top1_std``, ``C`` (per seed), ``n_train``, ``n_test``,
    ``n_classes``, ``seconds`` (extraction and fits).
    """
    from streamgen.evaluate.transfer import load_transfer

    start = time.monotonic()
    if device is not None:
        model_or_net.to(device)
    splits = load_transfer(name, root, probe_transform(crop, resize))
    train, test = splits.train, splits.test
    if subset:
        train = Subset(train, per_class_subset(train.targets, subset))
        test = Subset(test, per_class_subset(test.targets, subset))
    train_labels = dataset_targets(train)
    test_labels = dataset_targets(test)
    x_train = extract_features(model_or_net, train, batch_size, workers, device)
    x_test = extract_features(model_or_net, test, batch_size, workers, device)
    results = probe_features(x_train, train_labels, x_test, test_labels, seeds)
    return {"dataset": name, "root": str(root), **summarise(results, time.monotonic() - start)}


def dataset_targets(dataset: Dataset) -> list[int]:
    """The labels of a dataset with ``targets`` (or a `Subset` of one), without reading any image."""
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.targets)


def check_probe_arch(arch: str) -> None:
    """UsageError unless torchvision's ``arch`` has the ``avgpool`` the probe reads (built on the meta device: free)."""
    import torchvision

    with torch.device("meta"):
        _network(torchvision.models.get_model(arch, weights=None, num_classes=2))
