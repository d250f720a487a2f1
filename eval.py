"""Evaluate a trained streamgen checkpoint: ImageNet benchmarks (Tab. 1) and linear probes (Tab. 2).

    python eval.py runs/in100/version_0/checkpoints/last.ckpt --data /data/imagenet/val
    python eval.py CKPT --data in-val=/data/imagenet/val /data/imagenetv2-matched-frequency-format-val \\
        /data/sketch /data/imagenet-r /data/imagenet-a --table --out results.json
    python eval.py CKPT --probe aircraft=/data/fgvc-aircraft-2013b pets=/data/oxford-pets --seeds 3 --table

``python eval.py --help`` lists every flag; the body is `streamgen.evaluate.cli`. See README.md.
"""

import sys

if __name__ == "__main__":
    from streamgen.evaluate.cli import main

    sys.exit(main())
