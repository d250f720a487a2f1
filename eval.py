"""Evaluate a trained streamgen checkpoint on folders of real images.

    python eval.py runs/in100/version_0/checkpoints/last.ckpt --data /data/imagenet/val
    python eval.py CKPT --data /data/imagenet/val /data/imagenetv2 /data/imagenet-r --out results.json

Each folder holds one sub-folder per WordNet id (the ImageNet-val layout). Prints top-1/top-5
per folder as a table; ``--out`` also writes them as JSON.
"""

import argparse
import json
import sys
from dataclasses import asdict

import torch

from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.evaluate import evaluate_folder, load_classifier


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument(
        "--data", nargs="+", required=True, help="folders of real images, one sub-folder per WordNet id"
    )
    parser.add_argument("--crop", type=int, default=224, help="evaluation crop; use the training crop (train.crop)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--all-classes",
        action="store_true",
        help="score among all the model's classes even when a folder holds fewer (default: among the folder's, the ImageNet-R/A protocol)",
    )
    parser.add_argument(
        "--ignore-extra-classes",
        action="store_true",
        help="skip sub-folders of classes the model was not trained on (default: an error)",
    )
    parser.add_argument("--out", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = load_classifier(args.checkpoint, torch.device(args.device))
        results = [
            evaluate_folder(
                model, root, args.crop, args.batch_size, args.workers, not args.all_classes, args.ignore_extra_classes
            )
            for root in args.data
        ]
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{'folder':<40} {'images':>8} {'classes':>8} {'top-1':>7} {'top-5':>7}")
    for r in results:
        print(f"{r.folder:<40} {r.images:>8} {r.classes:>8} {r.top1:>7.2f} {r.top5:>7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
