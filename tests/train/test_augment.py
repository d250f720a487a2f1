import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from streamgen.config import RunConfig, TrainConfig, parse_config
from streamgen.errors import UsageError
from streamgen.train.augment import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    CropGroup,
    MultiCrop,
    build_augment,
    crop_dtype,
    eval_transform,
    hue_rotation,
    jitter_matrix,
    padded_rows,
    padded_shape,
    random_resized_boxes,
    resized_crops,
    train_augment,
)


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


def torchvision_box_sizes(scale: tuple[float, float], n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: torchvision's RandomResizedCrop.get_params, the per-image recipe's crop law."""
    image = torch.empty(3, side, side)
    boxes = [v2.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    h = torch.tensor([b[2] for b in boxes], dtype=torch.float32)
    w = torch.tensor([b[3] for b in boxes], dtype=torch.float32)
    return w * h / side**2, w / h


@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.25)])
def test_crop_scales_and_aspects_follow_torchvision_law(scale):
    """Area fractions and aspects of the boxes MultiCrop draws follow RandomResizedCrop's law (KS tests)."""
    torch.manual_seed(0)
    n, side = 4000, 256
    params = MultiCrop(96, local_crops=0, global_scale=scale).draw(
        CropGroup(1, 96, scale, 0.0, 0.0), torch.empty(n, 3, side, side)
    )
    x1, y1, x2, y2 = params["boxes"].unbind(1)
    area, aspect = (x2 - x1) * (y2 - y1) / side**2, (x2 - x1) / (y2 - y1)
    ref_area, ref_aspect = torchvision_box_sizes(scale, n, side)
    assert area.min() >= scale[0] - 0.01 and area.max() <= scale[1] + 0.01
    assert aspect.min() >= 3 / 4 - 0.03 and aspect.max() <= 4 / 3 + 0.03
    assert stats.ks_2samp(area.numpy(), ref_area.numpy()).pvalue > 1e-3
    assert stats.ks_2samp(aspect.log().numpy(), ref_aspect.log().numpy()).pvalue > 1e-3
    # and, where no candidate box is rejected (local crops), against the uniform area law itself
    if scale[1] <= 0.25:
        uniform = stats.uniform(loc=scale[0], scale=scale[1] - scale[0]).cdf
        assert stats.kstest(area.numpy(), uniform).pvalue > 1e-3


def crops_of(images: torch.Tensor, boxes, flip, size, sigma=None, dtype=torch.float32) -> torch.Tensor:
    """`resized_crops` of uint8 images, viewed as ``[B, 3, count, size, size]`` (crop k of image i at [i, :, k])."""
    out = resized_crops(padded_rows(images, torch.empty(padded_shape(images), dtype=dtype)), boxes, flip, size, sigma)
    return out.view(-1, len(images), 3, size, size).transpose(0, 1).transpose(1, 2)


def test_resized_crops_match_torchvision_resized_crop_and_flip():
    """Each crop is torchvision's bicubic resized_crop of its box (flipped if drawn), crop-major rows.

    torchvision resamples the cropped image, so its outermost pixels replicate the box's edge where
    ours read the pixels beside the box: compare away from the border (2 px)."""
    torch.manual_seed(0)
    b, count, size, height, width = 3, 2, 24, 40, 52
    x = torch.randint(0, 256, (b, 3, height, width), dtype=torch.uint8)
    boxes = random_resized_boxes(count * b, height, width, scale=(0.4, 1.0))
    flip = torch.tensor([False, True, False, True, True, False])
    out = crops_of(x, boxes, flip, size)
    for n, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        k, i = divmod(n, b)  # row k*B + i is crop k of image i
        bicubic = v2.InterpolationMode.BICUBIC
        expected = F.resized_crop(x[i].float(), y1, x1, y2 - y1, x2 - x1, [size, size], bicubic, antialias=False)
        if flip[n]:
            expected = expected.flip(-1)
        inner = (slice(None), slice(2, -2), slice(2, -2))
        torch.testing.assert_close(out[i, :, k][inner], expected[inner], atol=1e-3, rtol=0)


def test_blurred_crops_are_torch_bicubic_then_torchvision_gaussian_blur():
    """Everywhere, edges included: torch's own bicubic grid_sample (edge pixels repeated past the image)
    of each box, then torchvision's gaussian_blur with the crop's sigma (reflect padding); sigma 0: none."""
    torch.manual_seed(0)
    b, count, size, height, width = 4, 2, 20, 32, 26
    x = torch.randint(0, 256, (b, 3, height, width), dtype=torch.uint8)
    boxes = random_resized_boxes(count * b, height, width, scale=(0.2, 1.0))
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # a whole-image crop: taps past every edge
    flip = torch.rand(count * b) < 0.5
    sigma = torch.empty(count * b).uniform_(0.1, 2.0)
    sigma[::3] = 0
    out = crops_of(x, boxes, flip, size, sigma)
    k = 13
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        crop, i = divmod(n, b)
        steps = (torch.arange(size) * 2 + 1) / size - 1  # output pixel centres in [-1, 1] of the box
        gx = ((x1 + x2) / width - 1) + (x2 - x1) / width * steps
        gy = ((y1 + y2) / height - 1) + (y2 - y1) / height * steps
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
        expected = torch.nn.functional.grid_sample(
            x[i : i + 1].float(), grid, mode="bicubic", padding_mode="border", align_corners=False
        )[0]
        if flip[n]:
            expected = expected.flip(-1)
        if sigma[n] > 0:
            expected = F.gaussian_blur(expected, [k, k], [sigma[n].item()] * 2)
        torch.testing.assert_close(out[i, :, crop], expected, atol=2e-3, rtol=0)


def test_bfloat16_products_stay_within_a_few_levels_of_float32():
    """The AMX CPU path (`crop_dtype`): 0..255 pixels are exact in bfloat16, the matrices and partial
    products are rounded to 8 bits of mantissa; on natural-looking images (smooth + noise) the crops
    stay within ~0.3 level of the float32 ones on average and a few levels at worst (a box off by half a
    pixel, or a blur dropped, moves them by 2-8 levels on average and tens at worst)."""
    torch.manual_seed(0)
    b, count, size, height, width = 4, 3, 48, 64, 72
    smooth = torch.nn.functional.interpolate(torch.rand(b, 3, 8, 8) * 255, size=(height, width), mode="bicubic")
    x = (smooth + torch.randn(b, 3, height, width) * 8).clamp(0, 255).to(torch.uint8)
    boxes = random_resized_boxes(count * b, height, width, scale=(0.05, 1.0))
    flip, sigma = torch.rand(count * b) < 0.5, torch.empty(count * b).uniform_(0.1, 2.0)
    exact = crops_of(x, boxes, flip, size, sigma)
    fast = crops_of(x, boxes, flip, size, sigma, torch.bfloat16)
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().mean() < 1.0 and (fast - exact).abs().max() < 8.0


def test_the_crop_dtype_is_bfloat16_only_on_a_cpu_with_amx(monkeypatch):
    import streamgen.train.augment as augment

    monkeypatch.setattr(augment, "cpu_has_amx", lambda: True)
    assert crop_dtype(torch.device("cpu")) == torch.bfloat16
    assert crop_dtype(torch.device("cuda")) == torch.float32  # (building the device object needs no GPU)
    monkeypatch.setattr(augment, "cpu_has_amx", lambda: False)
    assert crop_dtype(torch.device("cpu")) == torch.float32


def test_reused_buffers_never_reach_a_result_the_caller_holds():
    """The CPU scratch keeps its buffers between calls: earlier results stay intact through calls with
    other batch sizes and resolutions, and equal a fresh module's."""
    multicrop, images = MultiCrop(24, 10, local_crops=2), random_images(4, 32)
    torch.manual_seed(3)
    first = [c.clone() for c in multicrop(images)]
    torch.manual_seed(3)
    held = multicrop(images)
    multicrop(random_images(6, 40))
    multicrop(random_images(2, 28))
    assert all(torch.equal(a, b) for a, b in zip(first, held))
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, MultiCrop(24, 10, local_crops=2)(images)))
    with torch.inference_mode():  # buffers made here are replaced, not written, outside it
        multicrop(images)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, multicrop(images)))


