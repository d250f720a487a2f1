import math

import lightning
import pytest
import torch
from conftest import read_scalars
from torch import nn

from streamgen.train.augment import MultiCrop
from streamgen.train.model import Classifier, L2Norm, TrexHead, lr_factor, topk_correct


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 1, 0])
    top1, top5 = topk_correct(logits, labels)
    assert int(top1) == 1 and int(top5) == 3  # top-5 capped at the 3 classes


def lrs_of(model: Classifier, steps: int) -> tuple[list[float], torch.optim.Optimizer]:
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer


def test_schedule_warms_up_then_decays_to_min_lr_at_the_last_step():
    model = Classifier("resnet18", ["a", "b"], lr=1.0, warmup_steps=10, max_steps=110, min_lr=1e-6)
    lrs, optimizer = lrs_of(model, 110)
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])  # linear warm-up to the peak
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # then only down
    assert after[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1e-6, abs=1e-12)
    # halfway through the decay: the cosine's midpoint between the peak and min_lr
    assert lrs[10 + 50] == pytest.approx(1e-6 + (1 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert lr_factor(10_000, 10, 110, 1e-6) == pytest.approx(1e-6)  # past the end: stays at min_lr


def test_sgd_momentum_and_no_weight_decay_on_biases_and_norms():
    model = Classifier("resnet18", ["a", "b"], head="trex", weight_decay=1e-4)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["momentum"] == 0.9 and not decay["nesterov"]
    norms_and_biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == norms_and_biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # the head's too


def test_trex_head_follows_trex_layer_order():
    head = TrexHead(512, 10)
    kinds = [type(m) for m in head.projector]
    assert kinds == [L2Norm] + [nn.Linear, nn.BatchNorm1d, nn.GELU] * 3 + [nn.Linear]
    hidden = [m for m in head.projector if isinstance(m, nn.Linear)]
    assert [m.out_features for m in hidden] == [2048, 2048, 2048, 256]
    assert hidden[-1].bias is None and head.classifier.fc.bias is None and head.classifier.tau == 0.1


def test_trex_head_shapes_and_cosine_logits_bounded_by_inverse_temperature():
    torch.manual_seed(0)
    head = TrexHead(64, 7)
    logits = head(torch.randn(32, 64) * 100)
    assert logits.shape == (32, 7)
    assert logits.abs().max() <= 1 / 0.1 + 1e-4
    # a feature equal to a class weight scores exactly 1/tau for that class
    aligned = head.classifier(head.classifier.fc.weight[:3].detach() * 5)
    torch.testing.assert_close(aligned.diagonal(), torch.full((3,), 10.0))


@pytest.mark.parametrize("head", ["linear", "trex"])
def test_features_are_the_pooled_backbone_output_before_the_head(head):
    torch.manual_seed(0)
    model = Classifier("resnet18", list("abcde"), head=head).eval()
    images = torch.randn(4, 3, 32, 32)
    pooled = []
    handle = model.net.avgpool.register_forward_hook(lambda m, a, out: pooled.append(out.flatten(1)))
    with torch.no_grad():
        features = model.features(images)
        logits = model(images)
    handle.remove()
    assert features.shape == (4, 512)
    torch.testing.assert_close(features, pooled[0])
    last = model.net.fc if head == "linear" else model.head
    torch.testing.assert_close(logits, last(features))


@pytest.mark.parametrize("head", ["linear", "trex"])
def test_grouped_forward_equals_separate_forwards_per_resolution(head):
    torch.manual_seed(0)
    model = Classifier("resnet18", list("abc"), head=head).eval()  # eval: BatchNorm independent of the batch
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    passes = []
    handle = model.net.register_forward_hook(lambda m, a, out: passes.append(a[0].shape))
    with torch.no_grad():
        grouped = model.forward_crops(crops)
        separate = torch.cat([model(c) for c in crops])
    handle.remove()
    assert passes[:2] == [(4, 3, 32, 32), (4, 3, 16, 16)]  # one backbone pass per resolution
    torch.testing.assert_close(grouped, separate, atol=1e-5, rtol=1e-4)


def coloured_batch(n: int, seed: int) -> dict:
    """A learnable batch: class 0 dark red, class 1 bright blue, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.tensor([[60, 10, 10], [40, 60, 220]], dtype=torch.float32)[labels].view(n, 3, 1, 1)
    images = (base + torch.randn(n, 3, 24, 24, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    return {"image": images, "label": labels}


@pytest.fixture
def one_thread():
    """Small tensors gain nothing from intra-op threads, and on a busy machine threads that spin
    waiting for each other make this test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_multicrop_trex_training_step_learns(one_thread):
    torch.manual_seed(0)
    model = Classifier("resnet18", ["a", "b"], lr=0.02, warmup_steps=1, max_steps=100, head="trex")
    model.log = lambda *a, **k: None
    augment = MultiCrop(24, 10, global_crops=1, local_crops=2)
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for step in range(12):
        batch = coloured_batch(16, seed=step)
        loss = model.training_step({"image": augment(batch["image"]), "label": batch["label"]}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sorted(losses[-6:])[3] < 0.5 * losses[0], losses  # the median of the last steps: one hard batch may spike
    with torch.no_grad():  # batch statistics: 12 steps are too few for BatchNorm's running ones
        test = coloured_batch(32, seed=99)
        logits = model(MultiCrop(24, 10, local_crops=0)(test["image"])[0])
    assert (logits.argmax(1) == test["label"]).float().mean() >= 0.9


def test_loss_averages_over_crops_with_the_label_repeated():
    torch.manual_seed(0)
    model = Classifier("resnet18", ["a", "b", "c"]).eval()
    logged = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    crops = [torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]  # 1 global + 2 local crops of 4 images
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        loss = model.training_step({"image": crops, "label": labels}, 0)
        per_crop = [
            nn.functional.cross_entropy(model(crops[0]), labels),
            nn.functional.cross_entropy(model(crops[1][:4]), labels),
            nn.functional.cross_entropy(model(crops[1][4:]), labels),
        ]
        top1 = (model(crops[0]).argmax(1) == labels).float().mean()
    torch.testing.assert_close(loss, torch.stack(per_crop).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logged["train/top1_stream"], top1)  # on the global crops only


@pytest.mark.parametrize("hparams", [{"head": "trex"}, {"head": "trex-ocm", "memory_size": 32}, {}])
def test_checkpoint_round_trip_keeps_the_head(tmp_path, hparams):
    """eval.py's load_from_checkpoint rebuilds the head from hparams; checkpoints without one are linear."""
    torch.manual_seed(0)
    model = Classifier("resnet18", ["a", "b"], **hparams).eval()
    saved = dict(model.hparams)
    if not hparams:  # a checkpoint from before the head existed
        saved.pop("head"), saved.pop("min_lr")
    path = tmp_path / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": saved,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    loaded = Classifier.load_from_checkpoint(str(path), weights_only=True).eval()
    assert loaded.hparams.head == hparams.get("head", "linear")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


@pytest.mark.long  # the OCM head: the test_model unit tests; multi-crop end to end: test_learning (long)
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_py_with_multicrop_and_trex_ocm_head_completes(train_run, tmp_path):
    run = train_run(
        "--model", "fake", "--generators", "1", "--trainers", "1", "--train.augment", "multicrop",
        "--train.head", "trex-ocm", "--train.memory_size", "64", "--train.max_steps", "6", "--train.log_every", "2",
        "--train.checkpoint_every", "6", "--train.preview_every", "3",
    )  # fmt: skip
    assert run.wait(240) == 0, run.output[-3000:]
    folder = next((tmp_path / "runs" / "smoke").iterdir())
    scalars = read_scalars(folder)
    assert max(step for step, _ in scalars["train/loss"]) >= 5
    from streamgen.evaluate.benchmark_eval import load_classifier

    model = load_classifier(folder / "checkpoints" / "last.ckpt", torch.device("cpu"))
    assert model.hparams.head == "trex-ocm" and model.hparams.label_smoothing == 0.0
    assert int(model.head.memory.ptr) == 6 * 8 % 64  # 6 steps of 8 first global crops entered the memory
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # logits against the 10 prototypes


def test_recipe_checks_before_anything_starts():
    from streamgen.config import TrainConfig
    from streamgen.errors import UsageError
    from streamgen.launch.checks import check_recipe

    check_recipe(TrainConfig(head="trex", arch="vit_b_16"), "cpu")  # heads.head is its final linear
    with pytest.raises(UsageError, match="squeezenet1_0 has none"):
        check_recipe(TrainConfig(head="trex", arch="squeezenet1_0"), "gpu")  # a convolutional classifier
    with pytest.raises(UsageError, match="sync_batchnorm needs GPUs"):
        check_recipe(TrainConfig(sync_batchnorm=True), "cpu", world=2)
    check_recipe(TrainConfig(sync_batchnorm=True), "cpu", world=1)  # one rank: plain BatchNorm (paper configs)


# -- trex-ocm: t-ReX's class prototypes from a memory (naver/trex trex.py, Memory) -----------------


def test_prototype_memory_by_hand():
    from streamgen.train.model import PrototypeMemory

    memory = PrototypeMemory(dim=2, size=4, num_classes=3)
    memory.features.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -1.0]]))
    memory.labels.copy_(torch.tensor([0, 0, 1, 1]))
    # class 0: (1,0) + (3,0) = (4,0) -> (1,0); class 1: (0,2) + (0,-1) = (0,1); class 2: none -> 0
    assert torch.allclose(memory.class_weights(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    memory.update(torch.tensor([[5.0, 5.0], [6.0, 6.0]]), torch.tensor([2, 2]))  # first in, first out
    assert memory.features[:2].tolist() == [[5.0, 5.0], [6.0, 6.0]] and int(memory.ptr) == 2
    memory.update(torch.tensor([[7.0, 0.0], [8.0, 0.0], [9.0, 0.0]]), torch.tensor([1, 1, 1]))
    # past the end: cut there (t-ReX drops the rest), the next write starts at 0
    assert memory.features.tolist() == [[5.0, 5.0], [6.0, 6.0], [7.0, 0.0], [8.0, 0.0]] and int(memory.ptr) == 0
    assert memory.labels.tolist() == [2, 2, 1, 1]
    assert torch.allclose(memory.class_weights(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.7071, 0.7071]]), atol=1e-4)


