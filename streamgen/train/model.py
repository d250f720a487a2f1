"""The classifier: a torchvision model trained from scratch, as a LightningModule.

Two heads on the torchvision backbone (``train.head``):

- ``linear``: the network's own final linear layer (today's default);
- ``trex``: t-ReX's head (naver/trex ``trex.py``, the learnable-classifier variant): an MLP
  projector (optional L2-normalised input, 3 hidden layers of Linear-BatchNorm-GELU of width
  2048, a 256-d bottleneck without bias) and a cosine-softmax classifier with temperature 0.1.
- ``trex-ocm``: t-ReX's default model (``main.py --memory_size 8192``; its README's "t-ReX"): the
  same projector, classified against class prototypes instead of learnt weights (`OcmHead`):
  each prototype is the L2-normalised sum of the features of that class in a memory of
  ``memory_size`` features, filled first-in first-out with the projected features of every step's
  first global crops from an EMA copy (momentum 0.999) of the backbone and projector, gathered
  over every rank. The prototypes carry no gradient; the memory starts random, as t-ReX's.

Training batches arrive already augmented (see `streamgen.train.augment`): one tensor, or a list of
multi-crop tensors (one per resolution, or one per crop). The backbone runs once per
resolution (as DINO/t-ReX's MultiCropWrapper), the head once on all crops' features, the label
is repeated for every crop and the loss averaged over all of them. Evaluation (`forward`)
gives class logits; `features` gives the backbone's pooled features, before any head: what
linear probes read.

Optimisation (t-ReX's): SGD with momentum, no weight decay on biases and norms, a linear
warm-up then a cosine decay to ``min_lr``, per step. Validation batches are real images:
top-1 and top-5 are logged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

HEADS = ("linear", "trex", "trex-ocm")


def build_network(arch: str, num_classes: int) -> nn.Module:
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def classifier_path(net: nn.Module) -> str:
    """Dotted name of the network's final linear layer (``fc`` for ResNets, ``heads.head`` for ViTs, ...)."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no final linear layer to put a head in place of")
    return linears[-1]


