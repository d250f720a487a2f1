"""Training augmentation on the trainer's device, for whole batches; and the eval transform.

Two recipes, chosen by `build_augment` from ``train.augment``:

- ``single``: `train_augment`, torchvision's RandomResizedCrop + RandomHorizontalFlip +
  Normalize with a different crop for every image, vectorised: one `roi_align` call crops and
  resizes the whole batch (its adaptive sampling averages over each output cell, so downscaling
  is antialiased). Returns one normalised float tensor ``[B, 3, crop, crop]``.
- ``multicrop``: `MultiCrop`, the multi-crop recipe of t-ReX (naver/trex ``multi_crop.py``,
  itself DINO's): G global and L local crops per image, each with its own bicubic resized crop,
  flip, colour jitter, grayscale, Gaussian blur and (globals only) solarisation, every parameter
  drawn per crop for the whole batch at once on the batch's device; per group of crops, batched
  matrix products: resize + flip + blur as one matrix per axis, then one colour matrix.
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
from functools import cache, partial

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
GRAYSCALE_P = 0.2


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 matrices on AMX tiles (Linux flag ``amx_bf16``): ~10x its float32 rate."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:
        return False


def crop_dtype(device: torch.device) -> torch.dtype:
    """The dtype `resized_crops` multiplies in: bfloat16 on an AMX CPU (its products run ~10x faster there;
    the 0..255 pixels are exact in it, the crops within ~0.3/255 of float32's on average, a few /255 at
    worst), float32 elsewhere (a GPU's float32 matmul is fast, and follows
    ``torch.backends.cuda.matmul.allow_tf32``; a CPU without AMX runs the products ~3x slower than with)."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else torch.float32


def cubic_weights(t: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """``[..., 4]`` weights of the taps floor(u) - 1 .. floor(u) + 2 at fractions ``t``: Keys' cubic
    convolution with a = -0.75, the kernel of torch's (and torchvision's tensor) bicubic resampling."""

    def near(d: torch.Tensor) -> torch.Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: torch.Tensor) -> torch.Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


class Scratch:
    """Large intermediates reused from call to call (same name, shape, dtype and device).

    On a CPU, a fresh allocation of tens of MB is page-faulted in on its first write, which costs
    several times the write itself; the hot path's matrices and partial products are that size
    every batch. The price is memory held between batches: ~175 MB with 1 x 224 + 8 x 96 crops, as
    `MultiCrop` works on ``CHUNK`` images at a time whatever the batch. It keeps them on a CPU only:
    a GPU's caching allocator already reuses memory.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = self.tensors.get(name)
        # (a buffer made under torch.inference_mode cannot be written outside it, nor the reverse)
        inference = torch.is_inference_mode_enabled()
        if (
            tensor is None
            or (tensor.shape, tensor.dtype, tensor.device) != (shape, dtype, device)
            or (tensor.is_inference() != inference)
        ):
            tensor = self.tensors[name] = torch.empty(shape, dtype=dtype, device=device)
        return tensor


def buffer(
    scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``scratch``'s buffer ``name``, or a fresh tensor without a scratch."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.empty(name, shape, dtype, device)


BORDER = 2  # bicubic taps reach 2 pixels past a line's ends: `padded_rows` repeats the edge pixels that far


def padded_shape(images: torch.Tensor) -> tuple[int, int, int, int]:
    """The shape of `padded_rows`' output for ``images`` ``[B, 3, H, W]``."""
    b, channels, height, width = images.shape
    return b, height + 2 * BORDER, channels, width + 2 * BORDER


