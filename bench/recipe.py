"""What ``stream.resolution 512`` (SD's own output size) costs against the default 256, on CPU.

    python bench/recipe.py                     # batch 256, 7 generators : 1 trainer, multi-crop
    python bench/recipe.py --batch 64 --seconds 5 --threads 2

Crops are cut from the stream's images. At 256 px a global crop of under (224/256)^2 = 77% of the
image is upsampled to 224 px (and a local crop under 14% to 96 px); at 512 px nothing is. The price:
4x the bytes per image in every queue slot (shared memory per trainer rank), in a cache (disk), and
in the multi-crop's products, which work in proportion to the image, not the crop
(`streamgen.train.augment.resized_crops`). Prints, per resolution: the share of crops upsampled
(from the recipe's scale ranges), the queue's memory per rank, the disk of an ImageNet-1K 1x cache,
and the multi-crop's images/s on this CPU (`MultiCrop`, the trainer's hot path).
"""

from __future__ import annotations

import argparse
import time

import torch

from streamgen.cache.layout import IMAGENET1K_TRAIN_IMAGES
from streamgen.config import RunConfig, local_crop_size, parse_range, slots_per_rank
from streamgen.stream.queue import slot_nbytes
from streamgen.train.augment import build_augment


def upsampled_share(resolution: int, crop: int, scale: tuple[float, float]) -> float:
    """Share of RandomResizedCrop areas drawn uniformly in ``scale`` whose side is under ``crop`` px
    (the square crop's side; the aspect ratio moves it little)."""
    low, high = scale
    threshold = min(max((crop / resolution) ** 2, low), high)
    return (threshold - low) / (high - low)


def augment_rate(cfg: RunConfig, batch: int, resolution: int, seconds: float) -> float:
    """Multi-crop images/s on this CPU at this stream resolution."""
    augment = build_augment(cfg.train)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    augment(images)  # warm-up: buffers allocated, kernels chosen
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        augment(images)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="stream.batch_size (one queue slot)")
    parser.add_argument("--generators", type=int, default=7)
    parser.add_argument("--trainers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per augmentation measurement")
    parser.add_argument("--augment-batch", type=int, default=64, help="images per augmentation call")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch}, {args.generators} generators : {args.trainers} trainer(s), {torch.get_num_threads()} thread(s)"
    )
    rows = []
    for resolution in (256, 512):
        cfg = RunConfig()
        cfg.generators, cfg.trainers = args.generators, args.trainers
        cfg.stream.resolution, cfg.stream.batch_size, cfg.train.augment = resolution, args.batch, "multicrop"
        t = cfg.train
        global_up = upsampled_share(resolution, t.crop, parse_range(t.global_scale, "train.global_scale"))
        local_up = upsampled_share(resolution, local_crop_size(t), parse_range(t.local_scale, "train.local_scale"))
        queue = slots_per_rank(cfg) * slot_nbytes(args.batch, resolution)
        cache = IMAGENET1K_TRAIN_IMAGES * 3 * resolution**2
        rate = augment_rate(cfg, args.augment_batch, resolution, args.seconds)
        rows.append((resolution, global_up, local_up, queue, cache, rate))
        print(
            f"stream.resolution {resolution}: upsampled crops {global_up:.0%} global / {local_up:.0%} local; "
            f"queue {queue / 2**30:.2f} GiB per rank ({slots_per_rank(cfg)} slots); "
            f"IN-1K 1x cache {cache / 2**30:.0f} GiB; multi-crop {rate:.0f} images/s"
        )
    (_, _, _, q256, c256, r256), (_, _, _, q512, c512, r512) = rows
    print(f"512 vs 256: queue x{q512 / q256:.2f}, cache x{c512 / c256:.2f}, multi-crop time x{r256 / r512:.2f}")


if __name__ == "__main__":
    main()
