"""The dashboard and the terminal: the pieces, then one real run read back from its event files."""

import re

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import read_scalars
from test_dashboard import STREAM_WITH_VAL, pinned_cards

from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan
from streamgen.train.callbacks import (
    CAPTION_MIN_TILE,
    StreamLogger,
    captioned_grid,
    data_wait_seconds,
    gpu_devices,
    hparam_values,
    preview_rows,
    prompt_table,
)
from streamgen.train.dashboard import dashboard_query

LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) step=(?P<step>\d+)/(?P<total>\d+) loss=(?P<loss>\S+) "
    r"top1=(?P<top1>\S+) gen_img_s=(?P<gen>\S+) train_img_s=(?P<train>\S+) wait=(?P<wait>\S+) "
    r"queue=(?P<queue>\S+) lr=(?P<lr>\S+) eta=(?P<eta>\S+)( gpu_hours=(?P<gpu_hours>\S+))?$"
)


def test_captions_are_drawn_on_each_tile_and_nowhere_else():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    grid = captioned_grid(images, [f"class {i}" for i in range(16)])
    factor = CAPTION_MIN_TILE // 32  # small stream images are enlarged by a whole factor
    plain = torchvision.utils.make_grid(
        images.repeat_interleave(factor, -1).repeat_interleave(factor, -2), nrow=4, padding=2
    )
    assert grid.shape == plain.shape == (3, 4 * 128 + 5 * 2, 4 * 128 + 5 * 2)
    differs = (grid != plain).any(0)
    side = 128
    for tile in range(16):
        top, left = 2 + (tile // 4) * (side + 2), 2 + (tile % 4) * (side + 2)
        band = differs[top + side - 20 : top + side, left : left + side]
        assert band.float().mean() > 0.5, f"no caption on tile {tile}"  # the caption's band
        assert not differs[top : top + side - 40, left : left + side].any()  # the image itself is untouched


def test_big_stream_images_keep_their_resolution():
    images = torch.zeros(16, 3, 256, 256, dtype=torch.uint8)
    assert captioned_grid(images, ["x"] * 16).shape[-1] == 4 * 256 + 5 * 2


def test_prompt_table_lists_the_classes_in_grid_order():
    plan = SamplePlan(load_classes("imagenet100:10"), PromptTemplate.parse("c_hc_b"), seed=1)
    ids = np.arange(40, 56)
    rows = preview_rows(plan, ids)
    labels = plan.labels(ids)
    assert [r["id"] for r in rows] == ids.tolist() and [r["tile"] for r in rows] == list(range(16))
    assert [r["wnid"] for r in rows] == [plan.classes.classes[label].key for label in labels]
    assert [r["prompt"] for r in rows] == plan.prompts(ids)
    for row in rows:  # the caption names the class, the prompt starts with it and holds the scene
        assert row["prompt"].startswith(row["class"]) and row["prompt"].endswith(f"inside {row['scene']}")
    table = prompt_table(rows).splitlines()
    assert table[0] == "| tile | sample id | class | WordNet id | scene | prompt |"
    assert [line.split(" | ")[2] for line in table[2:]] == [r["class"] for r in rows]


def test_the_logger_uses_the_global_step_and_drops_epoch(tmp_path):
    logger = StreamLogger(save_dir=str(tmp_path), name="run", version="v", default_hp_metric=False)
    logger.global_step = lambda: 10
    logger.log_metrics({"train/loss": torch.tensor(1.5), "epoch": 0}, step=9)  # Lightning's own count
    logger.log_metrics({"stream/redraws": 3}, step=None)
    logger.experiment.flush()
    scalars = read_scalars(tmp_path / "run" / "v")
    assert scalars == {"train/loss": [(10, 1.5)], "stream/redraws": [(10, 3.0)]}


def test_hparams_are_flat_and_typed_and_every_run_has_every_key():
    flat = hparam_values({"seed": 0, "train": {"lr": 0.1, "budget_gpu_hours": None, "precision": "32-true"}})
    # null (not used by this run) as 'None': a run with a budget and one without differ in it
    assert flat == {"seed": 0, "train.lr": 0.1, "train.budget_gpu_hours": "None", "train.precision": "32-true"}


def _hparams_experiment(logdir):
    """The HPARAMS table's experiment as TensorBoard's own plugin computes it for ``logdir``."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    )
    ctx = context.RequestContext()
    return tb.experiment_from_metadata(
        ctx, "", True, tb.hparams_metadata(ctx, ""), tb.hparams_from_data_provider(ctx, "", 100)
    )


def test_hparams_of_a_logdir_mark_what_differs_and_hold_every_runs_metrics(tmp_path):
    for name, val, budget in (("with_val", True, 0.2), ("without", False, None)):
        logger = StreamLogger(save_dir=str(tmp_path), name=name, version="version_0", default_hp_metric=False)
        resolved = {"source": "stream", "prompt": "c", "train": {"budget_gpu_hours": budget, "lr": 0.1}}
        logger.log_run(resolved, [], ["train/loss"], {})
        logger.experiment.add_scalar("train/loss", 1.0, 1)
        if val:
            logger.experiment.add_scalar("val/top1", 0.5, 1)
        logger.experiment.flush()
    experiment = _hparams_experiment(tmp_path)
    differs = {h.name: h.differs for h in experiment.hparam_infos}
    assert differs == {"train.budget_gpu_hours": True, "prompt": False, "source": False, "train.lr": False}
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss", "val/top1"}  # val/top1 of the run with val


def test_the_bar_keeps_loss_wait_and_images_per_s_at_80_columns():
    from types import SimpleNamespace

    from tqdm import tqdm

    from streamgen.train.callbacks import BAR_FORMAT, StepProgressBar
    from streamgen.train.compute import ComputeMonitor

    monitor = SimpleNamespace(latest={"stream/trainer_images_per_s": 12345.0, "stream/trainer_wait_fraction": 0.5})
    compute = ComputeMonitor(4, 4, budget_gpu_hours=100.0)
    compute.step_seconds = 0.5
    trainer = SimpleNamespace(
        progress_bar_metrics={"train/loss": 6.9078, "train/top1_stream": 0.001},
        callbacks=[compute],
        global_step=123456,
        max_steps=500000,
    )
    postfix = StepProgressBar(monitor, 50, tty=False)._postfix(trainer)
    line = tqdm.format_meter(123456, 500000, 3600.0, ncols=80, prefix="train", bar_format=BAR_FORMAT, postfix=postfix)
    assert len(line) <= 80
    for kept in ("loss=6.908", "wait=50%", "img/s=12345"):
        assert kept in line, line
    assert "eta=" in postfix and "<" not in line  # our ETA (budget or max_steps), not tqdm's


def test_gpu_names_follow_the_job():
    assert gpu_devices(["cuda:0", "cuda:1"], [2, 3]) == {"generator0": 0, "generator1": 1, "trainer0": 2, "trainer1": 3}
    assert gpu_devices(["cpu", "cpu"], 1) == {}  # nothing on CPU


def test_wait_seconds_of_a_data_module_or_its_stream():
    class Stream:
        wait_seconds = 2.5

    class ByStream:
        stream = Stream()

    class Own:
        wait_seconds = 1.0

    assert data_wait_seconds(ByStream()) == 2.5 and data_wait_seconds(Own()) == 1.0
    assert data_wait_seconds(object()) == 0.0


def _events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(folder.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(path)).Load()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_runs_dashboard_and_log_lines(train_run, tmp_path):
    from conftest import write_image_folder

    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys[:3], per_class=2)
    run = train_run(
        *("--model", "fake", "--generators", "2", "--train.max_steps", "20", "--train.log_every", "5"),
        *("--train.val_dir", str(val), "--train.val_every", "10", "--train.workers", "0"),
        *("--train.preview_every", "10"),
    )
    assert run.wait(240) == 0, run.output[-3000:]
    out = run.output
    # The terminal: plain lines every log_every steps, and nothing else from the libraries.
    assert "\r" not in out
    for noise in ("Tip", "TPU available", "GPU available", "v_num", "Epoch 0", "Training", "LeafSpec", "fit` stopped"):
        assert noise not in out, noise
    lines = [LINE.match(line) for line in out.splitlines() if " step=" in line]
    assert all(lines), out
    assert [int(m["step"]) for m in lines] == [5, 10, 15, 20] and {m["total"] for m in lines} == {"20"}
    for m in lines:
        assert float(m["gen"]) > 0 and float(m["train"]) > 0 and 0 <= float(m["wait"]) <= 1
        assert 0 <= float(m["queue"]) <= 1 and float(m["lr"]) > 0 and m["eta"] != "?"
    assert lines[-1]["eta"] == "0:00:00"
    folder = tmp_path / "runs" / "smoke" / "version_0"
    # The scalars: one step convention, no epoch, integers where they count.
    scalars = read_scalars(folder)
    # Each validation is a line when it is computed, with the compute the dashboard has at that step.
    said = re.findall(r"validation at step (\d+): top1=(\S+)% top5=\S+% loss=\S+ gpu_hours=(\S+)", out)
    assert [int(step) for step, _, _ in said] == [10, 20]
    top1 = dict(scalars["val/top1"])
    compute = {step: value for step, value in scalars["compute/total_gpu_hours"]}  # a step's last value
    for step, shown, hours in said:
        assert float(shown) == pytest.approx(100 * top1[int(step)], abs=0.006)
    assert float(said[0][2]) == pytest.approx(compute[10], abs=6e-5)
    # The last line and the summary give the final figures: those of the dashboard's last point.
    final = scalars["compute/total_gpu_hours"][-1]
    assert final[0] == 20 and float(lines[-1]["gpu_hours"]) == pytest.approx(final[1], abs=6e-5)
    summary = re.search(
        r"done: 20 steps, (\d+) images seen \((\d+) unique\), loss \S+, val top-1 (\S+)%, (\S+) GPU-hours, wall \S+, checkpoint (\S+)",
        out,
    )
    assert summary, out[-2000:]
    assert int(summary[1]) == int(summary[2]) == scalars["data/images_seen"][-1][1]
    assert float(summary[3]) == pytest.approx(100 * top1[20], abs=0.006)
    assert float(summary[4]) == pytest.approx(final[1], abs=6e-5)
    assert summary[5] == str(folder / "checkpoints" / "last.ckpt")
    assert "epoch" not in scalars and not any(tag.startswith("lr-") for tag in scalars)
    for tag in ("train/loss", "train/top1_stream", "train/lr", "stream/trainer_wait_fraction", "stream/queue_fill"):
        assert [s for s, _ in scalars[tag]] == [5, 10, 15, 20], tag
    for tag in ("stream/generator_images_per_s", "stream/generator0_images_per_s", "stream/trainer_images_per_s"):
        assert [s for s, _ in scalars[tag]] == [5, 10, 15, 20], tag
    assert [s for s, _ in scalars["val/top1"]] == [10, 20]
    assert all(v == int(v) for _, v in scalars["stream/redraws"] + scalars["stream/generator_restarts"])
    total = dict(scalars["stream/generator_images_per_s"])
    each = [dict(scalars[f"stream/generator{g}_images_per_s"]) for g in (0, 1)]
    assert all(total[s] == pytest.approx(each[0][s] + each[1][s]) for s in total)
    # The images/s chart: each rate again in a sub-run of its own (a chart colours its lines by run).
    runs = sorted(p.name for p in (folder / "throughput").iterdir())
    assert runs == ["generator0", "generator1", "generators", "trainers"]
    for run, tag in zip(runs, ("generator0", "generator1", "generator", "trainer")):
        assert (
            read_scalars(folder / "throughput" / run)["throughput/images_per_s"]
            == scalars[f"stream/{tag}_images_per_s"]
        )
    # The resolved config: what ran, no `auto`, and null only for what was not asked for.
    resolved = yaml.safe_load((folder / "config.yaml").read_text())
    g, s, t = resolved["generator"], resolved["stream"], resolved["train"]
    assert (g["dtype"], g["compile"], t["precision"]) == ("float32", "off", "32-true")
    assert s["slots"] == 4 and g["threads"] >= 1  # slots: 2 generators / 1 trainer + 2 and t["threads"] >= 1
    assert "auto" not in yaml.safe_dump(resolved)
    from streamgen.config import parse_config

    assert parse_config(["--config", str(folder / "config.yaml")]).stream.slots == 4  # it runs again as it is
    # HPARAMS (the resolved config, with the metrics it shows), the config text, the layout.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    plugins: dict[str, list] = {}
    for event in _events(folder):
        for value in event.summary.value:
            plugins.setdefault(value.metadata.plugin_data.plugin_name, []).append(value)
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {v.tag: v.metadata.plugin_data.content for v in plugins["hparams"]}
    # No experiment summary: TensorBoard builds the table from every run of the logdir (the settings
    # that differ first, every scalar of every run a metric, so val/top1 where any run has it).
    assert set(hparams) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert (
        start.hparams["stream.slots"].number_value == 4 and start.hparams["train.precision"].string_value == "32-true"
    )
    assert start.hparams["train.budget_gpu_hours"].string_value == "None"  # differs from a run with a budget
    (layout,) = [v for v in plugins["custom_scalars"] if v.tag == "custom_scalars__config__"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts = {
        c.title: list(c.multiline.tag)
        for cat in layout_pb2.Layout.FromString(layout.tensor.string_val[0]).category
        for c in cat.chart
    }
    rates = [tags for title, tags in charts.items() if title.startswith("images/s: 2 generator(s)")]
    assert rates == [["throughput/images_per_s"]]
    assert charts["against compute (x: milli-GPU-hours, 1500 = 1.5 GPU-hours)"] == [r"val_by_gpu_hours/top\d"]
    val_charts = [charts[t] for t in charts if "real images" in t]
    assert val_charts == [[r"val/top\d"], ["val/loss", "val/skipped_images"]]  # fractions apart from the loss
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "peak LR is 0.1 x 8 / 256 = 0.003125" in config_text and "slots: 4" in config_text
    # The link to the Time Series page with train, stream, val pinned: printed by the launcher and
    # first in the config text; it pins only scalar tags this run wrote, in reading order.
    # The terminal says only how to watch; the long link is in the config text.
    assert "pinnedCards" not in out and f"watch: tensorboard --logdir {tmp_path / 'runs'}" in out
    link = re.search(r"\]\((\?\S+#timeseries)\)", config_text.splitlines()[0])
    tags = [card["tag"] for card in pinned_cards("http://localhost:6006/" + link[1])]
    assert tags == STREAM_WITH_VAL and set(tags) <= set(scalars)
    assert config_text.splitlines()[0].startswith("- dashboard: [") and f"]({dashboard_query(tags)})" in config_text
    # The previews: 16 captioned tiles at the stream resolution (32 px, enlarged 4x for the caption).
    image = events.Images("stream/samples")[0]
    assert (image.width, image.height) == (4 * 128 + 10, 4 * 128 + 10)
    table = events.Tensors("stream/prompts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert len(table.splitlines()) == 2 + 16


def test_gpu_figures_come_from_nvml_by_device_uuid(monkeypatch):
    """CUDA and NVML may number GPUs differently: devices are matched by UUID."""
    import sys
    import types

    from streamgen.train.callbacks import GpuReader

    uuids = {0: "aaaa", 1: "bbbb"}
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: {"GPU-aaaa": "nvml-7", "GPU-bbbb": "nvml-3"}[uuid],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu={"nvml-7": 97, "nvml-3": 12}[h]),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used={"nvml-7": 2**32, "nvml-3": 2**30}[h]),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=uuids[i]))
    figures = GpuReader({"generator0": 1, "trainer0": 0}).read()
    assert figures == {
        "workers/generator0_gpu_util": 12.0,
        "workers/generator0_gpu_memory_gib": 1.0,
        "workers/trainer0_gpu_util": 97.0,
        "workers/trainer0_gpu_memory_gib": 4.0,
    }


def test_the_layout_has_no_chart_for_what_a_run_does_not_log():
    """No val set, no probes, no GPU: TensorBoard would draw empty axes for their charts."""
    from streamgen.train.callbacks import dashboard_layout

    full = dashboard_layout(4, 0.1, 0.05, 2)
    assert list(full) == ["1 train", "2 stream", "3 val", "4 probe", "5 compute", "6 devices"]
    bare = dashboard_layout(4, 0.1, 0.05, 2, val=False, probes=False, devices=False)
    assert list(bare) == ["1 train", "2 stream", "5 compute"]
    assert bare["5 compute"] == full["5 compute"]
