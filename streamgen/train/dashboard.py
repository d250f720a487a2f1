"""The link that opens TensorBoard on what a researcher looks at first: train, stream, val, cost.

TensorBoard's Time Series page orders tag groups by name (``compute``, ``data``, ``probe``
come before ``stream``, ``train``, ``val``) and opens only the first two; no event file can
change that. Its **pinned cards** come first, in the order given, and TensorBoard reads
them from the URL: ``?pinnedCards=`` + a JSON list of ``{"plugin": "scalars", "tag": ...}``
(``deserializeQueryParams`` in TensorBoard's frontend). So the launcher prints this link and
the ``config`` text carries it. Stdlib only: the launcher imports it without Lightning.
"""

from __future__ import annotations

import json
from urllib.parse import quote

TRAIN_TAGS = ("train/loss", "train/top1_stream", "train/lr")
VAL_TAGS = ("val/top1", "val/top5")
COST_TAG = "compute/total_gpu_hours"
VAL_BY_COST = "val_by_gpu_hours/top1"  # its step is milli-GPU-hours (streamgen.train.compute)


def pinned_tags(stream: bool, val: bool) -> list[str]:
    """The cards to pin, in reading order, the cost last: only tags the run writes (a cache run has no queue;
    ``val/*`` needs ``train.val_dir``). Generator images/s is left to the Custom Scalars chart
    that sets it beside trainer images/s: the wait fraction already says who is the bottleneck."""
    starved = ["stream/trainer_wait_fraction", *(["stream/queue_fill"] if stream else [])]
    cost = [COST_TAG, *([VAL_BY_COST] if val else [])]  # what the run has cost, and what it bought
    return [*TRAIN_TAGS, *starved, "stream/trainer_images_per_s", *(VAL_TAGS if val else ()), *cost]


def dashboard_query(tags: list[str]) -> str:
    """``?pinnedCards=...#timeseries``: the Time Series page with ``tags`` pinned first, in order
    (relative: it works as a link inside TensorBoard, whatever its host, port or path prefix)."""
    cards = json.dumps([{"plugin": "scalars", "tag": tag} for tag in tags], separators=(",", ":"))
    return f"?pinnedCards={quote(cards, safe='/:,')}#timeseries"


def dashboard_url(tags: list[str], port: int = 6006, host: str = "localhost") -> str:
    """The absolute link for a TensorBoard at ``host:port`` (6006: ``tensorboard``'s default)."""
    return f"http://{host}:{port}/{dashboard_query(tags)}"
