"""Training augmentation on the trainer's device, for whole batches; and the eval transform.

Two recipes, chosen by `build_augment` from ``train.augment``:

- ``single``: `train_augment`, torchvision's RandomResizedCrop + RandomHorizontalFlip +
  Normalize with a different crop for every image, vectorised: one `roi_align` call crops and
  resizes the whole batch (its adaptive sampling averages over each output cell, so downscaling
  is antialiased). Returns one normalised float tensor ``[B, 3, crop, crop]``.
- ``multicrop``: `MultiCrop`, the multi-crop recipe of t-ReX (naver/trex ``multi_crop.py``,
  itself DINO's): G global and L local crops per image, each with its own bicubic resized crop,
  flip, colour jitter, grayscale, Gaussian blur and (globals only) solarisation. Built from
  kornia augmentations and a batched colour jitter, which draw every parameter per image for
  the whole batch at once on the batch's device. Returns a list with **one tensor per resolution, globals first**:
  ``[G*B, 3, g, g]`` then ``[L*B, 3, l, l]`` (no local tensor when L = 0). Rows are crop-major:
  row ``k*B + i`` is crop k of image i, so the labels of a group of N crops are
  ``labels.repeat(N)``.

Neither recipe runs per-sample Python or reads anything back to the host on the hot path,
with one exception noted in `MultiCrop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import kornia.augmentation as K
import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2

from streamgen.config import TrainConfig, local_crop_size, parse_range

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("single", "multicrop")
BLUR_SIGMA = (0.1, 2.0)  # t-ReX's GaussianBlur radius range, in output pixels
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize default: pixels >= 128 are inverted

Augment = Callable[[torch.Tensor], "torch.Tensor | list[torch.Tensor]"]


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


# -- multi-crop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropGroup:
    """How one group of same-size crops is made (t-ReX's ``global_tfm`` or ``local_tfm``)."""

    count: int
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def blur_kernel_size(size: int, sigma_max: float = BLUR_SIGMA[1]) -> int:
    """Odd Gaussian kernel covering +-3 sigma, shrunk for tiny crops (reflect padding needs radius < size)."""
    radius = min(math.ceil(3 * sigma_max), size - 1)
    return 2 * max(radius, 0) + 1


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` luma of ``[N, 3, H, W]`` RGB, with torchvision's weights."""
    return torch.einsum("nchw,c->nhw", x, x.new_tensor(GRAY_WEIGHTS)).unsqueeze(1)


def shift_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image's HSV hue by ``turns[i]`` (torchvision's adjust_hue, per image, for a batch).

    Value (max) and chroma (max - min) are kept; the hue, in sextants, is read from which
    channel holds the max and written back with the closed-form HSV -> RGB formula
    ``f(n) = V - C * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6`` for n = 5, 3, 1.
    In place on temporaries: on a CPU, allocating them costs as much as the arithmetic.
    """
    value, argmax = x.max(1)
    chroma = x.amin(1).neg_().add_(value)
    # hue * chroma, in sextants: g - b (red max), b - r + 2C (green max), r - g + 4C (blue max)
    differences = x.roll(-1, 1).sub_(x.roll(-2, 1))
    sextant = differences.gather(1, argmax.unsqueeze(1)).squeeze(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # gray pixels: any hue, chroma 0
    sextant.div_(safe).add_(argmax.mul(2)).add_(6 * turns.view(-1, 1, 1)).remainder_(6)
    k = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1).add(sextant.unsqueeze(1)).remainder_(6)
    k = torch.minimum(k, 4 - k).clamp_(0, 1).mul_(chroma.unsqueeze(1))
    return k.neg_().add_(value.unsqueeze(1))


class RandomColorJitter(torch.nn.Module):
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` for a batch: every factor per image.

    Hand-written rather than kornia's ColorJitter, which computes the same steps (torchvision's
    definitions) but about 2x slower in its hue step, the bulk of the whole recipe's time, and
    reads its factors back to the host in random-order mode. The four steps run in an order drawn
    per batch from torch's CPU generator (no device sync; torchvision draws it per image).
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float) -> None:
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p
        self.params: dict = {}  # the last call's draws (as kornia's ``_params``)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1, device=like.device, dtype=like.dtype).uniform_(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = self._uniform(n, 1 - self.brightness, 1 + self.brightness, x)
        c = self._uniform(n, 1 - self.contrast, 1 + self.contrast, x)
        s = self._uniform(n, 1 - self.saturation, 1 + self.saturation, x)
        h = self._uniform(n, -self.hue, self.hue, x).view(n)
        apply = torch.rand(n, 1, 1, 1, device=x.device) < self.p
        order = torch.randperm(4).tolist()  # CPU generator: no device sync
        self.params = {"brightness": b, "contrast": c, "saturation": s, "hue": h, "apply": apply, "order": order}
        return torch.where(apply, color_jitter(x, b, c, s, h, order), x)


