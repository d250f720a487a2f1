"""eval.py's body: evaluate a trained checkpoint on ImageNet benchmarks (Tab. 1) and linear probes (Tab. 2).

    python eval.py runs/in100/version_0/checkpoints/last.ckpt --data /data/imagenet/val
    python eval.py CKPT --data in-val=/data/imagenet/val /data/imagenetv2-matched-frequency-format-val \\
        /data/sketch /data/imagenet-r /data/imagenet-a --table --out results.json
    python eval.py CKPT --probe aircraft=/data/fgvc-aircraft-2013b pets=/data/oxford-pets --seeds 3 --table

Each benchmark is read from its folder exactly as extracted from its archive; its kind is
detected, or named with NAME=ROOT (in-val, in-v2, in-sketch, in-r, in-a). Every input is
checked before the model is loaded; a bad one is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from streamgen.config import CliParser
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.evaluate.benchmarks import BENCHMARKS, Benchmark, model_samples, parse_data_spec, resolve
from streamgen.train.run_folder import last_checkpoint

DEFAULT_WORKERS = 8


class Parser(CliParser):
    """train.py's parser (closest-flag suggestions, no abbreviations); errors go through main."""

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see eval.py --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint",
        help="a checkpoint written by train.py (.../checkpoints/last.ckpt), or its run folder (its last.ckpt)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="[NAME=]ROOT",
        help=f"benchmark folders as extracted ({', '.join(BENCHMARKS)}; detected when NAME is left out), or any "
        "folder of one sub-folder per class; scored on the classes they share with the model",
    )
    parser.add_argument(
        "--probe",
        nargs="+",
        default=[],
        metavar="NAME=ROOT",
        help="linear probes on frozen features (the paper's Tab. 2): a transfer dataset name and your copy of it",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="linear probes: validation splits (mean and std) (default: %(default)s)"
    )
    parser.add_argument(
        "--crop", type=int, help="evaluation crop (default: train.crop from the checkpoint's run config.yaml, else 224)"
    )
    parser.add_argument(
        "--resize",
        type=int,
        help="resize the shorter side to this before cropping (default: crop/0.875; linear probes: crop, as trex)",
    )
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=256,
        help="images per forward pass; lower it if memory runs out (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="data-loading processes, capped at this machine's cores (default: %(default)s)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument(
        "--all_classes",
        "--all-classes",
        action="store_true",
        help="ImageNet-R/-A: predict among all the model's classes (default: among the benchmark's, its protocol)",
    )
    parser.add_argument(
        "--ignore_extra_classes", "--ignore-extra-classes", action="store_true", help=argparse.SUPPRESS
    )  # the default now: classes the model does not know are never scored
    parser.add_argument("--table", action="store_true", help="print the results as the paper's tables, in Markdown")
    parser.add_argument("--out", help="also write the results to this .json or .csv file")
    args = parser.parse_args(argv)
    if not args.data and not args.probe:
        parser.error("nothing to evaluate: give --data and/or --probe")
    return args


# -- checks: everything before the model is loaded ----------------------------------------------


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--batch_size", args.batch_size, 1),
        ("--crop", args.crop, 1),
        ("--resize", args.resize, 1),
        ("--workers", args.workers, 0),
        ("--seeds", args.seeds, 1),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")


def check_device(text: str | None):
    """The torch device to run on; one line when it does not exist here."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: this machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)")
    elif device.type != "cpu":
        raise UsageError(f"--device {text}: eval.py runs on cpu or cuda")
    return device


def check_out(path: str | None) -> Path | None:
    """The results file can be written (tried: a temporary file in its folder)."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in (".json", ".csv"):
        raise UsageError(f"--out {path}: name a .json or .csv file")
    if out.is_dir():
        raise UsageError(f"--out {path}: is a folder; name a .json or .csv file")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--out {path}: folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write in {folder} ({e.strerror}); choose another path") from None
    return out


def resolve_data(specs: list[str]) -> list[Benchmark]:
    """Every --data folder found and its layout recognised, before anything is evaluated."""
    benchmarks = []
    for spec in specs:
        name, root = parse_data_spec(spec)
        benchmarks.append(resolve(root, name, "--data"))
    return benchmarks


