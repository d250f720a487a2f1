"""The classifier: a torchvision model trained from scratch, as a LightningModule.

SGD with momentum, a linear warm-up then cosine decay per step, cross-entropy with label
smoothing. Batches arrive already augmented (see `stream.StreamDataModule`). Validation
batches are real images: top-1 and top-5 are logged.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
import torchvision


def build_network(arch: str, num_classes: int) -> torch.nn.Module:
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is in the top k, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, : min(k, logits.shape[1])].any(1).sum() for k in ks]


class Classifier(L.LightningModule):
    def __init__(
        self,
        arch: str,
        class_keys: list[str],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_steps: int = 2500,
        max_steps: int = 100000,
        label_smoothing: float = 0.1,
        class_fingerprint: str = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # eval.py rebuilds the model and its labels from these
        self.net = build_network(arch, len(class_keys))

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        top1 = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1_stream", top1, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        top1, top5 = topk_correct(logits, labels)
        n = len(labels)
        self.log("val/top1", top1.float() / n, batch_size=n, sync_dist=True)
        self.log("val/top5", top5.float() / n, batch_size=n, sync_dist=True)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=True,
        )
        warmup, total = self.hparams.warmup_steps, self.hparams.max_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