def padded_rows(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ``out`` ``[B, H + 4, 3, W + 4]`` (`padded_shape`; 0..255 are exact in
    bfloat16), edge pixels repeated ``BORDER`` deep (grid_sample's ``padding_mode="border"``): what
    `resized_crops` reads, rows first so that one matrix product resamples the rows of all three channels."""
    out[:, BORDER:-BORDER, :, BORDER:-BORDER] = images.permute(0, 2, 1, 3)  # one pass: layout and dtype
    out[:, :BORDER] = out[:, BORDER : BORDER + 1]
    out[:, -BORDER:] = out[:, -BORDER - 1 : -BORDER]
    out[..., :BORDER] = out[..., BORDER : BORDER + 1]
    out[..., -BORDER:] = out[..., -BORDER - 1 : -BORDER]
    return out


def bicubic_matrices(
    lo: torch.Tensor, hi: torch.Tensor, flip: torch.Tensor, size: int, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` ``[n, size, length + 2 * BORDER]`` (zeroed) so that row j of matrix i resamples a line of
    ``length`` pixels, padded as `padded_rows` pads it, at output pixel j of span ``[lo_i, hi_i)`` resized to
    ``size`` (reversed where ``flip``), bicubic.

    Pixel j's centre reads the line at ``lo + (j + 0.5) * (hi - lo) / size - 0.5`` (torchvision's resize
    convention, align_corners=False); a box's outermost output pixels read the image around the box.
    """
    j = torch.arange(size, device=lo.device, dtype=lo.dtype)
    read = torch.where(flip[:, None], size - 1 - j, j)  # a flip reverses the row's order: free
    u = lo[:, None] + (read + 0.5) * ((hi - lo) / size)[:, None] - 0.5 + BORDER
    base = u.floor()
    taps = base.long().unsqueeze(-1) + torch.arange(-1, 3, device=lo.device)  # 4 distinct columns of the padded line
    # out[i, j, taps[i, j]] = weights as a flat index_put_ (a bfloat16 scatter_ converts all of out to float and back)
    n, length = len(lo), out.shape[-1]
    flat = (torch.arange(n * size, device=lo.device).view(n, size, 1) * length + taps).view(-1)
    out.view(-1).index_put_((flat,), cubic_weights(u - base).to(out.dtype).view(-1))
    return out


def blur_matrices(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size, size]`` float32: one axis of the Gaussian blur of ``size`` pixels, one sigma per matrix
    (0: the identity), ``blur_kernel_size(size)`` taps, reflect padding (torchvision's gaussian_blur).

    A matrix product of the kernels with the taps' one-hot reflected positions, not a scatter_add: near
    the edges two taps reflect onto one pixel, and a GPU's scatter_add sums them in no fixed order.
    """
    k, device = blur_kernel_size(size), sigma.device
    reach = (torch.arange(size, device=device)[:, None] + torch.arange(k, device=device) - k // 2).abs()
    reach = torch.where(reach > size - 1, 2 * (size - 1) - reach, reach)  # [size, k] reflected
    taps = torch.nn.functional.one_hot(reach.T, size).float()  # [k, size, size]: tap t of output i reads j
    # sigma 0 (a crop not drawn for blur): a vanishing sigma's kernel, 1 at the centre tap only
    kernels = gaussian_kernels(sigma.clamp_min(1e-6), k)
    return (kernels @ taps.view(k, size * size)).view(len(sigma), size, size)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size]`` normalised 1-D Gaussians, one per sigma (torchvision's _get_gaussian_kernel1d)."""
    half = (size - 1) / 2
    t = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    # Small sigmas leave subnormal tail weights (< 1e-38), which make float32 CPU products several times
    # slower; weights below 1e-20 change no float32 result.
    return kernel.where(kernel > 1e-20, 0.0)


def resized_crops(
    image: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    sigma: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bicubic crops of ``image`` (`padded_rows`: ``[B, H + 4, 3, W + 4]``, any float dtype) resized to
    ``size``, flipped where ``flip``, blurred by ``sigma`` (0 or None: not): float32 ``[n, 3, size, size]``.

    ``boxes`` (x1, y1, x2, y2) / ``flip`` / ``sigma`` are crop-major (row k*B + i: crop k of image i). Both
    the resize and the blur are separable and linear, so crop i of channel c is ``R_i @ image_c @ C_i^T``
    with R = blur @ bicubic rows and C = blur @ bicubic columns (`bicubic_matrices`, `blur_matrices`):
    per crop index k, one batched product over the rows and one over the columns. Dense products do
    work in proportion to the image rather than the crop, but as batched matrix products they run at
    the device's full rate (bfloat16 AMX tiles on a CPU, tensor cores on a GPU). With ``scratch`` the
    intermediates are reused buffers; ``out`` (float32 ``[n, 3, size, size]``, any strides) takes the result.
    ``image`` is `padded_rows`' output; ``boxes`` are in the unpadded image's pixels.
    """
    b, height, channels, width = image.shape
    n, dtype, device = len(boxes), image.dtype, image.device
    count = n // b

    def empty(name: str, *shape: int) -> torch.Tensor:
        return buffer(scratch, name, shape, dtype, device)

    x1, y1, x2, y2 = boxes.unbind(1)
    rows = bicubic_matrices(y1, y2, torch.zeros_like(flip), size, empty("rows", n, size, height).zero_())
    cols = bicubic_matrices(x1, x2, flip, size, empty("cols", n, size, width).zero_())
    if sigma is not None:  # blur after the resize: fold it into both matrices
        blur = blur_matrices(sigma, size).to(dtype)
        rows = torch.bmm(blur, rows, out=empty("blurred rows", n, size, height))
        cols = torch.bmm(blur, cols, out=empty("blurred cols", n, size, width))
    image_rows = image.view(b, height, channels * width)
    tall = empty("tall", b, size, channels * width)
    both = empty("both", count, b, size * channels, size)
    for k in range(count):  # per crop index, not per image
        torch.bmm(rows[k * b : (k + 1) * b], image_rows, out=tall)  # [B, size, 3 * W]: rows resampled
        torch.bmm(tall.view(b, size * channels, width), cols[k * b : (k + 1) * b].transpose(1, 2), out=both[k])
    if out is None:
        out = torch.empty(n, channels, size, size, device=device)
    return out.copy_(both.view(n, size, channels, size).transpose(1, 2))  # one pass: layout and dtype


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


def apply_where(x: torch.Tensor, chosen: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``step`` (elementwise) on the images with ``chosen[i]``, in place where it can be.

    On a CPU only the chosen images are computed (index_select, step, index_copy: one host read of
    the mask); on a GPU the whole batch, then a select, which costs less than a device sync.
    """
    if x.is_cuda:
        return torch.where(chosen.view(-1, 1, 1, 1), step(x), x)
    rows = chosen.nonzero().squeeze(1)
    if len(rows) == len(x):
        return step(x)
    if len(rows):
        x.index_copy_(0, rows, step(x.index_select(0, rows)))
    return x


CHUNK = 32  # images per pass of the crop products: bounds their buffers (CPU scratch, GPU transients)


def of_images(params: dict[str, torch.Tensor], count: int, part: slice) -> dict[str, torch.Tensor]:
    """The parameters of the crops of images ``part`` (crop-major rows k*B + i -> crop-major rows of the part)."""

    def pick(v: torch.Tensor) -> torch.Tensor:
        return v.view(count, -1, *v.shape[1:])[:, part].reshape(-1, *v.shape[1:])

    return {key: pick(value) for key, value in params.items()}


class MultiCrop(torch.nn.Module):
    """uint8 ``[B, 3, H, W]`` -> ``[globals [G*B, 3, g, g], locals [L*B, 3, l, l]]``, normalised.

    The t-ReX recipe (naver/trex ``multi_crop.py``): bicubic RandomResizedCrop, flip (p 0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2), Gaussian blur (sigma 0.1-2
    px), solarise (p 0.2, globals only). Blur probabilities: 0.2 on global crops and 0.5 on local
    ones, naver/trex's ``multi_crop.py`` values (``train.global_blur_p`` / ``train.local_blur_p``;
    DINO blurs its first global view with p 1.0). Every crop of
    every image draws its own parameters, for the whole batch at once on the batch's device, from
    torch's generator (so a seed fixes them); the last call's draws are in ``params`` (one dict per group).

    How, per group of crops and ``CHUNK`` images at a time: two batched matrix products crop, resize,
    flip and blur the crops (`resized_crops`: separable bicubic resize and Gaussian blur are one matrix
    per axis and crop); one batched matmul applies colour jitter, grayscale, the 1/255 scale and
    normalisation as a single 3x4 matrix per crop (`jitter_matrix` + offset, on pixels padded with a
    channel of ones), written straight into the batch's rows; then, on the whole batch, one clamp, and
    solarisation inverts the chosen crops in normalised space (where the threshold is a per-channel one).

    Differences from the per-image torchvision recipe (bench/augment.py's reference):

    - torchvision clamps to [0, 1] after every jitter step and after grayscale, and blurs after them;
      here the blur comes with the resize (colour maps and blur are linear and commute) and the jitter,
      grayscale and normalisation are composed and clamped once, after the blur: a step that saturates
      (brightness 1.4 on highlights) and a later one that would pull values back in differ, blurred
      edges of saturated regions differ, and contrast's mean luma is that of the unclamped, blurred crop;
    - hue is a rotation about the gray axis (`hue_rotation`), not torchvision's HSV hue shift: both
      map red to green at a third of a turn; within the recipe's +-0.1 turn they differ by ~4% of
      the range on average (HSV keeps max(r, g, b), the rotation keeps (r + g + b) / 3);
    - the crop is bicubic without antialiasing (the recipe's crops shrink a 256 px image by at most
      ~1.5x) and its bicubic taps read the pixels just outside the box (torchvision replicates the
      box's edge): they differ only in the outermost output pixels;
    - on a CPU with AMX the products run in bfloat16 (`crop_dtype`): crops within ~0.3/255 of float32's
      on average, a few /255 at worst;
    - on a CPU, picking the crops to solarise reads their mask back (`apply_where`).

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
        global_blur_p: float = 0.2,
        local_blur_p: float = 0.5,
        solarize_p: float = 0.2,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dtype = dtype  # of the crop products; None: `crop_dtype` of the images' device
        self.groups = [CropGroup(global_crops, global_size, global_scale, global_blur_p, solarize_p)]
        if local_crops > 0:
            self.groups.append(CropGroup(local_crops, local_size, local_scale, local_blur_p, 0.0))
        self.params: list[dict[str, torch.Tensor]] = []
        self.scratch = [Scratch() for _ in range(len(self.groups) + 1)]  # the image's, then one per group

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, device = len(images), images.device
        scratch = self.scratch if device.type == "cpu" else [None] * len(self.scratch)  # (see `Scratch`)
        dtype = self.product_dtype(device)
        self.params = [self.draw(group, images) for group in self.groups]  # the whole batch's, then chunks
        outs = [torch.empty(g.count * b, 3, g.size, g.size, device=device) for g in self.groups]
        for start in range(0, b, CHUNK):
            part = slice(start, min(b, start + CHUNK))
            chunk = images[part]
            padded = padded_rows(chunk, buffer(scratch[0], "image", padded_shape(chunk), dtype, device))
            for group, params, out, group_scratch in zip(self.groups, self.params, outs, scratch[1:]):
                self.colour_crops(group, padded, of_images(params, group.count, part), out, part, group_scratch)
        return [self.finish(group, params, out) for group, params, out in zip(self.groups, self.params, outs)]

    def product_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the crop products on ``device``: the one given, else `crop_dtype`'s choice."""
        return self.dtype or crop_dtype(device)

    def draw(self, group: CropGroup, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every random parameter of the group's ``count * B`` crops (crop-major), on the images' device."""
        n, (height, width), device = group.count * len(images), images.shape[-2:], images.device

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

    def colour_crops(
        self,
        group: CropGroup,
        padded: torch.Tensor,
        p: dict[str, torch.Tensor],
        out: torch.Tensor,
        part: slice,
        scratch: Scratch | None,
    ) -> None:
        """The crops of the images ``part`` (`padded` them; ``p`` their parameters, crop-major), resized and
        blurred (`resized_crops`, 0..255), then colour-mapped (one 3x4 matrix per crop, `color_map`)
        straight into their rows of ``out`` (the whole batch's group, crop-major)."""
        size, n, device = group.size, len(p["flip"]), padded.device
        sigma = p["sigma"].where(p["blur"], 0.0) if group.blur_p > 0 else None  # 0: not blurred
        # 0..255 pixels and a channel of ones, so that the colour map's offset rides in its matrix
        pixels = buffer(scratch, "pixels", (n, 4, size, size), torch.float32, device)
        pixels[:, 3] = 1
        resized_crops(padded, p["boxes"], p["flip"], size, sigma, scratch, out=pixels[:, :3])
        matrix, offset = self.color_map(p, pixels[:, :3].mean((2, 3)) / 255)
        affine = torch.cat([matrix, offset.unsqueeze(2)], 2).view(group.count, -1, 3, 4)
        pixels = pixels.view(group.count, -1, 4, size * size)
        rows = out.view(group.count, -1, 3, size * size)[:, part]  # crop k of these images: rows[k]
        for k in range(group.count):
            torch.bmm(affine[k], pixels[k], out=rows[k])

    @staticmethod
    def finish(group: CropGroup, p: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Clamp the group's colour-mapped crops to [0, 1] pixels and solarise the drawn ones (normalised)."""
        mean, std = out.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), out.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        for channel, (m, sd) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
            out[:, channel].clamp_(-m / sd, (1 - m) / sd)  # (scalar bounds: a fast path tensor bounds lack)
        if group.solarize_p > 0:
            threshold, flipped = (SOLARIZE_THRESHOLD - mean) / std, (1 - 2 * mean) / std
            out = apply_where(out, p["solarize"], lambda y: torch.where(y >= threshold, flipped - y, y))
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
            global_blur_p=train.global_blur_p,
            local_blur_p=train.local_blur_p,
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