def color_jitter(
    x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: torch.Tensor, order: list[int]
) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation and hue adjustments with per-image factors
    (``[N, 1, 1, 1]``; hue ``[N]`` in turns), in ``order`` (0..3 in that list), each clamped to [0, 1]."""
    steps = [
        lambda y: (y * b).clamp_(0, 1),
        lambda y: torch.lerp(grayscale(y).mean((2, 3), keepdim=True), y, c).clamp_(0, 1),
        lambda y: torch.lerp(grayscale(y), y, s).clamp_(0, 1),
        lambda y: shift_hue(y, h),
    ]
    for i in order:
        x = steps[i](x)
    return x


class ClampUnit(torch.nn.Module):
    """Clamp to [0, 1]: bicubic resampling overshoots at edges, where torchvision's uint8 path saturates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0, 1)


def crop_pipeline(group: CropGroup) -> torch.nn.Sequential:
    """One kornia pipeline for a group: every parameter drawn per image, on the input's device."""
    steps = [
        # resample: one warp for the whole batch (slice mode would read each box back to the host)
        K.RandomResizedCrop((group.size, group.size), scale=group.scale, resample="bicubic", cropping_mode="resample"),
        ClampUnit(),
        K.RandomHorizontalFlip(p=0.5),
        RandomColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if group.blur_p > 0:
        k = blur_kernel_size(group.size)
        steps.append(K.RandomGaussianBlur((k, k), BLUR_SIGMA, p=group.blur_p))
    if group.solarize_p > 0:
        steps.append(K.RandomSolarize(thresholds=(SOLARIZE_THRESHOLD,) * 2, additions=(0.0, 0.0), p=group.solarize_p))
    return torch.nn.Sequential(*steps)


class MultiCrop(torch.nn.Module):
    """uint8 ``[B, 3, H, W]`` -> ``[globals [G*B, 3, g, g], locals [L*B, 3, l, l]]``, normalised.

    The t-ReX recipe (naver/trex ``multi_crop.py``): bicubic RandomResizedCrop, flip (p 0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2), Gaussian blur (sigma 0.1-2
    px), solarise (globals only). Blur probabilities: 1.0 on global crops and 0.5 on local
    ones, as the project's recipe issue specifies (DINO's first global view; naver/trex's
    ``multi_crop.py`` uses 0.2 on its global crop: pass ``global_blur_p=0.2`` for that). Each group of crops is one call on the
    images repeated ``count`` times, so every crop of every image draws its own parameters.
    kornia does the crop, flip, grayscale, blur and solarisation; the colour jitter is
    `RandomColorJitter`. Differences from the per-image torchvision recipe: the jitter steps'
    order is drawn per batch, not per image; the crop is resampled without antialiasing (the
    recipe's crops shrink the image by at most ~1.4x at 256 px); and kornia's blur checks its
    sigmas on the host (one device sync per blur call).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        global_crops: int = 1,
        local_crops: int = 8,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        global_blur_p: float = 1.0,
        local_blur_p: float = 0.5,
        solarize_p: float = 0.2,
    ) -> None:
        super().__init__()
        self.groups = [CropGroup(global_crops, global_size, global_scale, global_blur_p, solarize_p)]
        if local_crops > 0:
            self.groups.append(CropGroup(local_crops, local_size, local_scale, local_blur_p, 0.0))
        self.pipelines = torch.nn.ModuleList(crop_pipeline(g) for g in self.groups)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div_(255)
        if self.pipelines[0][0].device != x.device:
            self.to(x.device)  # kornia draws its parameters on the device its modules were moved to
        out = []
        for group, pipeline in zip(self.groups, self.pipelines):
            # Crop-major rows: row k*B + i is crop k of image i (labels: labels.repeat(count)).
            repeated = x.repeat(group.count, 1, 1, 1) if group.count > 1 else x
            out.append(normalize(pipeline(repeated)))
        return out


# -- the entry point ----------------------------------------------------------------------------


def build_augment(train: TrainConfig) -> Augment:
    """The batch augmentation of the ``train`` config section (see the module docstring for outputs)."""
    if train.augment == "single":  # (config.validate has checked every value)
        return partial(train_augment, crop=train.crop, min_scale=train.min_scale)
    if train.augment == "multicrop":
        return MultiCrop(
            global_size=train.crop,
            local_size=local_crop_size(train),
            global_crops=train.global_crops,
            local_crops=train.local_crops,
            global_scale=parse_range(train.global_scale, "train.global_scale"),
            local_scale=parse_range(train.local_scale, "train.local_scale"),
        )
    raise ValueError(f"unknown augmentation {train.augment!r}: expected one of {', '.join(AUGMENTATIONS)}")


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