def test_every_crop_of_every_image_draws_its_own_parameters():
    torch.manual_seed(0)
    multicrop = MultiCrop(24, 10, global_crops=2, local_crops=3)
    images = random_images(1, 32).expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    crops = multicrop(images)
    for params, out in zip(multicrop.params, crops):
        rows = out.flatten(1)
        assert torch.cdist(rows, rows).add(torch.eye(len(rows)) * 1e9).min() > 1e-3  # no two crops alike
        assert params["boxes"].unique(dim=0).shape[0] >= 0.75 * len(rows)  # 16 resp. 24 boxes, small integer grid
        for factor in ("brightness", "contrast", "saturation", "hue", "sigma"):
            assert params[factor].shape == (len(rows),) and params[factor].unique().numel() == len(rows)
        assert params["order"].unique(dim=0).shape[0] > 1  # the jitter order is drawn per crop
        assert torch.equal(params["order"].sort(1).values, torch.arange(4).expand(len(rows), 4))


@pytest.mark.parametrize("blur", [(), ("--train.global_blur_p", "0.9", "--train.local_blur_p", "0.1")])
def test_grayscale_and_blur_rates_match_the_recipe(blur):
    """About 20% of crops come out gray (R = G = B), with a binomial tolerance; blur coins at t-ReX's
    0.2 (global) / 0.5 (local) by default (naver/trex multi_crop.py), or at the configured rates."""
    torch.manual_seed(0)
    args = ["--stream.resolution", "24", "--train.crop", "16", "--train.local_crop", "8", "--train.augment"]
    cfg = parse_config([*args, "multicrop", "--train.global_crops", "2", "--train.local_crops", "4", *blur])
    multicrop = build_augment(cfg.train)
    crops = multicrop(random_images(200, 24))
    rates = (0.9, 0.1) if blur else (0.2, 0.5)
    for out, params, blur_p in zip(crops, multicrop.params, rates):
        pixels = denormalize(out)
        gray = ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-4) & (
            (pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1e-4
        )
        n, rate = len(out), gray.float().mean().item()
        assert torch.equal(gray, params["gray"])
        assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n), rate
        blur_rate = params["blur"].float().mean().item()
        assert abs(blur_rate - blur_p) <= 4 * math.sqrt(blur_p * (1 - blur_p) / n), blur_rate
        jitter_rate = params["jitter"].float().mean().item()
        assert abs(jitter_rate - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n), jitter_rate


