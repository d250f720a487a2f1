import torch

from streamgen.augment import IMAGENET_MEAN, eval_transform, random_resized_boxes, train_augment


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
