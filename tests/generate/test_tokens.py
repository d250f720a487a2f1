"""Prompts as SD receives them: the 77-token cut, counted once, the per-call warnings silenced."""

from __future__ import annotations

import logging

import pytest

from streamgen.generate.pipeline import TINY, build_tiny_pipeline
from streamgen.generate.tokens import (
    TRUNCATION_LOGGERS,
    count_truncated,
    load_tokenizer,
    quiet_truncation_warnings,
    received,
)
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate

LONG = "papillon, small slender toy spaniel with erect ears and a black spot on each cheek, " * 2


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    """Warnings of diffusers' SD pipeline (its loggers as they are before streamgen silences them)."""
    logger = logging.getLogger(TRUNCATION_LOGGERS[1])
    level, records = logger.level, Records()
    logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


def test_the_prompt_shown_is_what_the_pipeline_keeps_of_it(diffusers_warnings):
    pipe = build_tiny_pipeline()
    (shown,) = received(pipe.tokenizer, [LONG])
    assert shown != LONG and len(shown) < len(LONG)
    pipe.encode_prompt([LONG], "cpu", 1, False)
    # diffusers says what it cut off: what is shown + what was cut = the whole prompt (as CLIP reads it)
    (message,) = [m for m in diffusers_warnings.messages if "truncated" in m]
    removed = message.split(": ", 1)[1].strip("[]'\" ")
    squeeze = lambda text: "".join(text.lower().split())  # noqa: E731  (CLIP drops spaces between tokens)
    assert squeeze(shown + removed) == squeeze(LONG)
    assert received(pipe.tokenizer, ["papillon"]) == ["papillon"]  # a prompt that fits is shown as given


def test_no_warning_per_call_once_silenced(diffusers_warnings):
    pipe = build_tiny_pipeline()
    quiet_truncation_warnings()
    try:
        pipe.encode_prompt([LONG], "cpu", 1, False)
        pipe.tokenizer([LONG])  # transformers' "Token indices sequence length is longer than ..."
        assert diffusers_warnings.messages == []
    finally:
        for name in TRUNCATION_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_the_truncated_class_prompts_are_counted_per_template():
    classes = load_classes("imagenet100")
    tokenizer = load_tokenizer(TINY)  # one token a character: definitions pass 77 often
    long_ones, total = count_truncated(tokenizer, PromptTemplate.parse("c_dc"), classes)
    assert total == 100 and 0 < long_ones < 100
    expected = sum(len(tokenizer(PromptTemplate.parse("c_dc").render(c))["input_ids"]) > 77 for c in classes.classes)
    assert long_ones == expected
    assert count_truncated(tokenizer, PromptTemplate.parse("c"), classes)[0] < long_ones  # lemmas alone: shorter
    assert count_truncated(load_tokenizer("fake"), PromptTemplate.parse("c_dc"), classes) == (0, 100)


@pytest.mark.parametrize("model", ["fake", "shapes", "no/such/folder"])
def test_no_tokenizer_for_a_generator_without_text(model, tmp_path, monkeypatch):
    """The procedural generators read no text and a folder without tokenizer/ has none: no count,
    the prompt shown unchanged (transformers 5 would build an empty tokenizer with a 1e30 limit,
    which the preview's truncation then overflowed on)."""
    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer(model)
    assert tokenizer is None
    assert received(tokenizer, [LONG]) == [LONG]