def parse_probes(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=ROOT`` pairs, each root read by its transfer dataset's loader now (names, layouts, splits)."""
    if not specs:
        return []
    from streamgen.evaluate.transfer import check_probes

    return check_probes(",".join(specs), "--probe")


def usable_workers(requested: int) -> int:
    """Data-loading workers never exceed this process's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(requested, cores)


def model_name(checkpoint: str) -> str:
    """``runs/NAME/version_K/checkpoints/last.ckpt`` -> ``NAME/version_K (last)``."""
    path = Path(checkpoint).resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parents[2].name}/{path.parents[1].name} ({path.stem})"
    return path.stem


# -- output ---------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, flushed and synced, then renamed: never a partial results file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def as_csv(report: dict) -> str:
    rows = [
        {"kind": "benchmark", **r, "skipped_examples": " | ".join(r["skipped_examples"])} for r in report["benchmarks"]
    ]
    rows += [
        {"kind": "probe", **{k: v for k, v in p.items() if not isinstance(v, (list, dict))}} for p in report["probes"]
    ]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def print_coverage(results: list) -> None:
    """What was scored where it was not the whole folder: common classes, skipped images; and a
    subset model's ImageNet-R/-A scores with both prediction sets."""
    from streamgen.evaluate.benchmark_eval import fmt

    for r in results:
        if r.coverage():
            print(f"  {r.title}: scored {r.coverage()}; predictions among {r.predicted_among} classes")
        if r.other_among is not None:
            print(
                f"  {r.title}: top-1 {fmt(r.top1)} predicting among {r.predicted_among} classes, "
                f"{fmt(r.other_top1)} among {r.other_among} (--all_classes swaps them)"
            )


def print_plain(results: list, probes: list[dict]) -> None:
    from streamgen.evaluate.benchmark_eval import fmt

    if results:
        print(f"{'dataset':<26} {'images':>8} {'classes':>8} {'skipped':>8} {'top-1':>7} {'top-5':>7}  folder")
        for r in results:
            print(
                f"{r.title:<26} {r.images:>8} {r.classes:>8} {r.skipped:>8} {fmt(r.top1):>7} {fmt(r.top5):>7}  {r.folder}"
            )
    print_coverage(results)
    for p in probes:
        print(
            f"probe {p['dataset']:<20} top-1 {fmt(p['top1'], p.get('top1_std'))} over {p.get('seeds', 1)} seed(s), "
            f"{p.get('n_train')} train / {p.get('n_test')} test images, {p.get('n_classes')} classes  {p['root']}"
        )


@dataclass
class Plan:
    """Everything checked: what to evaluate, with what, where the results go."""

    args: argparse.Namespace
    device: object  # torch.device
    out: Path | None
    crop: int
    crop_source: str  # where the crop came from, for the log
    model: object  # streamgen.train.model.Classifier
    benchmarks: list[tuple[Benchmark, list[tuple[str, int]]]]  # each with its images of the model's classes
    probes: list[tuple[str, str]]
    workers: int


def prepare(args: argparse.Namespace) -> Plan:
    """Every check, in order of cost; the model is loaded last. Raises UsageError."""
    check_numbers(args)
    args.checkpoint = last_checkpoint(args.checkpoint, "eval.py")  # a run folder: its last.ckpt
    device = check_device(args.device)
    out = check_out(args.out)
    benchmarks = resolve_data(args.data)
    probes = parse_probes(args.probe)

    from streamgen.evaluate.benchmark_eval import DEFAULT_CROP, load_classifier, training_crop

    trained_crop, config = training_crop(args.checkpoint)
    crop = args.crop or trained_crop or DEFAULT_CROP
    crop_source = "given" if args.crop else (f"from {config}" if trained_crop else "default")
    if args.resize is not None and args.resize < crop:
        raise UsageError(f"--resize {args.resize} is smaller than the crop {crop}; the crop must fit in the image")
    model = load_classifier(args.checkpoint, device)
    keys = list(model.hparams.class_keys)
    from streamgen.generate.shapes import check_val_set

    for b in benchmarks:  # a shapes validation set scores only the classes it was rendered for
        check_val_set(b.root, keys, "--data")
    labelled = [(b, model_samples(b, keys, "--data")) for b in benchmarks]
    return Plan(args, device, out, crop, crop_source, model, labelled, probes, usable_workers(args.workers))


def run(plan: Plan) -> tuple[list, list[dict]]:
    """Tab. 1 benchmarks, then Tab. 2 probes."""
    from streamgen.evaluate.benchmark_eval import benchmark_transform, evaluate_benchmark

    args = plan.args
    transform = benchmark_transform(plan.crop, args.resize)
    results = [
        evaluate_benchmark(plan.model, b, samples, transform, args.batch_size, plan.workers, args.all_classes)
        for b, samples in plan.benchmarks
    ]
    probes = []
    if plan.probes:
        from streamgen.evaluate.probe import evaluate_probe

        for name, root in plan.probes:
            probes.append(
                evaluate_probe(
                    plan.model, name, root, crop=plan.crop, batch_size=args.batch_size, workers=plan.workers,
                    seeds=args.seeds, device=plan.device, resize=args.resize,
                )
            )  # fmt: skip
    return results, probes


def report(plan: Plan, results: list, probes: list[dict]) -> None:
    """Print the results (plain, or as the paper's tables) and write --out."""
    from streamgen.evaluate.benchmark_eval import tab1_markdown, tab2_markdown

    args = plan.args
    if args.table:
        name = model_name(args.checkpoint)
        tables = [tab1_markdown(name, results)] if results else []
        tables += [tab2_markdown(name, probes)] if probes else []
        print("\n\n".join(tables))
        print_coverage(results)
    else:
        print_plain(results, probes)
    if plan.out is not None:
        data = {
            "checkpoint": str(args.checkpoint),
            "crop": plan.crop,
            "resize": args.resize or round(plan.crop / 0.875),
            "benchmarks": [asdict(r) for r in results],
            "probes": probes,
        }
        text = as_csv(data) if plan.out.suffix.lower() == ".csv" else json.dumps(data, indent=2) + "\n"
        write_atomically(plan.out, text)


def main(argv: list[str] | None = None) -> int:
    try:
        plan = prepare(parse_args(argv))
        resize = plan.args.resize or round(plan.crop / 0.875)
        print(f"eval.py: crop {plan.crop} ({plan.crop_source}), resize {resize}, workers {plan.workers}, {plan.device}")
        results, probes = run(plan)  # a probe may still refuse the network (UsageError)
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("eval.py: interrupted; nothing written", file=sys.stderr)
        return 130
    try:
        report(plan, results, probes)
    except OSError as e:  # checked writable up front; a disk can still fill
        print(
            f"eval.py: error: could not write --out {plan.out} ({e.strerror}); the results are above", file=sys.stderr
        )
        return 1
    return 0
