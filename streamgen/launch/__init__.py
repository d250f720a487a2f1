"""Launch: check everything, then start and own every process of a run (train.py, the cache CLI).

`checks` (`prepare`: config -> a checked `Job`, or one line and exit 2), `cache_checks` (the same
for ``--source cache``), `resume` (the checkpoint a run resumes from), `nodes` (placement over
several nodes and the launchers' handshake), `rank` (the body of a trainer rank process),
`launcher` (train.py's body: supervise, stop and save), `cache_cli` (``python -m
streamgen.cache``). The only stage that may import every other.
"""

# train.py's description: here, not in the launcher, so that ``train.py --help`` imports no torch.
DESCRIPTION = (
    "Train a classifier from scratch on a live stream of Stable Diffusion images. "
    "Start from a config in configs/ and override keys with flags; watch with "
    "`tensorboard --logdir runs`."
)
