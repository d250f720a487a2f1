"""``--model shapes``: class-conditional procedural images, a benchmark a CPU learns in a minute.

Every class is one distinct combination of three factors (`family`), each shared by several
classes, so that no single one gives the class away:

- a shape: disk, square, triangle, ring, cross, star;
- a texture on it: solid, stripes, checker, dots;
- a colour relation between shape and background: complementary hues, or hues a quarter turn
  apart. The hue itself is a nuisance (drawn per sample), so the mean colour of an image says
  nothing about its class, and colour jitter or grayscale leave shape and texture to learn.

Every nuisance (hue, saturation, brightness, position, scale, rotation, texture frequency and
phase, the background's gradient and the pixel noise) comes from a numpy Generator seeded by
the sample's noise seed alone, and each image is rendered on its own: the image of a sample is
the same alone, in any batch and in any process (the plan's promise, as for Stable Diffusion).
`FAMILIES` classes at most; more is refused before anything starts (`check_class_count`).

Its held-out validation set (`render_val_set`, ``python -m streamgen.shapes val``) is rendered by
the same code with seeds of their own: ``2**63 + hash(class, j)``. The plan's noise seeds, and
their redraw seeds, are below 2**63 (`streamgen.plan.samples.SEED_MASK`), so no validation image
is ever a training image.

``--generator.seconds_per_image S`` (the built-in generators only) makes each image take S
seconds of its generator's time (it sleeps for the rest): the cost ratio of generation to
training that Stable Diffusion and a ResNet have on GPUs, on a CPU (see README, the smoke pair).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generate.fake import FAKE
from streamgen.plan.samples import hash_ids, redraw_seed

SHAPES = "shapes"  # --model shapes
PROCEDURAL = (FAKE, SHAPES)  # the built-in generators without diffusion
VAL_MANIFEST = "shapes-val.json"  # in a rendered validation set: the class keys in label order
SHAPE_NAMES = ("disk", "square", "triangle", "ring", "cross", "star")
TEXTURE_NAMES = ("solid", "stripes", "checker", "dots")
RELATION_NAMES = ("complementary", "quarter")  # hue offset of the background: 1/2 or 1/4 turn
BAD_ENV = "STREAMGEN_SHAPES_BAD"  # testing hook: ``P`` makes a fraction P of first draws come out black
_VAL_STREAM = 0x56414C  # "VAL": the validation set's own seed stream
VAL_SEED_BASE = 1 << 63  # every validation seed is >= this; every plan seed is below it


def _families() -> list[tuple[int, int, int]]:
    """(shape, texture, relation) of class c, in an order where consecutive classes change every
    factor: the first 6 classes have 6 shapes, and the classes that share a shape differ in
    texture and relation."""
    n_s, n_t, n_r = len(SHAPE_NAMES), len(TEXTURE_NAMES), len(RELATION_NAMES)
    out = []
    for k in range(n_s * n_t * n_r):
        a, s = divmod(k, n_s)  # a: how many times the shapes have cycled
        t = (3 * a + s) % n_t  # 3 is invertible mod 4: for a fixed shape, a -> texture is one-to-one
        r = (a // n_t + s) % n_r
        out.append((s, t, r))
    assert len(set(out)) == len(out)
    return out


FAMILY_LIST = _families()
FAMILIES = len(FAMILY_LIST)  # 48: the most classes the generator can make distinct


def family(label: int) -> tuple[str, str, str]:
    """The (shape, texture, colour relation) names of class ``label``."""
    s, t, r = FAMILY_LIST[label]
    return SHAPE_NAMES[s], TEXTURE_NAMES[t], RELATION_NAMES[r]


def check_class_count(n: int, what: str = "--model shapes") -> None:
    if n > FAMILIES:
        raise UsageError(
            f"{what} makes at most {FAMILIES} distinct classes ({len(SHAPE_NAMES)} shapes x {len(TEXTURE_NAMES)} "
            f"textures x {len(RELATION_NAMES)} colour relations); the run has {n}: use --classes with at most "
            f"{FAMILIES} (e.g. imagenet100:{min(n, FAMILIES)})"
        )


def check_procedural(model: str, keys: list[str], seconds_per_image: float | None) -> None:
    """The launcher's checks of the built-in generators' settings (one line, exit 2)."""
    if model == SHAPES:
        check_class_count(len(keys))
    if seconds_per_image is not None and model not in PROCEDURAL:
        raise UsageError(
            f"--generator.seconds_per_image paces the built-in generators ({', '.join(PROCEDURAL)}) only; "
            f"--model {model} runs at its own speed: leave it unset"
        )


def check_val_set(folder: str | Path, keys: list[str], flag: str = "--train.val_dir") -> None:
    """A shapes validation set (it holds `VAL_MANIFEST`) renders class i of *its* class list with
    family i: it scores a run only if its classes are the run's, in the same order."""
    import json

    path = Path(folder) / VAL_MANIFEST
    if not path.is_file():
        return  # not a shapes validation set: labelled by folder name as any benchmark
    try:
        theirs = json.loads(path.read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{flag} {folder}: {VAL_MANIFEST} is unreadable; render the set again") from None
    if list(theirs) != list(keys):
        raise UsageError(
            f"{flag} {folder} was rendered for {len(theirs)} other classes (or another order) than this run's "
            f"{len(keys)}: render it for this run with python -m streamgen.shapes val DIR --classes <the run's --classes>"
        )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One RGB colour in [0, 1] from hue (turns), saturation and value."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft (anti-aliased) coverage of a unit-radius shape at rotated coordinates (u, v)."""
    r = np.hypot(u, v)
    if shape == 0:  # disk
        d = r - 1.0
    elif shape == 1:  # square
        d = np.maximum(np.abs(u), np.abs(v)) - 0.82
    elif shape == 2:  # triangle: three half-planes
        angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3 + np.pi / 2
        d = np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - 0.58
    elif shape == 3:  # ring
        d = np.abs(r - 0.78) - 0.24
    elif shape == 4:  # cross
        d = np.minimum(np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0), np.maximum(np.abs(v) - 0.3, np.abs(u) - 1.0))
    else:  # five-pointed star
        theta = np.arctan2(v, u)
        d = r - (0.62 + 0.38 * np.cos(5 * theta))
    return np.clip(0.5 - d * 12.0, 0.0, 1.0)  # ~1/12 of the radius of soft edge


