"""The paper's prompt families, and user templates.

A template is a Python format string over four placeholders:
``{c}`` the class lemmas, ``{h}`` its hypernyms, ``{d}`` its definition, ``{b}`` a Places365
scene drawn per sample. The paper's families are named templates:

    c       "{c}"                   papillon
    c_hc    "{c}, {h}"              papillon, toy spaniel
    c_dc    "{c}, {d}"              papillon, small slender toy spaniel with erect ears and ...
    c_hc_b  "{c}, {h} inside {b}"   papillon, toy spaniel inside hockey arena

Scenes (`streamgen.plan.scenes`) read as English: "arena/hockey" -> "hockey arena", "elevator/door"
-> "elevator door".

Preview the prompts of a run (`streamgen.plan.preview`, the command line; this stage imports
nothing of the later ones):

    python -m streamgen.prompts --config configs/imagenet100_sd14.yaml --n 5
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from streamgen.errors import UsageError
from streamgen.plan.classes import ClassInfo, ClassSet
from streamgen.plan.scenes import places365_scenes, readable_scene  # noqa: F401  (re-exported)

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
