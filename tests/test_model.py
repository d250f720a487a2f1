import torch

from streamgen.model import Classifier, topk_correct


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 1, 0])
    top1, top5 = topk_correct(logits, labels)
    assert int(top1) == 1 and int(top5) == 3  # top-5 capped at the 3 classes


def test_schedule_warms_up_then_decays():
    model = Classifier("resnet18", ["a", "b"], lr=1.0, warmup_steps=10, max_steps=110)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert abs(lrs[0] - 0.1) < 1e-9 and abs(lrs[9] - 1.0) < 1e-9
    assert lrs[60] < lrs[10] and lrs[-1] < 0.01
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # norms and biases


def test_training_step_learns_from_a_batch():
    torch.manual_seed(0)
    model = Classifier("resnet18", ["a", "b"], lr=0.05, warmup_steps=1, max_steps=10, label_smoothing=0.0)
    model.log = lambda *a, **k: None
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.tensor([0, 1] * 4)}
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(8):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