def _texture(texture: int, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Where the shape takes its second colour (0..1), in the shape's own frame."""
    if texture == 0:
        return np.zeros_like(u)
    if texture == 1:  # stripes across the shape
        return (np.sin(u * freq + phase) > 0).astype(np.float64)
    if texture == 2:  # checker
        return ((np.sin(u * freq + phase) * np.sin(v * freq + phase)) > 0).astype(np.float64)
    cell = 2 * np.pi / freq  # dots on a grid
    du, dv = (u + phase / freq) % cell - cell / 2, (v + phase / freq) % cell - cell / 2
    return (np.hypot(du, dv) < cell * 0.3).astype(np.float64)


def render(label: int, seed: int, size: int) -> np.ndarray:
    """uint8 ``[3, size, size]``: class ``label``'s image for noise seed ``seed`` (any int >= 0)."""
    shape, texture, relation = FAMILY_LIST[label]
    rng = np.random.default_rng(int(seed))
    hue, sat = rng.random(), rng.uniform(0.55, 1.0)
    light_object = rng.random() < 0.5  # light shape on dark ground, or the reverse
    v_obj, v_bg = (rng.uniform(0.75, 1.0), rng.uniform(0.2, 0.45))[:: 1 if light_object else -1]
    obj = _hsv(hue, sat, v_obj)
    # the texture's second colour: the object's hue, on the other side of the background's brightness
    second = _hsv((hue + rng.uniform(-0.05, 0.05)) % 1.0, sat * 0.5, v_bg * 0.4 if light_object else 0.95)
    bg = _hsv((hue + (0.5 if relation == 0 else 0.25)) % 1.0, rng.uniform(0.45, 0.9), v_bg)
    radius = rng.uniform(0.45, 0.62)
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    angle = rng.uniform(-0.5, 0.5)  # radians: up to ~30 degrees either way
    freq, phase = rng.uniform(6.0, 8.0), rng.uniform(0, 2 * np.pi)  # 2 to 3 periods across
    grad_dir, grad_amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.25)
    noise_rng = np.random.default_rng(rng.integers(1 << 62))

    coords = (np.arange(size) + 0.5) / size * 2 - 1  # [-1, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    u, v = ((x - cx) * c + (y - cy) * s) / radius, (-(x - cx) * s + (y - cy) * c) / radius
    cover = _mask(shape, u, v)[..., None]
    inner = _texture(texture, u, v, freq, phase)[..., None]
    ground = bg * (1.0 + grad_amp * (x * np.cos(grad_dir) + y * np.sin(grad_dir)))[..., None]
    paint = obj * (1 - inner) + second * inner
    image = ground * (1 - cover) + paint * cover + noise_rng.normal(0, 0.03, (size, size, 1))
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _forced_bad(seeds: list[int], fraction: float) -> list[bool]:
    """The testing hook's choice of first draws that come out black: a hash of the seed."""
    if fraction <= 0:
        return [False] * len(seeds)
    h = hash_ids(0xBAD, np.asarray(seeds, dtype=np.uint64))
    return (h % np.uint64(1 << 20) < np.uint64(int(fraction * (1 << 20)))).tolist()