def apply_color(m: torch.Tensor, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.einsum("nij,njhw->nihw", m, x) + o.view(-1, 3, 1, 1)).clamp(0, 1)


def identity_factors(n: int) -> list[torch.Tensor]:
    return [torch.ones(n), torch.ones(n), torch.ones(n), torch.zeros(n)]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_each_linear_jitter_step_matches_torchvision(step):
    """Brightness, contrast, saturation alone (then clamped): exactly torchvision's functional op, per image."""
    torch.manual_seed(0)
    n = 12
    x = torch.rand(n, 3, 20, 20)
    factors = identity_factors(n)
    factors[step] = torch.empty(n).uniform_(0.5, 1.5)
    order = torch.rand(n, 4).argsort(1)
    m, o = jitter_matrix(*factors, order, x.mean((2, 3)))
    out = apply_color(m, o, x)
    op = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation][step]
    for i in range(n):
        torch.testing.assert_close(out[i], op(x[i], factors[step][i].item()), atol=1e-5, rtol=0)


def test_jitter_steps_compose_in_each_images_order():
    """Where no step saturates, the composed matrix is torchvision's steps in the image's drawn order
    (contrast's mean is taken after the preceding steps, as torchvision's)."""
    torch.manual_seed(0)
    n = 24
    x = torch.empty(n, 3, 16, 16).uniform_(0.35, 0.65)  # factors in 0.8-1.2 keep every step inside [0, 1]
    b, c, s = (torch.empty(n).uniform_(0.8, 1.2) for _ in range(3))
    order = torch.rand(n, 4).argsort(1)
    out = apply_color(*jitter_matrix(b, c, s, torch.zeros(n), order, x.mean((2, 3))), x)
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for i in range(n):
        expected = x[i]
        for step in order[i].tolist():
            expected = ops[step](expected, [b[i].item(), c[i].item(), s[i].item(), 0.0][step])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_hue_rotation_properties():
    """The hue step is a rotation about the gray axis, close to torchvision's HSV hue shift."""
    torch.manual_seed(0)
    turns = torch.empty(64).uniform_(-0.5, 0.5)
    r = hue_rotation(turns)
    gray = torch.ones(3)
    torch.testing.assert_close(r @ gray, gray.expand(64, 3))  # gray stays gray
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(hue_rotation(torch.zeros(1))[0], torch.eye(3))  # no shift: identity
    red, green, blue = torch.eye(3)
    third = hue_rotation(torch.tensor([1 / 3, -1 / 3]))
    torch.testing.assert_close(third[0] @ red, green, atol=1e-6, rtol=0)  # +1/3 turn: red -> green, as HSV
    torch.testing.assert_close(third[1] @ red, blue, atol=1e-6, rtol=0)
    # Luma approximately kept, and within the recipe's range (|hue| <= 0.1) close to torchvision's HSV shift.
    x = torch.rand(200, 3, 1, 1)
    h = torch.empty(200).uniform_(-0.1, 0.1)
    ours = apply_color(hue_rotation(h), torch.zeros(200, 3), x)
    theirs = torch.stack([F.adjust_hue(x[i], h[i].item()) for i in range(200)])
    luma = torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    luma_change, hsv_luma_change = ((ours - x) * luma).sum(1).abs(), ((theirs - x) * luma).sum(1).abs()
    assert luma_change.mean() < 0.04 and luma_change.max() < 0.15
    assert luma_change.mean() < hsv_luma_change.mean()  # HSV keeps max(r, g, b), not luma
    assert (ours - theirs).abs().mean() < 0.05


