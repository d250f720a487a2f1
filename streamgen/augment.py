"""Training augmentation on the trainer's device, for whole batches; and the eval transform.

`train_augment` is torchvision's RandomResizedCrop + RandomHorizontalFlip + Normalize with a
different crop for every image, vectorised: one `roi_align` call crops and resizes the whole
batch (its adaptive sampling averages over each output cell, so downscaling is antialiased),
with no per-sample Python on the hot path.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str = "cpu",
    tries: int = 10,
) -> torch.Tensor:
    """``[n, 4]`` crop boxes (x1, y1, x2, y2) drawn as `RandomResizedCrop.get_params` draws them."""
    area = height * width
    target = area * torch.empty(n, tries, device=device).uniform_(*scale)
    log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    # Fallback as torchvision: the central crop with the ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    rows = torch.arange(n, device=device)
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw), device=device))
    h = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh), device=device))
    x = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    y = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    x = torch.where(first >= 0, x, torch.full_like(x, (width - fw) // 2))
    y = torch.where(first >= 0, y, torch.full_like(y, (height - fh) // 2))
    return torch.stack([x, y, x + w, y + h], dim=1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def train_augment(images: torch.Tensor, crop: int, min_scale: float = 0.08) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> normalised float ``[B, 3, crop, crop]``, random crop and flip per image."""
    n, _, height, width = images.shape
    x = images.float().div_(255)
    boxes = random_resized_boxes(n, height, width, (min_scale, 1.0), device=images.device)
    rois = torch.cat([torch.arange(n, device=images.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
    x = roi_align(x, rois, output_size=crop, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = torch.rand(n, device=images.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return normalize(x)


def eval_transform(crop: int = 224) -> v2.Compose:
    """The standard ImageNet evaluation: resize to crop/0.875, centre crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(round(crop / 0.875)), antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
