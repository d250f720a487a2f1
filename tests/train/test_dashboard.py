"""The TensorBoard link: read back with urllib and json, as TensorBoard's frontend reads it.
(That every pinned tag is one a run writes: `test_a_runs_dashboard_and_log_lines`.)"""

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from streamgen.train.dashboard import dashboard_query, dashboard_url, pinned_tags

STREAM_WITH_VAL = [
    "train/loss",
    "train/top1_stream",
    "train/lr",
    "stream/trainer_wait_fraction",
    "stream/queue_fill",
    "stream/trainer_images_per_s",
    "val/top1",
    "val/top5",
    "compute/total_gpu_hours",
    "val_by_gpu_hours/top1",
]


def pinned_cards(url: str) -> list[dict]:
    """What TensorBoard restores: the ``pinnedCards`` query parameter, percent-decoded, as JSON."""
    query = parse_qs(urlsplit(url).query, strict_parsing=True)
    assert list(query) == ["pinnedCards"] and len(query["pinnedCards"]) == 1
    return json.loads(query["pinnedCards"][0])


def test_the_link_pins_train_stream_val_cards_in_order():
    url = dashboard_url(STREAM_WITH_VAL)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == ("http", "localhost:6006", "/", "timeseries")
    assert pinned_cards(url) == [{"plugin": "scalars", "tag": tag} for tag in STREAM_WITH_VAL]
    assert " " not in url and '"' not in url and "{" not in url  # one word a terminal can turn into a link


def test_host_and_port_and_the_relative_form():
    url = dashboard_url(["train/loss"], port=6123, host="node7")
    assert urlsplit(url).netloc == "node7:6123"
    assert url == "http://node7:6123/" + dashboard_query(["train/loss"])
    relative = urlsplit(dashboard_query(["train/loss"]))  # the config text's link, inside TensorBoard
    assert (relative.scheme, relative.netloc, relative.path, relative.fragment) == ("", "", "", "timeseries")
    assert pinned_cards(dashboard_query(["train/loss"])) == [{"plugin": "scalars", "tag": "train/loss"}]


@pytest.mark.parametrize(
    "stream, val, expected",
    [
        (True, True, STREAM_WITH_VAL),
        (True, False, [*STREAM_WITH_VAL[:6], "compute/total_gpu_hours"]),
        # a cache run has no queue (no stream/queue_fill); the wait and trainer images/s remain
        (False, True, [t for t in STREAM_WITH_VAL if t != "stream/queue_fill"]),
        (False, False, [t for t in STREAM_WITH_VAL[:6] if t != "stream/queue_fill"] + ["compute/total_gpu_hours"]),
    ],
)
def test_only_the_tags_a_run_writes_are_pinned(stream, val, expected):
    assert pinned_tags(stream, val) == expected