def test_grayscale_and_normalisation_fold_into_the_colour_map():
    """A gray, unjittered crop's map is torchvision's rgb_to_grayscale then Normalize, from 0..255 pixels."""
    n = 4
    x = torch.rand(n, 3, 8, 8) * 255
    params = {"jitter": torch.zeros(n, dtype=torch.bool), "gray": torch.tensor([True, False, True, False])}
    params.update(zip(("brightness", "contrast", "saturation", "hue"), identity_factors(n)))
    params["order"] = torch.arange(4).expand(n, 4)
    m, o = MultiCrop.color_map(params, x.mean((2, 3)) / 255)
    out = torch.einsum("nij,njhw->nihw", m, x) + o.view(-1, 3, 1, 1)
    for i in range(n):
        pixels = F.rgb_to_grayscale(x[i] / 255, 3) if params["gray"][i] else x[i] / 255
        torch.testing.assert_close(out[i], F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5, rtol=0)


def test_solarised_crops_are_exactly_the_drawn_ones():
    """Solarisation inverts pixels >= 128/255: a solarised crop has no pixel above that; others do."""
    torch.manual_seed(0)
    multicrop = MultiCrop(16, 8, global_crops=2, local_crops=1, global_blur_p=0.0, solarize_p=0.5)
    crops = multicrop(random_images(40, 24))
    brightest = denormalize(crops[0]).amax((1, 2, 3))
    solarised = multicrop.params[0]["solarize"]
    assert 0 < solarised.sum() < len(solarised)
    assert (brightest[solarised] <= SOLARIZE_THRESHOLD + 1e-4).all()
    assert (brightest[~solarised] > SOLARIZE_THRESHOLD + 0.05).float().mean() > 0.9
    assert "solarize" in multicrop.params[1] and not multicrop.params[1]["solarize"].any()  # locals: never


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
        (["--train.global_blur_p", "1.5"], "--train.global_blur_p must be a probability in [0, 1] (got 1.5)"),
        (["--train.augment", "multicrop", "--train.local_blur_p", "2"], "--train.local_blur_p must be a probability"),
        (["--train.local_blur_p", "-0.5"], "--train.local_blur_p must be >= 0"),
        (["--train.warmup_fraction", "1"], "--train.warmup_fraction must be in [0, 1) (got 1.0)"),
        (["--train.warmup_fraction", "-0.1"], "--train.warmup_fraction must be >= 0"),
        (
            ["--source", "cache", "--train.warmup_fraction", "0.1", "--train.warmup_epochs", "1"],
            "--train.warmup_fraction and --train.warmup_epochs both set the warm-up",
        ),
        (["--train.head", "trex-ocm", "--train.memory_size", "0"], "--train.memory_size must be at least 1"),
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
    cfg = parse_config(["--config", "configs/smoke_tiny.yaml", "--train.augment", "multicrop"])
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


def test_a_batch_is_cropped_in_chunks_with_the_same_result(monkeypatch):
    """`MultiCrop` runs its products on CHUNK images at a time (bounded buffers): the crops, their rows
    (crop-major over the whole batch) and the parameters are those of one pass over the batch."""
    import streamgen.train.augment as augment

    images = random_images(7, 32)
    torch.manual_seed(11)
    whole = MultiCrop(24, 10, global_crops=2, local_crops=3)(images)
    monkeypatch.setattr(augment, "CHUNK", 3)  # chunks of 3, 3 and 1 images
    torch.manual_seed(11)
    chunked = MultiCrop(24, 10, global_crops=2, local_crops=3)(images)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
