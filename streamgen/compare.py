"""Compare runs at equal compute: one figure and a Markdown table from their TensorBoard events.

    python -m streamgen.compare runs/in100_cache1x/version_0 runs/in100_stream/version_0 --out cmp

A run is a folder written by ``train.py`` (``runs/NAME/version_K``: ``config.yaml`` and
TensorBoard event files). For each run this reads the scalars logged so far (a run that is
still going is read as far as it got) and writes into ``--out``:

- ``compare.png`` (200 dpi) with ``compare.pdf`` and ``compare.svg`` beside it: validation
  top-1 and top-5, linear-probe top-1 (``probe/<name>/top1``) and the training loss (smoothed,
  over the faint raw curve), each logged by some run, against accounted compute (total
  GPU-hours, see `streamgen.train.compute`), against images seen and against unique images
  (generated and trained on: a replay or cache run sees each several times); one colour per
  setting. Runs are labelled by the settings that differ between them: the arm along the reuse
  knob (``stream``, ``reuse 4``, ``reuse auto``, ``cache 1x``), the replay buffer, prompt,
  guidance, generator; runs of one setting that differ only in their seed are drawn as their
  mean +- std. The compute panels mark the matched budget (a dashed line) and each cache's
  build cost (a dotted line in its colour: training starts there);
- ``compare.md``: a summary of each run, and each run's metrics at matched budgets: the largest
  budget every run has reached, and fractions of it; a metric "at budget B" is its last value
  logged at or before B GPU-hours (with a mean +- std row for the seeds of one setting). A run
  with no point within the matched budget (a cache whose build costs more) is warned about.

A metric logged at step s is placed at the compute and images seen of step s: the values
logged at s when there are any (`ComputeMonitor` logs them at every evaluation), else
interpolated linearly between the nearest logged steps.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from streamgen.errors import EXIT_USAGE, UsageError

FIGURE, TABLE = "compare.png", "compare.md"
VECTOR = ("compare.pdf", "compare.svg")  # the figure for a paper, beside the PNG
DPI = 200
GENERATOR = "compute/generator_gpu_hours"
# Settings that name a run when they differ between the runs compared (dotted config keys, and
# "arm": where the run lies along the reuse knob, `Run.arm`), with the word the label shows.
LABEL_KEYS = {
    "arm": "",
    "stream.buffer": "buffer",
    "prompt": "prompt",
    "generator.guidance": "guidance",
    "model": "model",
    "generator.steps": "steps",
    "generator.scheduler": "scheduler",
    "generator.resolution": "resolution",
}
SMOOTHING = 0.8  # the training loss: exponential smoothing (TensorBoard's slider) over the faint raw curve
TOTAL, SEEN, UNIQUE = "compute/total_gpu_hours", "data/images_seen", "data/unique_images"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# Metrics compared, in order: (tag, title, percent: the factor to a percentage, None for a loss).
# Validation accuracies are logged as fractions, linear probes (streamgen.evaluate.probe_callback) in percent.
VAL_METRICS = (("val/top1", "validation top-1 (%)", 100.0), ("val/top5", "validation top-5 (%)", 100.0))
LOSS = ("train/loss", "training loss (on the run's own images)", None)


@dataclass
class Run:
    folder: Path
    label: str
    config: dict[str, Any]
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values), by step
    x: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # tag -> {"gpu_hours", "images", "unique"}
    setting: str = ""  # the label of its setting (the runs of one setting differ only in their seed)

    @property
    def build_gpu_hours(self) -> float | None:
        """A cache run's build cost (its generator compute), where training starts on the x-axis."""
        if self.config.get("source") != "cache" or GENERATOR not in self.scalars:
            return None
        return float(self.scalars[GENERATOR][1][0])

    @property
    def gpu_hours(self) -> float:
        """Compute reached so far: the last logged total."""
        return float(self.scalars[TOTAL][1][-1])

    @property
    def arm(self) -> str:
        """Where along the reuse knob the run lies: ``stream``, ``reuse 4``, ``reuse auto``, ``cache 1x``."""
        c = self.config
        if c.get("source", "stream") == "cache":
            cache = c.get("cache") or {}
            if cache.get("scale"):
                return f"cache {cache['scale']:g}x"
            return f"cache {cache['images']} images" if cache.get("images") else "cache"
        reuse = str((c.get("stream") or {}).get("reuse", "1"))
        return "stream" if reuse == "1" else f"reuse {reuse}"

    def describe(self) -> str:
        """The run's source in words: ``stream, 2 generator(s), 1 trainer(s)``, ``stream, reuse 4
        (buffer 64), ...``, ``cache (320 images), 1 trainer(s)``."""
        c = self.config
        trainers = f"{c.get('trainers', '?')} trainer(s)"
        if c.get("source", "stream") == "cache":  # its generators only built the cache (the build cost counts)
            cache = c.get("cache") or {}
            size = f"{cache['images']} images" if cache.get("images") else f"{cache.get('scale')}x real size"
            return f"cache ({size}), {trainers}"
        source = "stream"
        if self.arm != "stream":  # a replay run: its reuse and buffer
            buffer = (c.get("stream") or {}).get("buffer")
            source += f", {self.arm}" + (f" (buffer {buffer})" if buffer else "")
        return f"{source}, {c.get('generators', '?')} generator(s), {trainers}"


