"""Places365 scenes: the official list, and readable English for every one of them."""

import re
from pathlib import Path

import pytest
from conftest import needs_wordnet

from streamgen.plan.scenes import READABLE_EXCEPTIONS, places365_categories, places365_scenes, readable_scene

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "places365_categories.txt"
# Words that qualify a place: they read before it ("indoor church"), never after it.
QUALIFIERS = {"indoor", "outdoor", "exterior", "interior", "public", "natural", "urban"}


def test_the_official_list_ships_in_the_package():
    categories = places365_categories()
    assert len(categories) == 365 and len(set(categories)) == 365
    # the five names a non-official copy had wrong
    for name in ("desert/sand", "library/indoor", "stadium/football", "apartment_building/outdoor", "schoolhouse"):
        assert name in categories
    if SHARED.is_file():  # the project's reference copy, when this checkout has it
        assert tuple(SHARED.read_text().split()) == categories


def test_rule_and_exceptions():
    assert readable_scene("arena/hockey") == "hockey arena"
    assert readable_scene("church/indoor") == "indoor church"
    assert readable_scene("elevator/door") == "elevator door"
    assert readable_scene("underwater/ocean_deep") == "deep ocean underwater"
    assert readable_scene("subway_station/platform") == "subway station platform"
    assert set(READABLE_EXCEPTIONS) <= set(places365_categories())  # no stale entries


def test_every_scene_is_distinct_plain_text_with_qualifiers_first():
    scenes = places365_scenes()
    assert len(set(scenes)) == 365
    for category, scene in zip(places365_categories(), scenes):
        assert re.fullmatch(r"[a-z' ]+", scene), scene
        words = scene.split()
        if "/" in category:
            assert words[-1] not in QUALIFIERS, scene  # "church indoor"
            assert words[0] not in {"door", "shop", "platform", "ocean", "asia"}, scene  # "door elevator"


@needs_wordnet
def test_every_word_of_every_scene_is_english():
    """Each word is a WordNet lemma (or a common function word): catches published misspellings."""
    from nltk.corpus import wordnet

    function_words = {"and", "of", "s", "jacuzzi"}  # jacuzzi: a trade name, English but not in WordNet 3.0
    unknown = set()
    for scene in places365_scenes():
        for word in re.split(r"[ ']", scene):
            if word and word not in function_words and not wordnet.morphy(word) and not wordnet.synsets(word):
                unknown.add(word)
    assert not unknown, f"not English words: {sorted(unknown)}"


@pytest.mark.parametrize("category", ["airport_terminal", "field/wild", "bakery/shop"])
def test_readable_names_have_no_separators(category):
    assert "/" not in readable_scene(category) and "_" not in readable_scene(category)
