"""Class sets and their WordNet metadata: the paper's `c`, `h_c` and `d_c`.

A class set is an ordered tuple of classes; a class's position is its label. Sets:

- ``imagenet1k``: the 1000 ImageNet-1K WordNet ids in timm's order (the sorted folder order of
  the real validation set, so label i means the same class in both);
- ``imagenet100``: the 100 ids of the CMC subset used by the paper, labelled in sorted-id order;
- a ``.txt`` file of WordNet ids, or a ``.yaml``/``.csv`` file of ``name`` + ``description``
  for classes that have no WordNet entry;
- any of these with ``:N`` (the first N classes) or ``:id,id,...`` (a named subset).

ImageNet-1K metadata ships in ``data/imagenet1k_wordnet.tsv`` (built by
``scripts/build_wordnet_table.py`` from nltk's WordNet 3.0), so runs on ImageNet classes need
no WordNet download; other WordNet ids are looked up with nltk at run time.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from streamgen.errors import UsageError

WNID_PATTERN = re.compile(r"^n\d{8}$")
BUILTIN_SETS = ("imagenet1k", "imagenet100")
WORDNET_HELP = (
    "install WordNet for nltk: python -c \"import nltk; nltk.download('wordnet')\" "
    "(offline: scripts/install-wordnet.sh DIR && export NLTK_DATA=DIR)"
)


@dataclass(frozen=True)
class ClassInfo:
    """One class. `key` is its WordNet id, or its name for a class without one."""

    key: str
    lemmas: str  # c: all lemma names, comma-joined ("pirate, pirate ship")
    hypernyms: str  # h_c: first lemma of each direct hypernym, by synset name ("ship"); "" if none
    definition: str  # d_c: the WordNet gloss, or the user's description


@dataclass(frozen=True)
class ClassSet:
    """An ordered set of classes; ``classes[label]`` is the class of that label."""

    spec: str
    classes: tuple[ClassInfo, ...]

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    def fingerprint(self) -> str:
        """A short digest of the ordered keys: two runs share labels iff these match."""
        return hashlib.sha1("\n".join(self.keys).encode()).hexdigest()[:16]


def _data_text(name: str) -> str:
    return resources.files("streamgen.data").joinpath(name).read_text()


def imagenet1k_wnids() -> list[str]:
    """The 1000 ImageNet-1K ids in the standard label order, from timm's metadata."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def imagenet100_wnids() -> list[str]:
    """The CMC ImageNet-100 subset, labelled in sorted-id order."""
    return sorted(_data_text("imagenet100_wnids.txt").split())


@lru_cache(maxsize=1)
def shipped_wordnet_table() -> dict[str, ClassInfo]:
    """WordNet metadata of the ImageNet-1K classes, as shipped in the package."""
    table = {}
    for row in csv.reader(_data_text("imagenet1k_wordnet.tsv").splitlines()[1:], delimiter="\t"):
        table[row[0]] = ClassInfo(*row)
    return table


def _wordnet():
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise UsageError(f"WordNet data for nltk not found: {WORDNET_HELP}") from None
    return wordnet


def wordnet_info(wnid: str) -> ClassInfo:
    """Look one WordNet noun id up with nltk (needs the WordNet corpus installed)."""
    wordnet = _wordnet()
    try:
        synset = wordnet.synset_from_pos_and_offset("n", int(wnid[1:]))
    except Exception:
        synset = None
    if synset is None:
        raise UsageError(f"{wnid} is not a WordNet 3.0 noun synset id: check the class list")
    # nltk keeps pointers in a set (order varies between processes): sort by synset name.
    hypernyms = sorted(synset.hypernyms() + synset.instance_hypernyms(), key=lambda s: s.name())
    return ClassInfo(
        key=wnid,
        lemmas=", ".join(lemma.name().replace("_", " ") for lemma in synset.lemmas()),
        hypernyms=", ".join(h.lemmas()[0].name().replace("_", " ") for h in hypernyms),
        definition=synset.definition(),
    )


def wordnet_classes(wnids: list[str]) -> list[ClassInfo]:
    """Metadata for WordNet ids: from the shipped table when it has them, else from nltk."""
    table = shipped_wordnet_table()
    return [table[w] if w in table else wordnet_info(w) for w in wnids]


def read_text_file(path: Path, what: str) -> str:
    """A user's text file, or a one-line UsageError (unreadable, a folder, binary)."""
    try:
        return path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not a text file (it is not UTF-8)") from None