def test_ocm_logits_are_cosines_to_the_prototypes_before_the_step_and_the_memory_takes_the_ema_features():
    from streamgen.train.model import OcmHead

    torch.manual_seed(0)
    model = Classifier("resnet18", ["a", "b", "c"], head="trex-ocm", memory_size=16)
    head = model.head
    assert isinstance(head, OcmHead) and head.memory.features.shape == (16, 256)
    assert all(not p.requires_grad for p in [*head.backbone_ema.parameters(), *head.projector_ema.parameters()])
    optimizer = model.configure_optimizers()["optimizer"]  # the EMA copy is not optimised
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(
        {id(p) for p in head.backbone_ema.parameters()}
    )
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    before = head.memory.class_weights().clone()
    model.train()
    with torch.no_grad():
        features = F_normalize(head.projector(model.net(images)))
        assert torch.allclose(model.forward_crops(images), features @ before.t() / 0.1, atol=1e-5)  # cos / tau
    live = [p.detach().clone() for p in model.net.parameters()]
    ema_before = [p.clone() for p in head.backbone_ema.parameters()]
    for p in model.net.parameters():  # the live network has moved away from its EMA copy
        p.data.add_(0.5)
    loss = model.training_step({"image": images, "label": labels}, 0)
    assert torch.isfinite(loss)
    for ema, old, p in zip(head.backbone_ema.parameters(), ema_before, live):  # ema = 0.999 ema + 0.001 live
        assert torch.allclose(ema, 0.999 * old + 0.001 * (p + 0.5), atol=1e-6)
    assert int(head.memory.ptr) == 4 and head.memory.labels[:4].tolist() == [0, 1, 2, 1]
    with torch.no_grad():
        written = head.projector_ema(head.backbone_ema(images))
    assert torch.allclose(head.memory.features[:4], written, atol=1e-5)
    assert not torch.equal(head.memory.class_weights(), before)  # the next step sees the new prototypes


def F_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)
