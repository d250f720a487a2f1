import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from streamgen.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropGroup,
    MultiCrop,
    RandomColorJitter,
    build_augment,
    color_jitter,
    crop_pipeline,
    eval_transform,
    random_resized_boxes,
    train_augment,
)
from streamgen.config import RunConfig, TrainConfig, parse_config
from streamgen.errors import UsageError


def test_boxes_lie_inside_and_respect_scale_and_ratio():
    torch.manual_seed(0)
    boxes = random_resized_boxes(5000, 64, 48, scale=(0.2, 1.0))
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 48).all() and (y2 <= 64).all()
    area = w * h / (64 * 48)
    assert area.min() > 0.18 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert boxes.unique(dim=0).shape[0] > 4000  # a different crop for every image


def test_train_augment_shapes_and_per_image_randomness():
    images = torch.arange(4 * 3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 3, 32, 32)
    images = images[:1].expand(4, -1, -1, -1).contiguous()  # four copies of one image
    out = train_augment(images, crop=24, min_scale=0.3)
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])  # each copy got its own crop/flip


def test_full_crop_without_flip_is_the_normalised_image():
    torch.manual_seed(0)
    images = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    out = train_augment(images, crop=16, min_scale=1.0)
    expected = (128 / 255 - IMAGENET_MEAN[0]) / 0.229
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], expected), atol=1e-4)


def test_eval_transform():
    from PIL import Image

    image = Image.new("RGB", (80, 60), (255, 0, 0))
    x = eval_transform(32)(image)
    assert x.shape == (3, 32, 32) and x[0].mean() > 2 and x[1].mean() < -1


# -- multi-crop ---------------------------------------------------------------------------------


def random_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_build_augment_picks_the_recipe_with_crop_sizes_relative_to_the_crop():
    torch.manual_seed(0)
    images = random_images(5, 32)
    single = build_augment(TrainConfig(crop=24))(images)
    assert isinstance(single, torch.Tensor) and single.shape == (5, 3, 24, 24)
    # The smoke config's crop (32): globals of 32 px, locals of round(32 * 3/7) = 14 px.
    crops = build_augment(TrainConfig(crop=32, augment="multicrop", global_crops=2, local_crops=3))(images)
    assert [tuple(c.shape) for c in crops] == [(10, 3, 32, 32), (15, 3, 14, 14)]
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    # t-ReX's sizes at 224: 1 x 224 and 8 x 96.
    assert [g.size for g in build_augment(TrainConfig(augment="multicrop")).groups] == [224, 96]
    only_globals = build_augment(TrainConfig(crop=16, augment="multicrop", local_crops=0, local_crop=8))(images)
    assert [tuple(c.shape) for c in only_globals] == [(5, 3, 16, 16)]


