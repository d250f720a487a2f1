"""Training augmentation on the trainer's device, for whole batches; and the eval transform.

Two recipes, chosen by `build_augment` from ``train.augment``:

- ``single``: `train_augment`, torchvision's RandomResizedCrop + RandomHorizontalFlip +
  Normalize with a different crop for every image, vectorised: one `roi_align` call crops and
  resizes the whole batch (its adaptive sampling averages over each output cell, so downscaling
  is antialiased). Returns one normalised float tensor ``[B, 3, crop, crop]``.
- ``multicrop``: `MultiCrop`, the multi-crop recipe of t-ReX (naver/trex ``multi_crop.py``,
  itself DINO's): G global and L local crops per image, each with its own bicubic resized crop,
  flip, colour jitter, grayscale, Gaussian blur and (globals only) solarisation, every parameter
  drawn per crop for the whole batch at once on the batch's device; per group of crops one
  bicubic ``grid_sample``, one batched colour matrix, one grouped blur convolution.
  Returns a list with **one tensor per resolution, globals first**:
  ``[G*B, 3, g, g]`` then ``[L*B, 3, l, l]`` (no local tensor when L = 0). Rows are crop-major:
  row ``k*B + i`` is crop k of image i, so the labels of a group of N crops are
  ``labels.repeat(N)``.

Neither recipe runs per-sample Python or reads anything back to the host on the hot path,
with one exception on a CPU noted in `MultiCrop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (t-ReX's ColorJitter)
JITTER_P = 0.8
RESAMPLE_MODES = ("bicubic", "bilinear")  # the recipe's is bicubic; bilinear costs ~1/3 of it on a CPU
GRAYSCALE_P = 0.2


def crop_grid(boxes: torch.Tensor, flip: torch.Tensor, size: int, height: int, width: int, batch: int) -> torch.Tensor:
    """``grid_sample`` grid ``[batch, count * size, size, 2]`` resizing each box (x1, y1, x2, y2) to ``size``.

    ``boxes``/``flip`` are crop-major (row k*batch + i: crop k of image i); image i's grid stacks its
    ``count`` crops vertically. Output pixel j's centre samples the box at ``x1 + (j + 0.5) * w / size
    - 0.5`` (torchvision's resize convention, align_corners=False); a flip negates the x scale: free.
    """
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1  # [-1, 1] centres
    x1, y1, x2, y2 = boxes.unbind(1)
    x_scale = ((x2 - x1) / width).where(~flip, (x1 - x2) / width)
    gx = ((x1 + x2) / width - 1)[:, None] + x_scale[:, None] * steps
    gy = ((y1 + y2) / height - 1)[:, None] + ((y2 - y1) / height)[:, None] * steps
    count = len(boxes) // batch
    grid = torch.empty(batch, count, size, size, 2, device=boxes.device, dtype=boxes.dtype)
    grid[..., 0] = gx.view(count, batch, 1, size).transpose(0, 1)
    grid[..., 1] = gy.view(count, batch, size, 1).transpose(0, 1)
    return grid.view(batch, count * size, size, 2)


def resample_crops(
    x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, mode: str = "bicubic"
) -> torch.Tensor:
    """Crops of float ``[B, 3, H, W]`` (``mode``: bicubic or bilinear): ``boxes``/``flip`` crop-major
    (row k*B + i: crop k of image i).

    Returns ``[B, 3, count, size * size]``: one ``grid_sample`` call samples all ``count`` crops of
    an image as one tall grid, so the image is never repeated in memory.
    """
    b, _, height, width = x.shape
    grid = crop_grid(boxes, flip, size, height, width, b)
    out = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.view(b, 3, len(boxes) // b, size * size)


def hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """``[n, 3, 3]`` rotations of RGB about the gray axis by ``turns`` (Rodrigues' formula).

    The linear stand-in for torchvision's HSV hue shift: gray stays gray, the mean (r + g + b) / 3 and
    the distance from the gray axis (saturation) are kept, and a third of a turn maps red to green,
    green to blue (as HSV's). It differs from HSV's within a sextant (HSV keeps max and max - min).
    """
    angle = turns * (2 * math.pi)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    eye = torch.eye(3, device=turns.device, dtype=turns.dtype)
    axis = torch.ones(3, 3, device=turns.device, dtype=turns.dtype) / 3  # u u^T, u = (1, 1, 1) / sqrt(3)
    r3 = 1 / math.sqrt(3)
    cross = torch.tensor([[0, -r3, r3], [r3, 0, -r3], [-r3, r3, 0]], device=turns.device, dtype=turns.dtype)
    return cos * eye + sin * cross + (1 - cos) * axis


def jitter_matrix(
    b: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    h: torch.Tensor,
    order: torch.Tensor,
    mean: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ColorJitter steps as one affine colour map per image: ``y = M x + o``.

    ``b, c, s, h`` ``[n]`` (hue in turns), ``order`` ``[n, 4]`` a permutation of 0..3 (brightness,
    contrast, saturation, hue) per image, ``mean`` ``[n, 3]`` each image's mean colour. Brightness
    (scale), saturation (lerp to luma) and hue (`hue_rotation`) are linear; contrast lerps to the
    image's mean luma *after* the preceding steps, which is ``w . (M mean + o)`` since they are affine.
    """
    n = len(b)
    w = b.new_tensor(GRAY_WEIGHTS)
    eye = torch.eye(3, device=b.device, dtype=b.dtype).expand(n, 3, 3)
    gray = torch.ones(3, 1, device=b.device, dtype=b.dtype) * w  # rows: luma weights
    saturation = s[:, None, None] * eye + (1 - s)[:, None, None] * gray
    hue = hue_rotation(h)
    m, o = eye, torch.zeros(n, 3, device=b.device, dtype=b.dtype)
    rows = torch.arange(n, device=b.device)
    for position in range(4):
        luma = ((m @ mean.unsqueeze(2)).squeeze(2) + o) @ w  # mean luma of the image so far
        step_m = torch.stack([b[:, None, None] * eye, c[:, None, None] * eye, saturation, hue], 1)  # [n, 4, 3, 3]
        step_o = torch.zeros(n, 4, 3, device=b.device, dtype=b.dtype)
        step_o[:, 1] = ((1 - c) * luma)[:, None]
        pick = order[:, position]
        m, o = step_m[rows, pick] @ m, (step_m[rows, pick] @ o.unsqueeze(2)).squeeze(2) + step_o[rows, pick]
    return m, o


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size]`` normalised 1-D Gaussians, one per sigma (torchvision's _get_gaussian_kernel1d)."""
    half = (size - 1) / 2
    t = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    # Small sigmas leave subnormal tail weights (< 1e-38), which make a CPU convolution ~8x slower;
    # weights below 1e-20 change no float32 result.
    return kernel.where(kernel > 1e-20, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of ``[n, 3, H, W]`` with one sigma per image, reflect padding (as torchvision)."""
    n, ch, height, width = x.shape
    kernel = gaussian_kernels(sigma, size).repeat_interleave(ch, 0)  # [n*3, size]: one kernel per channel
    r = size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * ch, height, width), (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(n * ch, 1, 1, size), groups=n * ch)
    y = torch.nn.functional.conv2d(y, kernel.view(n * ch, 1, size, 1), groups=n * ch)
    return y.view(n, ch, height, width)


def apply_where(
    x: torch.Tensor, chosen: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
) -> torch.Tensor:
    """``step(images, rows)`` on the images with ``chosen[i]`` (``rows`` their indices, None for all).

    On a CPU only the chosen images are computed (index_select, step, index_copy: one host read of
    the mask); on a GPU the whole batch, then a select, which costs less than a device sync.
    """
    if x.is_cuda:
        return torch.where(chosen.view(-1, 1, 1, 1), step(x, None), x)
    rows = chosen.nonzero().squeeze(1)
    if len(rows) == len(x):
        return step(x, None)
    if len(rows):
        x.index_copy_(0, rows, step(x.index_select(0, rows), rows))
    return x


class MultiCrop(torch.nn.Module):
    """uint8 ``[B, 3, H, W]`` -> ``[globals [G*B, 3, g, g], locals [L*B, 3, l, l]]``, normalised.

    The t-ReX recipe (naver/trex ``multi_crop.py``): bicubic RandomResizedCrop, flip (p 0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2), Gaussian blur (sigma 0.1-2
    px), solarise (p 0.2, globals only). Blur probabilities: 1.0 on global crops and 0.5 on local
    ones, as the project's recipe issue specifies (DINO's first global view; naver/trex's
    ``multi_crop.py`` uses 0.2 on its global crop: pass ``global_blur_p=0.2`` for that). Every crop of
    every image draws its own parameters, for the whole batch at once on the batch's device, from
    torch's generator (so a seed fixes them); the last call's draws are in ``params`` (one dict per group).

    How, per group of crops: one bicubic ``grid_sample`` crops, resizes and flips all crops
    (`resample_crops`); one batched matmul applies colour jitter, grayscale, the 1/255 scale and
    normalisation as a single 3x3 matrix + offset per crop (`jitter_matrix`), then one clamp; a
    grouped separable convolution blurs the chosen crops and solarisation inverts the chosen ones,
    both in normalised space (where blur is the same linear map and the threshold a per-channel one).

    Differences from the per-image torchvision recipe (bench/augment.py's reference):

    - torchvision clamps to [0, 1] after every jitter step and after grayscale; here the jitter,
      grayscale and normalisation are composed and clamped once, so a step that saturates
      (brightness 1.4 on highlights) and a later one that would pull values back in differ, and
      contrast's mean luma is that of the unclamped image;
    - hue is a rotation about the gray axis (`hue_rotation`), not torchvision's HSV hue shift: both
      map red to green at a third of a turn; within the recipe's +-0.1 turn they differ by ~4% of
      the range on average (HSV keeps max(r, g, b), the rotation keeps (r + g + b) / 3);
    - the blur kernel's weights below 1e-20 are zero (`gaussian_kernels`: no visible change);
    - the crop is bicubic (``resample="bilinear"``: faster, not the recipe's) without antialiasing (the recipe's crops shrink a 256 px image by at most
      ~1.4x) and its bicubic taps read the pixels just outside the box (torchvision replicates the
      box's edge): they differ only in the outermost output pixel;
    - on a CPU, picking the crops to blur/solarise reads their masks back (`apply_where`).

    As torchvision, the four jitter steps run in an order drawn per crop (``params["order"]``).
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
        resample: str = "bicubic",
    ) -> None:
        super().__init__()
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE_MODES)}, not {resample!r}")
        self.resample = resample
        self.groups = [CropGroup(global_crops, global_size, global_scale, global_blur_p, solarize_p)]
        if local_crops > 0:
            self.groups.append(CropGroup(local_crops, local_size, local_scale, local_blur_p, 0.0))
        self.params: list[dict[str, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float()  # 0..255: the 1/255 is folded into the colour matrix
        self.params = [self.draw(group, x) for group in self.groups]
        return [self.crops(group, x, params) for group, params in zip(self.groups, self.params)]

    def draw(self, group: CropGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every random parameter of the group's ``count * B`` crops (crop-major), on ``x``'s device."""
        n, (height, width), device = group.count * len(x), x.shape[-2:], x.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, device=device).uniform_(low, high)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, device=device) < p

        b, c, s, h = JITTER
        return {
            "boxes": random_resized_boxes(n, height, width, group.scale, device=device),
            "flip": coin(0.5),
            "brightness": uniform(1 - b, 1 + b),
            "contrast": uniform(1 - c, 1 + c),
            "saturation": uniform(1 - s, 1 + s),
            "hue": uniform(-h, h),
            "order": torch.rand(n, 4, device=device).argsort(1),  # a random permutation per crop
            "jitter": coin(JITTER_P),
            "gray": coin(GRAYSCALE_P),
            "sigma": uniform(*BLUR_SIGMA),
            "blur": coin(group.blur_p),
            "solarize": coin(group.solarize_p),
        }

    def crops(self, group: CropGroup, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        size = group.size
        sampled = resample_crops(x, p["boxes"], p["flip"], size, self.resample)  # [B, 3, count, size*size], 0..255
        matrix, offset = self.color_map(p, sampled.mean(3).permute(2, 0, 1).reshape(-1, 3) / 255)
        pixels = sampled.permute(2, 0, 1, 3).reshape(-1, 3, size * size)  # crop-major (a view for one crop)
        out = torch.baddbmm(offset.unsqueeze(2), matrix, pixels).view(-1, 3, size, size)
        mean, std = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        for channel, (m, sd) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):  # [0, 1] pixels, normalised
            out[:, channel].clamp_(-m / sd, (1 - m) / sd)  # (scalar bounds: a fast path tensor bounds lack)
        if group.blur_p > 0:
            k = blur_kernel_size(size)
            sigma = p["sigma"]
            out = apply_where(
                out, p["blur"], lambda y, rows: gaussian_blur(y, sigma if rows is None else sigma[rows], k)
            )
        if group.solarize_p > 0:
            threshold, flipped = (SOLARIZE_THRESHOLD - mean) / std, (1 - 2 * mean) / std
            out = apply_where(out, p["solarize"], lambda y, _: torch.where(y >= threshold, flipped - y, y))
        return out

    @staticmethod
    def color_map(p: dict[str, torch.Tensor], mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per crop ``[n, 3, 3]`` matrix and ``[n, 3]`` offset taking 0..255 pixels to normalised jittered ones."""
        m, o = jitter_matrix(p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"], mean)
        eye = torch.eye(3, device=m.device, dtype=m.dtype)
        keep = ~p["jitter"]
        m = torch.where(keep[:, None, None], eye, m)
        o = torch.where(keep[:, None], torch.zeros_like(o), o)
        gray = torch.ones(3, 1, device=m.device, dtype=m.dtype) * m.new_tensor(GRAY_WEIGHTS)
        m = torch.where(p["gray"][:, None, None], gray @ m, m)
        o = torch.where(p["gray"][:, None], (gray @ o.unsqueeze(2)).squeeze(2), o)
        inv_std = 1 / m.new_tensor(IMAGENET_STD)
        m = m * (inv_std[:, None] / 255)
        o = (o - m.new_tensor(IMAGENET_MEAN)) * inv_std
        return m, o


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
