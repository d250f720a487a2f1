"""``python -m streamgen.prompts``: print the first samples of a run's plan, with their prompts.

    python -m streamgen.prompts --config configs/imagenet100_sd14.yaml --n 5
    python -m streamgen.prompts --classes imagenet100:10 --prompt "a photo of a {c}" --n 20

Columns: sample id, WordNet id (or class name), label, noise seed, scene, prompt. The flags are
train.py's (``--classes``, ``--prompt``, ``--seed``, ``--class_counts``, and ``--config`` for all
of them), so a preview shows exactly what a run with the same flags would generate.
"""

from __future__ import annotations

import argparse
import sys

from streamgen.config import CliParser, RunConfig, _flatten, apply, read_yaml
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import TEMPLATES, PromptTemplate, places365_scenes
from streamgen.plan.samples import SamplePlan, load_class_counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m streamgen.prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a run's YAML config (configs/...): preview its own prompts")
    parser.add_argument("--classes", help="class set, e.g. imagenet100:10 (default: the config's)")
    parser.add_argument(
        "--prompt", "--template", dest="prompt", help=f"{', '.join(TEMPLATES)} or '...{{c}}...' (default: the config's)"
    )
    parser.add_argument("--seed", type=int, help="run seed (default: the config's)")
    parser.add_argument("--class_counts", help="class proportions file or ImageFolder tree (default: the config's)")
    parser.add_argument("--n", type=int, default=10, help="how many sample ids to show")
    parser.add_argument("--start", type=int, default=0, help="first sample id")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The config's plan settings, with the flags given on top (train.py's precedence)."""
    flat = _flatten(read_yaml(args.config), args.config) if args.config else {}
    flat.update(
        {k: v for k, v in vars(args).items() if k in ("classes", "prompt", "seed", "class_counts") and v is not None}
    )
    return apply(RunConfig(), flat)


MAX_ID = 2**62  # sample ids are int64 and hashed as uint64: far beyond any run


def check_range(start: int, n: int) -> None:
    if n < 1:
        raise UsageError(f"--n must be at least 1 (got {n})")
    if start < 0:
        raise UsageError(f"--start must be a sample id >= 0 (got {start})")
    if start + n > MAX_ID:
        raise UsageError(f"--start {start} --n {n} go past the largest sample id (2^62 - 1)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_range(args.start, args.n)
        cfg = run_config(args)
        classes = load_classes(cfg.classes)
        counts = load_class_counts(cfg.class_counts, classes) if cfg.class_counts else None
        plan = SamplePlan(classes, PromptTemplate.parse(cfg.prompt), cfg.seed, counts)
    except UsageError as e:
        print(f"python -m streamgen.prompts: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    ids = range(args.start, args.start + args.n)
    scenes = [places365_scenes()[s] for s in plan.scenes(ids).tolist()] if plan.template.uses_background else None
    print("id\twnid\tlabel\tseed\tscene\tprompt")
    for i, s in enumerate(plan.samples(ids)):
        print(f"{s.id}\t{s.key}\t{s.label}\t{s.seed}\t{scenes[i] if scenes else '-'}\t{s.prompt}")
    return 0