def test_crops_are_normalised_images_in_range():
    torch.manual_seed(0)
    crops = MultiCrop(24, 10, local_crops=2)(random_images(4, 32))
    for c in crops:
        pixels = denormalize(c)
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def crop_box_sizes(group: CropGroup, n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(area fraction, width/height) of ``n`` crop boxes as the group's pipeline draws them."""
    params = crop_pipeline(group)[0].forward_parameters(torch.Size([n, 3, side, side]))
    src = params["src"]  # corners of inclusive pixel boxes
    w = src[:, 1, 0] - src[:, 0, 0] + 1
    h = src[:, 2, 1] - src[:, 1, 1] + 1
    return w * h / side**2, w / h


def torchvision_box_sizes(scale: tuple[float, float], n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: torchvision's RandomResizedCrop.get_params, the per-image recipe's crop law."""
    image = torch.empty(3, side, side)
    boxes = [v2.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    h = torch.tensor([b[2] for b in boxes], dtype=torch.float32)
    w = torch.tensor([b[3] for b in boxes], dtype=torch.float32)
    return w * h / side**2, w / h


@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.25)])
def test_crop_scales_and_aspects_follow_torchvision_law(scale):
    """Area fractions and aspects drawn per image follow RandomResizedCrop's law (two-sample KS tests)."""
    torch.manual_seed(0)
    n, side = 4000, 256
    area, aspect = crop_box_sizes(CropGroup(1, 96, scale, 0.0, 0.0), n, side)
    ref_area, ref_aspect = torchvision_box_sizes(scale, n, side)
    assert area.min() >= scale[0] - 0.01 and area.max() <= scale[1] + 0.01
    assert aspect.min() >= 3 / 4 - 0.03 and aspect.max() <= 4 / 3 + 0.03
    assert stats.ks_2samp(area.numpy(), ref_area.numpy()).pvalue > 1e-3
    assert stats.ks_2samp(aspect.log().numpy(), ref_aspect.log().numpy()).pvalue > 1e-3
    # and, where no candidate box is rejected (local crops), against the uniform area law itself
    if scale[1] <= 0.25:
        uniform = stats.uniform(loc=scale[0], scale=scale[1] - scale[0]).cdf
        assert stats.kstest(area.numpy(), uniform).pvalue > 1e-3


def test_each_crop_shows_the_region_of_its_box():
    """A coordinate ramp image: every crop's first and last columns/rows are its box's edges."""
    side = 64
    ramp = torch.arange(side, dtype=torch.float32) / 255
    image = torch.stack(
        [ramp.view(1, side).expand(side, side), ramp.view(side, 1).expand(side, side), ramp[:1].expand(side, side)]
    )
    crop = crop_pipeline(CropGroup(1, 24, (0.1, 0.6), 0.0, 0.0))[0]
    torch.manual_seed(0)
    out = crop(image.expand(32, -1, -1, -1).contiguous())
    src = crop._params["src"]
    x1, x2, y1, y2 = src[:, 0, 0], src[:, 1, 0], src[:, 0, 1], src[:, 2, 1]
    torch.testing.assert_close(out[:, 0, 0, 0] * 255, x1, atol=0.05, rtol=0)
    torch.testing.assert_close(out[:, 0, 0, -1] * 255, x2, atol=0.05, rtol=0)
    torch.testing.assert_close(out[:, 1, 0, 0] * 255, y1, atol=0.05, rtol=0)
    torch.testing.assert_close(out[:, 1, -1, 0] * 255, y2, atol=0.05, rtol=0)


def test_every_crop_of_every_image_draws_its_own_parameters():
    torch.manual_seed(0)
    multicrop = MultiCrop(24, 10, global_crops=2, local_crops=3)
    images = random_images(1, 32).expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    crops = multicrop(images)
    for group, pipeline, out in zip(multicrop.groups, multicrop.pipelines, crops):
        rows = out.flatten(1)
        assert torch.cdist(rows, rows).add(torch.eye(len(rows)) * 1e9).min() > 1e-3  # no two crops alike
        boxes = pipeline[0]._params["src"].flatten(1)
        assert boxes.unique(dim=0).shape[0] >= 0.75 * len(boxes)  # 16 resp. 24 boxes, small integer grid
        for factor in ("brightness", "contrast", "saturation", "hue"):
            assert pipeline[3].params[factor].unique().numel() == len(rows)
        assert pipeline[5]._params["sigma"].unique().numel() > 1  # blur strength per crop


def test_grayscale_and_blur_rates_match_the_recipe():
    """About 20% of crops come out gray (R = G = B), with a binomial tolerance."""
    torch.manual_seed(0)
    crops = MultiCrop(16, 8, global_crops=2, local_crops=4)(random_images(200, 24))
    for out in crops:
        pixels = denormalize(out)
        gray = ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-4) & (
            (pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1e-4
        )
        n, rate = len(out), gray.float().mean().item()
        assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n), rate


def test_color_jitter_matches_torchvision_per_image():
    """The batched jitter against torchvision's functional ops applied image by image (the oracle)."""
    torch.manual_seed(0)
    n = 12
    x = torch.rand(n, 3, 20, 20)
    b, c, s = (torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4) for _ in range(3))
    h = torch.empty(n).uniform_(-0.1, 0.1)
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        out = color_jitter(x, b, c, s, h, order)
        for i in range(n):
            factors = [b[i].item(), c[i].item(), s[i].item(), h[i].item()]
            expected = x[i]
            for step in order:
                expected = ops[step](expected, factors[step])
            torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_color_jitter_applies_with_its_probability():
    torch.manual_seed(0)
    jitter = RandomColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
    x = torch.rand(400, 3, 4, 4)
    out = jitter(x)
    changed = (out - x).flatten(1).abs().amax(1) > 0
    assert torch.equal(changed, jitter.params["apply"].view(-1))
    assert abs(changed.float().mean().item() - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 400)


