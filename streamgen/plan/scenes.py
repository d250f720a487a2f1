"""Places365 scenes: the backgrounds ``b`` of the paper's ``c, h_c inside b`` prompts.

The 365 categories ship in ``data/places365_categories.txt`` exactly as Places365 publishes them
(``categories_places365.txt``, class-index order). A category becomes readable English by one
rule, ``category/qualifier`` -> ``qualifier category`` ("arena/hockey" -> "hockey arena",
"church/indoor" -> "indoor church"), underscores read as spaces, and a short table of the names
where the rule, or the published spelling, does not read as English ("elevator/door" ->
"elevator door", "archaelogical_excavation" -> "archaeological excavation").
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

# Where "qualifier category" is not English, or the published name is misspelled or lacks an
# apostrophe. Keys are the published categories.
READABLE_EXCEPTIONS = {
    "archaelogical_excavation": "archaeological excavation",
    "artists_loft": "artist's loft",
    "bakery/shop": "bakery shop",
    "butchers_shop": "butcher's shop",
    "childs_room": "child's room",
    "elevator/door": "elevator door",
    "fastfood_restaurant": "fast food restaurant",
    "kindergarden_classroom": "kindergarten classroom",
    "mountain_snowy": "snowy mountain",
    "subway_station/platform": "subway station platform",
    "temple/asia": "asian temple",
    "train_station/platform": "train station platform",
    "underwater/ocean_deep": "deep ocean underwater",
    "veterinarians_office": "veterinarian's office",
}


def readable_scene(category: str) -> str:
    """``"arena/hockey"`` -> ``"hockey arena"``; ``"airport_terminal"`` -> ``"airport terminal"``."""
    category = category.strip().strip("/")
    if category in READABLE_EXCEPTIONS:
        return READABLE_EXCEPTIONS[category]
    parts = category.split("/")
    return " ".join(reversed(parts)).replace("_", " ")


def places365_categories() -> tuple[str, ...]:
    """The 365 categories as published (``a/b`` kept), in Places365 class-index order."""
    text = resources.files("streamgen.data").joinpath("places365_categories.txt").read_text()
    return tuple(text.split())


@lru_cache(maxsize=1)
def places365_scenes() -> tuple[str, ...]:
    """The 365 Places scenes, readable, in Places365 class-index order."""
    return tuple(readable_scene(c) for c in places365_categories())