# -- reading ----------------------------------------------------------------------------------------


def check_run_folder(folder: Path) -> None:
    """UsageError unless ``folder`` is a run (config.yaml and at least one event file)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such run folder")
    if not (folder / "config.yaml").is_file():
        versions = sorted(p.name for p in folder.glob("version_*") if (p / "config.yaml").is_file())
        hint = f"; its runs are {', '.join(str(folder / v) for v in versions)}" if versions else ""
        raise UsageError(f"{folder} is not a run folder (no config.yaml): give runs/NAME/version_K{hint}")
    if not any(folder.glob("events.out.tfevents.*")):
        raise UsageError(f"{folder} holds no TensorBoard event file yet: has the run started?")


def read_scalars(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar series of a run folder, sorted by step (the last value wins on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        series[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return series


def at_steps(series: tuple[np.ndarray, np.ndarray], steps: np.ndarray) -> np.ndarray:
    """The series' value at each of ``steps``: exact where logged, else linear between neighbours
    (and along the last two points' slope past the end)."""
    xs, ys = series
    values = np.interp(steps, xs, ys)
    if len(xs) >= 2:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        after = steps > xs[-1]
        values[after] = ys[-1] + slope * (steps[after] - xs[-1])
    return values


def load_run(folder: Path) -> Run:
    check_run_folder(folder)
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{folder}/config.yaml is not readable: {e}") from None
    scalars = read_scalars(folder)
    if TOTAL not in scalars:
        raise UsageError(
            f"{folder} has no {TOTAL} yet: a run logs its compute every train.log_every steps "
            "(runs made before compute accounting cannot be compared by cost)"
        )
    run = Run(folder, f"{folder.parent.name}/{folder.name}", config, scalars)
    images, unique = scalars.get(SEEN), scalars.get(UNIQUE)
    for tag, (steps, _) in scalars.items():
        seen = at_steps(images, steps) if images is not None else steps * _images_per_step(config)
        run.x[tag] = {
            "gpu_hours": at_steps(scalars[TOTAL], steps),
            "images": seen,
            "unique": at_steps(unique, steps) if unique is not None else seen,  # no replay logged: all new
        }
    return run


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def label_runs(runs: list[Run]) -> None:
    """Each run's ``setting``: the settings that differ between the runs (`LABEL_KEYS`, the arm first),
    and its ``label``: the setting, with its seed where runs of one setting differ only in it, or
    with its folder where nothing tells them apart."""
    flats = [{"arm": r.arm, **_flat(r.config)} for r in runs]
    keys = [k for k in LABEL_KEYS if len({repr(f.get(k)) for f in flats}) > 1]
    for r, f in zip(runs, flats):
        parts = []
        for key in keys:
            value = f.get(key)
            if value is None or (key.startswith("stream.") and f.get("source") == "cache"):
                continue  # unset, or a stream setting a cache run does not read
            word = LABEL_KEYS[key]
            parts.append(f"{word} {value}" if word else str(value))
        r.setting = ", ".join(parts) if keys else r.label
    for setting in {r.setting for r in runs}:
        group = [(r, f) for r, f in zip(runs, flats) if r.setting == setting]
        if len(group) == 1:
            group[0][0].label = setting
            continue
        seeds = [f.get("seed") for _, f in group]
        by_seed = len(set(map(repr, seeds))) == len(group)
        for (r, _), seed in zip(group, seeds):
            r.label = f"{setting}, seed {seed}" if by_seed else f"{setting} ({r.folder.parent.name}/{r.folder.name})"
            if not by_seed:
                r.setting = r.label  # not seeds of one setting: each its own line


def settings(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each setting, in the order given."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.setting, []).append(r)
    return groups


def _images_per_step(config: dict[str, Any]) -> int:
    return int((config.get("stream") or {}).get("batch_size", 1)) * int(config.get("trainers", 1))


def compared_metrics(runs: list[Run]) -> list[tuple[str, str, float | None]]:
    """Validation top-1/top-5, each probe's top-1 logged by any run, then the training loss."""
    tags = set().union(*(r.scalars for r in runs))
    probes = sorted(t for t in tags if t.startswith("probe/") and t.endswith("/top1"))
    metrics = list(VAL_METRICS)
    metrics += [(t, f"linear probe {t[len('probe/') : -len('/top1')]} top-1 (%)", 1.0) for t in probes]
    return [*metrics, LOSS]


def plotted_metrics(
    runs: list[Run], metrics: list[tuple[str, str, float | None]]
) -> list[tuple[str, str, float | None]]:
    """The metrics some run logged: the figure has no empty panel."""
    return [m for m in metrics if any(m[0] in r.scalars for r in runs)]


# -- at matched budgets -----------------------------------------------------------------------------


def value_at_budget(run: Run, tag: str, budget: float) -> tuple[int, float] | None:
    """(step, value) of the last point of ``tag`` logged at or before ``budget`` GPU-hours."""
    if tag not in run.scalars:
        return None
    steps, values = run.scalars[tag]
    within = np.nonzero(run.x[tag]["gpu_hours"] <= budget * (1 + 1e-9))[0]
    if len(within) == 0:
        return None
    i = within[-1]
    return int(steps[i]), float(values[i])


def matched_budgets(runs: list[Run], fractions: tuple[float, ...] = FRACTIONS) -> list[float]:
    """Fractions of the largest budget every run has reached."""
    common = min(r.gpu_hours for r in runs)
    return [common * f for f in fractions]


def budget_warnings(runs: list[Run]) -> list[str]:
    """A line for each run with no logged point at or before the matched budget (a cache whose
    build alone cost more, a run that logged late): it has nothing to compare there."""
    common = min(r.gpu_hours for r in runs)
    warnings = []
    for r in runs:
        first = float(r.scalars[TOTAL][1][0])
        if first > common * (1 + 1e-9):
            build = r.config.get("source") == "cache"
            why = " (its cache's build alone costs more)" if build else ""
            warnings.append(
                f"{r.label} ({r.folder}) has no point within the matched budget of {common:.4g} GPU-hours: its first is at "
                f"{first:.4g}{why}"
            )
    return warnings


def _fmt(value: float | None, percent: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{percent * value:.2f}" if percent else f"{value:.4f}"


def markdown(runs: list[Run], metrics: list[tuple[str, str, float | None]], fractions: tuple[float, ...]) -> str:
    lines = ["# Runs compared at equal compute", "", f"![validation against compute and images]({FIGURE})", ""]
    lines += ["| run | folder | source | GPU-hours so far | steps | images seen | unique images |"]
    lines += ["|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        steps, seen = r.scalars[TOTAL][0][-1], r.scalars.get(SEEN, (None, [float("nan")]))[1][-1]
        unique = r.scalars.get(UNIQUE, (None, [float("nan")]))[1][-1]
        lines.append(
            f"| {r.label} | {r.folder} | {r.describe()} | {r.gpu_hours:.4g} | {steps} | {seen:.0f} | {unique:.0f} |"
        )
    warnings = budget_warnings(runs)
    if warnings:
        lines += ["", *(f"> **Warning**: {w}" for w in warnings)]
    lines += ["", "## At matched budgets", ""]
    lines += [
        "Each metric's last value logged at or before the budget (GPU-hours: device-hours held by the run's "
        "generators and trainers, plus a cache's build); accuracies in %. The largest budget is the compute "
        "that every run has reached.",
        "",
    ]
    header = ["budget (GPU-hours)", "run", "step", "images seen", "unique images", *[t for _, t, _ in metrics]]
    # The run column left-aligned (names read from the left), the numbers right-aligned.
    lines += ["| " + " | ".join(header) + " |", "|---:|:---|" + "---:|" * (len(header) - 2)]
    groups = settings(runs)
    for budget in matched_budgets(runs, fractions):
        for r in runs:
            at = value_at_budget(r, TOTAL, budget)
            seen, unique = value_at_budget(r, SEEN, budget), value_at_budget(r, UNIQUE, budget)
            cells = [
                f"{budget:.4g}",
                r.label,
                str(at[0]) if at else "—",
                f"{seen[1]:.0f}" if seen else "—",
                f"{unique[1]:.0f}" if unique else "—",
                *[_fmt((value_at_budget(r, tag, budget) or (0, None))[1], pct) for tag, _, pct in metrics],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        for setting, group in groups.items():
            if len(group) > 1:  # the seeds of one setting: their mean +- std
                cells = [f"{budget:.4g}", f"**{setting}** (mean ± std, {len(group)} seeds)", "", "", ""]
                for tag, _, pct in metrics:
                    values = [(value_at_budget(r, tag, budget) or (0, None))[1] for r in group]
                    cells.append(_mean_std(values, pct))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float | None], percent: float | None) -> str:
    """Mean +- (sample) std of every seed's value; a dash unless every seed has one."""
    if any(v is None or not math.isfinite(v) for v in values):
        return "—"
    scale = percent or 1.0
    a = np.array(values, dtype=np.float64) * scale
    digits = 2 if percent else 4
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


# -- the figure -------------------------------------------------------------------------------------


def smoothed(values: np.ndarray, weight: float = SMOOTHING) -> np.ndarray:
    """Exponential smoothing with TensorBoard's debiasing (its smoothing slider at ``weight``)."""
    out, last = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def _common_points(group: list[Run], tag: str, xkey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (the mean over seeds), mean and std of ``tag`` at the steps every run of the group logged."""
    having = [r for r in group if tag in r.scalars]
    steps = sorted(set.intersection(*(set(r.scalars[tag][0].tolist()) for r in having)))
    xs, ys = [], []
    for r in having:
        index = {s: i for i, s in enumerate(r.scalars[tag][0].tolist())}
        picks = [index[s] for s in steps]
        xs.append(r.x[tag][xkey][picks])
        ys.append(r.scalars[tag][1][picks])
    x, y = np.mean(xs, axis=0), np.array(ys)
    return x, y.mean(axis=0), (y.std(axis=0, ddof=1) if len(having) > 1 else np.zeros(len(steps)))


def figure(runs: list[Run], metrics: list[tuple[str, str, float | None]]):
    """The figure (see the module docstring); its lines carry the setting as their label."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metrics = plotted_metrics(runs, metrics)
    groups = settings(runs)
    fig, axes = plt.subplots(len(metrics), 3, figsize=(17, 3.2 * len(metrics)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {setting: colors[i % len(colors)] for i, setting in enumerate(groups)}
    matched = min(r.gpu_hours for r in runs)
    axes_x = (
        ("gpu_hours", "GPU-hours (accounted compute)"),
        ("images", "images seen"),
        ("unique", "unique images (generated and trained on)"),
    )
    for row, (tag, title, percent) in enumerate(metrics):
        scale = percent or 1.0
        for col, (xkey, xlabel) in enumerate(axes_x):
            ax = axes[row][col]
            for setting, group in groups.items():
                if not any(tag in r.scalars for r in group):
                    continue
                c = color[setting]
                if len(group) > 1:  # seeds of one setting: mean +- std
                    x, mean, std = _common_points(group, tag, xkey)
                    ax.plot(x, mean * scale, color=c, label=f"{setting} (mean of {len(group)} seeds)")
                    ax.fill_between(x, (mean - std) * scale, (mean + std) * scale, color=c, alpha=0.2, linewidth=0)
                    continue
                (r,) = group
                xs, ys = r.x[tag][xkey], r.scalars[tag][1] * scale
                if tag == LOSS[0]:  # noisy: the smoothed curve over the faint raw one
                    ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8, label="_raw")
                    ax.plot(xs, smoothed(ys), color=c, label=setting)
                else:
                    marker = "o" if len(ys) <= 20 else None  # a few evaluations: show each point
                    ax.plot(xs, ys, color=c, marker=marker, markersize=3, label=setting)
            if xkey == "gpu_hours":
                ax.axvline(matched, color="grey", linestyle="--", linewidth=1, label="matched budget")
                for setting, group in groups.items():
                    build = group[0].build_gpu_hours
                    if build is not None:
                        ax.axvline(build, color=color[setting], linestyle=":", linewidth=1.2, label="cache build")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color[s], label=s) for s in groups]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="matched budget"))
    if any(g[0].build_gpu_hours is not None for g in groups.values()):
        handles.append(plt.Line2D([], [], color="black", linestyle=":", label="cache build cost (training starts)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.2 * len(metrics))))
    return fig


# -- writing ----------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, then rename over ``path``;
    readable by others as any new file is (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for {FIGURE} and {TABLE}")
    for name in (FIGURE, *VECTOR, TABLE):
        if (out / name).exists() and not overwrite:
            raise UsageError(f"{out / name} exists: pass --overwrite to replace it, or another --out")
    parent = out if out.exists() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {parent}")


def compare(folders: list[Path], out: Path, overwrite: bool = False, fractions: tuple[float, ...] = FRACTIONS):
    """Read the runs, check everything, then write the figure and the table; returns their paths."""
    resolved = [f.resolve() for f in folders]
    for i, f in enumerate(resolved):
        if f in resolved[:i]:
            raise UsageError(f"{folders[i]} is given twice")
    check_out(out, overwrite)
    runs = [load_run(f) for f in folders]
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = str(r.folder)
    label_runs(runs)
    metrics = compared_metrics(runs)
    for warning in budget_warnings(runs):
        print(f"python -m streamgen.compare: warning: {warning}", file=sys.stderr)
    fig, text = figure(runs, metrics), markdown(runs, metrics, fractions)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / FIGURE, lambda f: fig.savefig(f, format="png", dpi=DPI))
        for name in VECTOR:
            _atomic_write(out / name, lambda f, kind=name.rsplit(".", 1)[1]: fig.savefig(f, format=kind))
        _atomic_write(out / TABLE, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UsageError(f"cannot write in --out {out}: {e.strerror or e}") from None
    return out / FIGURE, out / TABLE


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], e.g. 0.25,0.5,1 (got {text!r})")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m streamgen.compare",
        description="Compare runs at equal compute: one PNG figure and a Markdown table (works on running runs).",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders: runs/NAME/version_K")
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {FIGURE} and {TABLE} (made if needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace compare.png/compare.md already in --out")
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=FRACTIONS,
        help="budgets of the table, as fractions of the largest budget every run reached (default: 0.25,0.5,0.75,1)",
    )
    args = parser.parse_args(argv)
    try:
        figure_path, table_path = compare(args.runs, args.out, args.overwrite, args.fractions)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {figure_path} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