def test_same_seed_same_crops_other_seed_other_crops():
    images = random_images(4, 32)
    multicrop = MultiCrop(24, 10, local_crops=2)
    torch.manual_seed(5)
    first = multicrop(images)
    torch.manual_seed(5)
    again = multicrop(images)
    torch.manual_seed(6)
    other = multicrop(images)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], other[0])


def test_crops_are_grouped_crop_major():
    """Row k*B + i of a group is crop k of image i: each image's crops stay with its label."""
    torch.manual_seed(0)
    colours = torch.tensor([[120, 0, 0], [0, 0, 120]], dtype=torch.uint8)  # flat dark red, dark blue
    labels = torch.arange(20) % 2
    images = colours[labels].view(20, 3, 1, 1).expand(20, 3, 24, 24).contiguous()
    crops = MultiCrop(16, 8, global_crops=2, local_crops=3)(images)
    for out in crops:
        pixels = denormalize(out)
        red_minus_blue = pixels[:, 0].mean((1, 2)) - pixels[:, 2].mean((1, 2))
        # Grayscale (p 0.2) washes a crop's colour out; jitter never flips it (hue moves by 36 degrees at most).
        clear = red_minus_blue.abs() > 0.1
        assert clear.float().mean() > 0.6
        assert torch.equal((red_minus_blue[clear] < 0).long(), labels.repeat(len(out) // 20)[clear])


# -- bad input: one line, exit 2, before anything starts ------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.augment", "multi"], "--train.augment must be single or multicrop"),
        (["--train.head", "mlp"], "--train.head must be linear or trex"),
        (["--train.augment", "multicrop", "--train.global_crops", "0"], "--train.global_crops must be at least 1"),
        (["--train.augment", "multicrop", "--train.local_crops", "-1"], "--train.local_crops must be >= 0"),
        (["--train.augment", "multicrop", "--train.global_scale", "0.5"], "'min,max'"),
        (["--train.augment", "multicrop", "--train.global_scale", "1.0,0.25"], "0 < min <= max <= 1"),
        (["--train.augment", "multicrop", "--train.local_scale", "0,0.25"], "0 < min <= max <= 1"),
        (["--train.augment", "multicrop", "--train.local_scale", "0.05,1.5"], "0 < min <= max <= 1"),
        (["--train.augment", "multicrop", "--train.local_crop", "64"], "--train.local_crop 64 is larger"),
        (["--train.crop", "300"], "--train.crop 300 is larger"),
        (["--train.warmup_epochs", "2"], "--train.warmup_epochs needs --source cache"),
    ],
)
def test_bad_recipe_is_one_clear_line(args, message):
    with pytest.raises(UsageError) as error:
        parse_config(["--stream.resolution", "32", "--train.crop", "32", *args])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_default_recipe_is_valid_everywhere():
    from streamgen.config import validate

    cfg = RunConfig()
    cfg.train.augment, cfg.train.head = "multicrop", "trex"
    validate(cfg)  # 224/96 crops from 256 px stream images
    cfg = parse_config(["--config", "configs/smoke.yaml", "--train.augment", "multicrop"])
    assert cfg.train.local_crop is None and cfg.train.label_smoothing == 0.0


@pytest.mark.timeout(120)
def test_train_py_rejects_a_bad_recipe_with_exit_2_and_makes_nothing(tmp_path):
    import subprocess

    from conftest import train_cmd

    out = tmp_path / "runs"
    args = ["--model", "fake", "--out", str(out), "--train.augment", "multicrop", "--train.local_scale", "0.3,0.1"]
    result = subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=110)
    assert result.returncode == 2
    assert "--train.local_scale '0.3,0.1' must satisfy 0 < min <= max <= 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
