"""Train a classifier on a live stream of Stable Diffusion images.

    python train.py --config configs/smoke.yaml --generators 2 --trainers 1
    python train.py --config configs/imagenet100_sd14.yaml --generators 4 --trainers 4
    python train.py --config configs/imagenet100_sd14.yaml --resume runs/in100/version_0/checkpoints/last.ckpt

Every config key is also a flag (``python train.py --help``). See README.md.
"""

import sys

if __name__ == "__main__":  # spawned processes import this file: start nothing at import
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):  # the help needs no torch: it comes at once
        from streamgen.config import parse_config
        from streamgen.launch import DESCRIPTION

        parse_config(sys.argv[1:], prog="train.py", description=DESCRIPTION)  # prints it and exits
    try:
        from streamgen.launch.launcher import main  # seconds (torch): a Ctrl-C here is no traceback either
    except KeyboardInterrupt:
        print("train.py: interrupted while starting; nothing was started", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
