"""The paper's prompt families, and user templates.

A template is a Python format string over four placeholders:
``{c}`` the class lemmas, ``{h}`` its hypernyms, ``{d}`` its definition, ``{b}`` a Places365
scene drawn per sample. The paper's families are named templates:

    c       "{c}"                   papillon
    c_hc    "{c}, {h}"              papillon, toy spaniel
    c_dc    "{c}, {d}"              papillon, small slender toy spaniel with erect ears and ...
    c_hc_b  "{c}, {h} inside {b}"   papillon, toy spaniel inside hockey arena

Scenes (`streamgen.scenes`) read as English: "arena/hockey" -> "hockey arena", "elevator/door"
-> "elevator door".

Preview the prompts of a plan (id, WordNet id, label, prompt):

    python -m streamgen.prompts --classes imagenet100 --template c_hc_b --n 5
"""

from __future__ import annotations

import argparse
import string
import sys
from dataclasses import dataclass

from streamgen.classes import ClassInfo, ClassSet
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.scenes import places365_scenes, readable_scene  # noqa: F401  (re-exported)

TEMPLATES = {
    "c": "{c}",
    "c_hc": "{c}, {h}",
    "c_dc": "{c}, {d}",
    "c_hc_b": "{c}, {h} inside {b}",
}
PLACEHOLDERS = {"c": "lemmas", "h": "hypernyms", "d": "definition", "b": "background scene"}


@dataclass(frozen=True)
class PromptTemplate:
    """A named family or a user format string, checked once against its placeholders."""

    name: str
    text: str
    fields: frozenset[str]  # the placeholders it uses

    @classmethod
    def parse(cls, spec: str) -> PromptTemplate:
        text = TEMPLATES.get(spec)
        if text is None:
            if "{" not in spec:
                raise UsageError(
                    f"unknown prompt template {spec!r}: use one of {', '.join(TEMPLATES)} "
                    "or a format string such as 'a photo of a {c}'"
                )
            text = spec
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise UsageError(f"prompt template {text!r} is malformed: {e}") from None
        for field in fields:
            if field not in PLACEHOLDERS:
                raise UsageError(
                    f"prompt template {text!r} has unknown placeholder {{{field}}}: "
                    f"use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
        return cls(name=spec if spec in TEMPLATES else "custom", text=text, fields=frozenset(fields))

    @property
    def uses_background(self) -> bool:
        return "b" in self.fields

    def check_classes(self, classes: ClassSet) -> None:
        """Every class must have what the template asks for (custom classes may lack h or d)."""
        for field, attr in (("h", "hypernyms"), ("d", "definition")):
            if field in self.fields:
                missing = [c.key for c in classes.classes if not getattr(c, attr)]
                if missing:
                    raise UsageError(
                        f"prompt template {self.text!r} needs {{{field}}} ({attr}) but class "
                        f"{missing[0]!r} has none: give it one in the class file or change --prompt"
                    )

    def render(self, cls: ClassInfo, scene: str | None = None) -> str:
        return self.text.format(c=cls.lemmas, h=cls.hypernyms, d=cls.definition, b=scene or "")


def main(argv: list[str] | None = None) -> int:
    # The preview reads the sample plan, the next stage; it is only an entry point.
    from streamgen.classes import load_classes
    from streamgen.plan import SamplePlan

    parser = argparse.ArgumentParser(
        prog="python -m streamgen.prompts", description="Print the first samples of a plan."
    )
    parser.add_argument("--classes", default="imagenet100", help="class set, e.g. imagenet100:10")
    parser.add_argument("--template", default="c_hc_b", help=f"{', '.join(TEMPLATES)} or '...{{c}}...'")
    parser.add_argument("--n", type=int, default=10, help="how many sample ids to show")
    parser.add_argument("--start", type=int, default=0, help="first sample id")
    parser.add_argument("--seed", type=int, default=0, help="run seed")
    args = parser.parse_args(argv)
    try:
        classes = load_classes(args.classes)
        plan = SamplePlan(classes, PromptTemplate.parse(args.template), seed=args.seed)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("id\twnid\tlabel\tseed\tprompt")
    for s in plan.samples(range(args.start, args.start + args.n)):
        print(f"{s.id}\t{s.key}\t{s.label}\t{s.seed}\t{s.prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
