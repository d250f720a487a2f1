"""Train a classifier on a live stream of Stable Diffusion images.

    python train.py --config configs/smoke.yaml --generators 2 --trainers 1
    python train.py --config configs/imagenet100_sd14.yaml --generators 4 --trainers 4
    python train.py --config configs/imagenet100_sd14.yaml --resume runs/in100/version_0/checkpoints/last.ckpt

Every config key is also a flag (``python train.py --help``). See README.md.
"""

import sys

from streamgen.launch import main

if __name__ == "__main__":  # spawned processes import this file: start nothing at import
    sys.exit(main())