def _read_wnid_file(path: Path) -> list[str]:
    wnids = []
    for lineno, line in enumerate(read_text_file(path, "class file").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not WNID_PATTERN.match(line):
            raise UsageError(f"{path}:{lineno}: {line!r} is not a WordNet id like n02086910")
        wnids.append(line)
    return wnids


def _read_named_file(path: Path) -> list[ClassInfo]:
    """Classes without WordNet entries: ``name`` and ``description`` from YAML or CSV."""
    text = read_text_file(path, "class file")
    try:
        if path.suffix == ".csv":  # strict: an unterminated quote is an error, not a class name
            rows = list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
        else:
            rows = yaml.safe_load(text)
            if isinstance(rows, dict):
                rows = rows.get("classes")
    except csv.Error as e:
        raise UsageError(f"{path}: cannot parse the class file as CSV ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}{where}: the class file is not valid YAML ({problem})") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path}: expected a list of classes with 'name' and 'description'")
    classes = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("name") or "").strip():
            raise UsageError(f"{path}: class {i} has no 'name' (each class needs name and description)")
        name = str(row["name"]).strip()
        classes.append(
            ClassInfo(
                key=name,
                lemmas=name,
                hypernyms=str(row.get("hypernym") or "").strip(),
                definition=str(row.get("description") or "").strip(),
            )
        )
    return classes


def _base_classes(base: str) -> list[ClassInfo]:
    if base == "imagenet1k":
        return wordnet_classes(imagenet1k_wnids())
    if base == "imagenet100":
        return wordnet_classes(imagenet100_wnids())
    path = Path(base)
    if not path.is_file():
        raise UsageError(f"class set {base!r} is neither {' nor '.join(BUILTIN_SETS)} nor a readable file")
    if path.suffix in (".yaml", ".yml", ".csv"):
        return _read_named_file(path)
    return wordnet_classes(_read_wnid_file(path))


def _split_subset(spec: str) -> tuple[str, str | None]:
    """``imagenet100:10`` -> ("imagenet100", "10"); a bare path or name has no subset."""
    base, sep, subset = spec.rpartition(":")
    if sep and base and (subset.isdigit() or "," in subset or WNID_PATTERN.match(subset)):
        return base, subset
    return spec, None


def _take_subset(classes: list[ClassInfo], subset: str, spec: str) -> list[ClassInfo]:
    if subset.isdigit():
        n = int(subset)
        if not 0 < n <= len(classes):
            raise UsageError(f"--classes {spec}: subset size must be 1..{len(classes)}")
        return classes[:n]
    by_key = {c.key: c for c in classes}
    picked = []
    for key in (k.strip() for k in subset.split(",") if k.strip()):
        if key not in by_key:
            raise UsageError(f"--classes {spec}: {key} is not in that class set")
        picked.append(by_key[key])
    return picked


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot name a class, or None. A key names a folder of an export
    (``DIR/<key>/``) and a line of files, so it must be one plain path component."""
    if key in (".", ".."):
        return "is a relative folder name"
    if "/" in key or "\\" in key:
        return "holds a path separator"
    if Path(key).is_absolute():
        return "is an absolute path"
    if any(ord(ch) < 32 or ord(ch) == 127 or 0x80 <= ord(ch) < 0xA0 for ch in key):
        return "holds a control character"
    if len(key.encode()) > 200:
        return "is longer than 200 bytes (a file name)"
    return None


def load_classes(spec: str) -> ClassSet:
    """Resolve a ``--classes`` value to a ClassSet, or raise a one-line UsageError."""
    base, subset = _split_subset(spec.strip())
    classes = _base_classes(base)
    if subset is not None:
        classes = _take_subset(classes, subset, spec)
    if not classes:
        raise UsageError(f"--classes {spec}: the class list is empty")
    seen: set[str] = set()
    for c in classes:
        why = unsafe_key(c.key)
        if why is not None:
            raise UsageError(
                f"--classes {spec}: class name {c.key!r} {why}; a class name must be a plain name "
                "(no '/', '\\', '..', absolute path or control character)"
            )
        if c.key in seen:
            raise UsageError(f"--classes {spec}: {c.key} appears twice (each class once)")
        seen.add(c.key)
    return ClassSet(spec=spec, classes=tuple(classes))