class ShapesGenerator:
    """The generator interface of `streamgen.generate.diffusion.DiffusionGenerator` for
    ``--model shapes``; ``class_conditional``: the worker hands it each sample's label."""

    class_conditional = True

    def __init__(self, cfg: GeneratorConfig, out_resolution: int, device: torch.device) -> None:
        self.cfg, self.out_resolution, self.device = cfg, out_resolution, device
        self.seconds_per_image = cfg.seconds_per_image or 0.0
        self.bad_fraction = float(os.environ.get(BAD_ENV, "0") or 0)
        self.redraws = 0

    def _draw(self, label: int, seed: int, attempt: int, forced_bad: bool) -> np.ndarray:
        if forced_bad and attempt == 0:
            return np.zeros((3, self.out_resolution, self.out_resolution), np.uint8)
        return render(label, seed if attempt == 0 else redraw_seed(seed, attempt), self.out_resolution)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], labels: np.ndarray) -> torch.Tensor:
        r = self.out_resolution
        out = torch.empty(len(seeds), 3, r, r, dtype=torch.uint8, device=self.device)
        self.generate_into(out, prompts, seeds, labels)
        return out

    @torch.inference_mode()
    def generate_into(self, out: torch.Tensor, prompts: list[str], seeds: list[int], labels: np.ndarray) -> None:
        """Each sample rendered on its own; a black image is redrawn (as `DiffusionGenerator` does)
        with `redraw_seed`, at most ``max_redraws`` times."""
        started = time.monotonic()
        bad = _forced_bad(seeds, self.bad_fraction)
        images = []
        for label, seed, forced in zip(np.asarray(labels).tolist(), seeds, bad):
            image, attempt = self._draw(label, int(seed), 0, forced), 0
            while not image.any() and attempt < self.cfg.max_redraws:
                attempt += 1
                self.redraws += 1
                image = self._draw(label, int(seed), attempt, forced)
            images.append(image)
        out.copy_(torch.from_numpy(np.stack(images)))
        pace(started, len(seeds), self.seconds_per_image)

    def warmup(self) -> None:
        pass


def pace(started: float, images: int, seconds_per_image: float) -> None:
    """Sleep until ``images`` x ``seconds_per_image`` have passed since ``started`` (monotonic)."""
    left = started + images * seconds_per_image - time.monotonic()
    if left > 0:
        time.sleep(left)


# -- the held-out validation set ----------------------------------------------------------------


def val_seeds(label: int, count: int) -> list[int]:
    """The noise seeds of class ``label``'s validation images: >= 2**63, never a plan seed."""
    h = hash_ids(_VAL_STREAM, label, np.arange(count)) & np.uint64((1 << 63) - 1)
    return [VAL_SEED_BASE + int(x) for x in h.tolist()]


def render_val_set(folder: str | Path, keys: list[str], per_class: int, size: int) -> Path:
    """``folder/<key>/val_<j>.png`` for every class key (in the run's class order) and j < per_class.

    Written into a temporary sibling folder and renamed when complete, so that a folder of that
    name is always a whole validation set."""
    import json

    from PIL import Image

    check_class_count(len(keys), "the shapes validation set")
    folder = Path(folder)
    if folder.exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    for label, key in enumerate(keys):
        (tmp / key).mkdir(parents=True, exist_ok=True)
        for j, seed in enumerate(val_seeds(label, per_class)):
            Image.fromarray(render(label, seed, size).transpose(1, 2, 0)).save(tmp / key / f"val_{j:05d}.png")
    manifest = {
        "keys": list(keys),
        "per_class": per_class,
        "resolution": size,
        "families": [family(i) for i in range(len(keys))],
    }
    (tmp / VAL_MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another launcher (a node sharing the folder) finished it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m streamgen.shapes val DIR --classes SPEC --per-class N [--resolution R]``."""
    import sys

    from streamgen.config import CliParser
    from streamgen.errors import EXIT_USAGE
    from streamgen.plan.classes import load_classes

    parser = CliParser(prog="python -m streamgen.shapes", description="The shapes benchmark (--model shapes)")
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser("val", help="render the held-out validation set in the ImageNet val layout (<key>/<file>)")
    val.add_argument("folder", help="where to write it (must not exist)")
    val.add_argument("--classes", required=True, help="the run's --classes (e.g. imagenet100:10)")
    val.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    val.add_argument("--resolution", type=int, default=64, help="image side in px (default 64)")
    args = parser.parse_args(argv)
    try:
        if args.per_class < 1 or args.resolution < 8:
            raise UsageError("--per-class must be at least 1 and --resolution at least 8")
        if Path(args.folder).exists():
            raise UsageError(f"{args.folder} exists: give a new folder")
        keys = load_classes(args.classes).keys
        check_class_count(len(keys), f"--classes {args.classes}:")
    except UsageError as e:
        print(f"python -m streamgen.shapes: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    render_val_set(args.folder, keys, args.per_class, args.resolution)
    print(f"{args.folder}: {len(keys)} classes x {args.per_class} images at {args.resolution} px")
    return 0
