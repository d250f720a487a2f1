"""Prompts as Stable Diffusion receives them: CLIP's text encoder reads at most 77 tokens.

A longer prompt (``c_dc``'s WordNet definitions often are) is cut by the pipeline's tokenizer:
`received` gives the text SD actually gets (the dashboard's prompt table shows it),
`count_truncated` how many of a run's class prompts are cut (one line at start-up), and
`quiet_truncation_warnings` silences the per-call warnings of transformers and diffusers that
would otherwise repeat that for every batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamgen.plan.classes import ClassSet
from streamgen.plan.prompts import PromptTemplate, places365_scenes

TRUNCATION_LOGGERS = (
    "transformers.tokenization_utils_base",  # "Token indices sequence length is longer than ... (116 > 77)"
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",  # "The following part ... was truncated"
)


def quiet_truncation_warnings() -> None:
    """The truncation is said once at start-up (`count_truncated`), not at every batch."""
    for name in TRUNCATION_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def load_tokenizer(model: str) -> Any | None:
    """The tokenizer SD uses for ``model`` (a resolved model: a folder or a built-in), or None
    (the fake generator reads no text; a folder without a readable tokenizer)."""
    from streamgen.generate.pipeline import BUILTIN_MODELS, _char_tokenizer
    from streamgen.generate.shapes import PROCEDURAL

    if model in PROCEDURAL:
        return None
    quiet_truncation_warnings()
    if model in BUILTIN_MODELS:
        return _char_tokenizer()
    if not (Path(model) / "tokenizer").is_dir():
        # transformers 5 builds an empty tokenizer (model_max_length 1e30) from a missing folder
        # instead of raising: only a folder that has one is a tokenizer.
        return None
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    except Exception:  # the launcher's checks accepted the model; no tokenizer only means no count
        return None


def token_counts(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt, the start and end tokens included (what ``model_max_length`` bounds)."""
    return [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]


def received(tokenizer: Any | None, prompts: Sequence[str]) -> list[str]:
    """Each prompt as SD receives it: unchanged when it fits, else the text of its first 77 tokens
    (as the tokenizer gives it back: CLIP lower-cases and normalises spaces)."""
    if tokenizer is None:
        return list(prompts)
    limit = tokenizer.model_max_length
    cut = tokenizer(list(prompts), truncation=True, max_length=limit)["input_ids"]
    return [
        prompt if n <= limit else tokenizer.decode(ids, skip_special_tokens=True).strip()
        for prompt, n, ids in zip(prompts, token_counts(tokenizer, prompts), cut)
    ]


def count_truncated(tokenizer: Any | None, template: PromptTemplate, classes: ClassSet) -> tuple[int, int]:
    """(class prompts longer than the tokenizer's limit, class prompts): one prompt per class,
    with its longest scene when the template has one (the upper bound of what it may receive)."""
    if tokenizer is None:
        return 0, len(classes)
    scene = max(places365_scenes(), key=len) if template.uses_background else None
    prompts = [template.render(cls, scene) for cls in classes.classes]
    return sum(n > tokenizer.model_max_length for n in token_counts(tokenizer, prompts)), len(prompts)