def replace_module(net: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``net``; return what was there."""
    parent_path, _, leaf = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    old = parent.get_submodule(leaf)
    setattr(parent, leaf, module)
    return old


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is in the top k, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, : min(k, logits.shape[1])].any(1).sum() for k in ks]


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class CosineClassifier(nn.Module):
    """Logits ``cos(x, w_c) / tau``: L2-normalised features against L2-normalised class weights."""

    def __init__(self, in_dim: int, num_classes: int, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau
        self.fc = nn.Linear(in_dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.fc.weight, dim=1).t() / self.tau


def trex_projector(
    in_dim: int, input_l2_norm: bool = True, hidden_layers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256
) -> nn.Sequential:
    """t-ReX's MLP projector, in its layer order and with its init (naver/trex ``trex.py``)."""
    layers: list[nn.Module] = [L2Norm()] if input_l2_norm else []
    width = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
        width = hidden_dim
    layers.append(nn.Linear(width, bottleneck_dim, bias=False))
    projector = nn.Sequential(*layers)
    for m in projector.modules():  # t-ReX's init_weights (the projector only)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return projector


class TrexHead(nn.Module):
    """t-ReX's projector + cosine classifier (naver/trex ``trex.py``, ``memory_size 0``)."""

    def __init__(self, in_dim: int, num_classes: int, bottleneck_dim: int = 256, tau: float = 0.1) -> None:
        super().__init__()
        self.projector = trex_projector(in_dim, bottleneck_dim=bottleneck_dim)
        self.classifier = CosineClassifier(bottleneck_dim, num_classes, tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(x))


class PrototypeMemory(nn.Module):
    """t-ReX's memory bank: ``size`` features and their labels, written first-in first-out.

    As naver/trex's ``Memory``: it starts with random features (standard normal) and random
    labels; a class's prototype is the L2-normalised sum of its features in the memory (a class
    with none has a zero prototype); a batch that would run past the end is cut there, and the
    next write starts again at the beginning.
    """

    def __init__(self, dim: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("features", torch.randn(size, dim))
        self.register_buffer("labels", torch.randint(0, num_classes, (size,)))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def class_weights(self) -> torch.Tensor:
        """``[classes, dim]`` L2-normalised class prototypes."""
        weights = torch.zeros(self.num_classes, self.features.shape[1], device=self.features.device)
        weights.index_add_(0, self.labels, self.features.float())
        return F.normalize(weights, dim=1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        size, ptr = len(self.features), int(self.ptr)
        features, labels = features[: size - ptr], labels[: size - ptr]  # what fits before the end
        n = len(features)
        self.features[ptr : ptr + n] = features.to(self.features.dtype)
        self.labels[ptr : ptr + n] = labels
        self.ptr[0] = (ptr + n) % size


class OcmHead(nn.Module):
    """t-ReX's projector classified against `PrototypeMemory` prototypes, at temperature ``tau``.

    The memory is written (`update_memory`) with an EMA copy of the backbone and projector, made
    from ``backbone`` when the head is built; the prototypes a step's logits use are those before
    its own features enter the memory (as t-ReX's forward)."""

    def __init__(
        self,
        backbone: nn.Module,
        in_dim: int,
        num_classes: int,
        memory_size: int = 8192,
        bottleneck_dim: int = 256,
        tau: float = 0.1,
        ema_momentum: float = 0.999,
    ) -> None:
        super().__init__()
        self.tau, self.ema_momentum = tau, ema_momentum
        self.projector = trex_projector(in_dim, bottleneck_dim=bottleneck_dim)
        self.memory = PrototypeMemory(bottleneck_dim, memory_size, num_classes)
        self.backbone_ema = copy.deepcopy(backbone)  # starts equal to the network, as t-ReX's model_ema
        self.projector_ema = copy.deepcopy(self.projector)
        for p in (*self.backbone_ema.parameters(), *self.projector_ema.parameters()):
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.memory.class_weights().to(x.dtype)
        return F.normalize(self.projector(x), dim=1) @ w.t() / self.tau

    @torch.no_grad()
    def update_memory(
        self,
        backbone: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """One t-ReX memory step: EMA of ``backbone`` + projector, then the EMA model's features of
        ``images`` (the first global crops) and ``labels`` enter the memory, every rank's (``gather``:
        ``[world, B, ...]`` or ``[B, ...]``) in rank order, so every rank holds the same memory."""
        m = self.ema_momentum
        pairs = (
            *zip(backbone.parameters(), self.backbone_ema.parameters()),
            *zip(self.projector.parameters(), self.projector_ema.parameters()),
        )
        for live, ema in pairs:
            ema.mul_(m).add_(live.detach(), alpha=1 - m)
        features = self.projector_ema(self.backbone_ema(images))
        if gather is not None:
            features, labels = gather(features), gather(labels)
            features, labels = features.reshape(-1, features.shape[-1]), labels.reshape(-1)
        self.memory.update(features, labels)


def group_by_resolution(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive crops of one size concatenated: one backbone pass per size (DINO's MultiCropWrapper)."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [g[0] if len(g) == 1 else torch.cat(g) for g in groups]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR / peak LR at ``step``: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        label_smoothing: float = 0.0,
        class_fingerprint: str = "",
        head: str = "linear",
        min_lr: float = 1e-6,
        memory_size: int = 8192,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}: expected one of {', '.join(HEADS)}")
        self.save_hyperparameters()  # eval.py rebuilds the model and its labels from these
        self.net = build_network(arch, len(class_keys))
        self._classifier_path = classifier_path(self.net)
        self.head: nn.Module | None = None
        if head == "trex":  # the network ends at its pooled features; the head takes over
            fc = replace_module(self.net, self._classifier_path, nn.Identity())
            self.head = TrexHead(fc.in_features, len(class_keys))
        elif head == "trex-ocm":
            fc = replace_module(self.net, self._classifier_path, nn.Identity())
            self.head = OcmHead(self.net, fc.in_features, len(class_keys), memory_size)

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
            if isinstance(self.head, OcmHead):
                self.head.backbone_ema.to(memory_format=torch.channels_last)

    @staticmethod
    def _channels_last(images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
        """The network's output: class logits (linear head) or pooled features (trex heads)."""
        return self.net(self._channels_last(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, classes]`` (evaluation)."""
        out = self._backbone(images)
        return out if self.head is None else self.head(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``[B, D]``, before any head (what linear probes read)."""
        captured: list[torch.Tensor] = []
        layer = self.net.get_submodule(self._classifier_path)  # the final linear, or Identity under trex
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self._backbone(images)
        finally:
            handle.remove()
        return captured[0]

    def forward_crops(self, crops: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Logits for every row of every crop tensor, in order: one backbone pass per resolution."""
        if isinstance(crops, torch.Tensor):
            return self(crops)
        outputs = torch.cat([self._backbone(group) for group in group_by_resolution(list(crops))])
        # The head sees all crops at once, as in t-ReX: its BatchNorm statistics span every crop.
        return outputs if self.head is None else self.head(outputs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        logits = self.forward_crops(images)
        crops_per_image = logits.shape[0] // labels.shape[0]
        # Rows are crop-major (row k*B + i is crop k of image i): the labels repeat per crop.
        targets = labels.repeat(crops_per_image)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        if isinstance(self.head, OcmHead):  # t-ReX: only the first global crops update the memory
            first_crops = images if isinstance(images, torch.Tensor) else images[0]
            gather = self.all_gather if self._trainer is not None and self._trainer.world_size > 1 else None
            self.head.update_memory(self.net, self._channels_last(first_crops[: len(labels)]), labels, gather)
        # Top-1 on the first resolution (the global crops): comparable with single-crop runs.
        first = images.shape[0] if isinstance(images, torch.Tensor) else group_by_resolution(list(images))[0].shape[0]
        top1 = (logits[:first].argmax(1) == targets[:first]).float().mean()
        n = labels.shape[0]  # images, not crops (Lightning cannot infer it from a list of crops)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/top1_stream", top1, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels, *skipped = batch  # skipped: unreadable images left out (realdata.drop_unreadable)
        if skipped:
            self.log("val/skipped_images", float(len(skipped[0])), reduce_fx="sum", batch_size=1, sync_dist=True)
        if len(labels) == 0:
            return
        logits = self(images)
        top1, top5 = topk_correct(logits, labels)
        n = len(labels)
        self.log("val/top1", top1.float() / n, batch_size=n, sync_dist=True)
        self.log("val/top5", top5.float() / n, batch_size=n, sync_dist=True)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
        )
        warmup, total = self.hparams.warmup_steps, self.hparams.max_steps
        min_ratio = min(1.0, self.hparams.min_lr / self.hparams.lr) if self.hparams.lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
