import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_wordnet

from streamgen.errors import UsageError
from streamgen.plan.classes import (
    imagenet1k_wnids,
    load_classes,
    shipped_wordnet_table,
    wordnet_info,
)

SHARED_IN100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet100_wnids.txt"


def test_imagenet1k_is_timm_order_and_matches_the_shipped_table():
    wnids = imagenet1k_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # the sorted folder layout of the real validation set
    assert list(shipped_wordnet_table()) == wnids
    classes = load_classes("imagenet1k")
    assert classes.keys == wnids


def test_imagenet100_is_the_cmc_subset_in_sorted_order():
    classes = load_classes("imagenet100")
    assert len(classes) == 100
    assert classes.keys == sorted(classes.keys)
    assert set(classes.keys) <= set(imagenet1k_wnids())
    if SHARED_IN100.exists():
        assert set(classes.keys) == set(SHARED_IN100.read_text().split())


def test_metadata_of_the_paper_examples():
    table = shipped_wordnet_table()
    assert table["n02086910"].lemmas == "papillon"
    assert table["n02086910"].hypernyms == "toy spaniel"
    assert table["n02086910"].definition.startswith("small slender toy spaniel with erect ears")
    assert table["n03947888"].lemmas == "pirate, pirate ship"
    assert table["n03947888"].hypernyms == "ship"
    assert table["n02123045"].lemmas == "tabby, tabby cat"


@needs_wordnet
def test_shipped_table_equals_nltk_for_all_1000_classes():
    table = shipped_wordnet_table()
    mismatches = [w for w in imagenet1k_wnids() if wordnet_info(w) != table[w]]
    assert not mismatches, f"{len(mismatches)} rows differ from nltk, e.g. {mismatches[:3]}"


def test_subsets_by_size_and_by_list():
    first10 = load_classes("imagenet100:10")
    assert first10.keys == load_classes("imagenet100").keys[:10]
    picked = load_classes("imagenet1k:n02123045,n02086910")
    assert picked.keys == ["n02123045", "n02086910"]


def test_wnid_file_uses_the_table_and_labels_in_file_order(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my classes\nn03947888\nn02086910  # papillon\n")
    classes = load_classes(str(path))
    assert classes.keys == ["n03947888", "n02086910"]
    assert classes.classes[1].hypernyms == "toy spaniel"


@needs_wordnet
def test_wordnet_ids_outside_imagenet_come_from_nltk(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("n02084071\n")  # dog: not an ImageNet-1K class (only its breeds are)
    info = load_classes(str(path)).classes[0]
    assert info.lemmas == "dog, domestic dog, Canis familiaris"
    assert info.hypernyms == "canine, domestic animal"
    assert info.definition.startswith("a member of the genus Canis")


def test_named_classes_from_yaml_and_csv(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(
        "- name: solar panel\n  description: a panel of photovoltaic cells\n- name: heat pump\n  description: a device that moves heat\n"
    )
    classes = load_classes(str(yaml_path))
    assert classes.keys == ["solar panel", "heat pump"]
    assert classes.classes[0].definition == "a panel of photovoltaic cells"
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("name,description\nsolar panel,a panel of photovoltaic cells\n")
    assert load_classes(str(csv_path)).classes[0].lemmas == "solar panel"


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "empty"),
        ("n02086910\nn02086910\n", ".txt", "n02086910 appears twice"),
        ("papillon\n", ".txt", "'papillon' is not a WordNet id"),
        ("- description: no name\n", ".yaml", "has no 'name'"),
        ("name: [unclosed\n", ".yaml", "not valid YAML"),
    ],
)
def test_bad_class_files_name_the_culprit(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        load_classes(str(path))


@needs_wordnet
def test_an_id_that_is_not_a_noun_synset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("n99999999\n")
    with pytest.raises(UsageError, match="n99999999 is not a WordNet 3.0 noun synset"):
        load_classes(str(path))


def test_unknown_set_and_bad_subsets():
    with pytest.raises(UsageError, match="neither imagenet1k nor imagenet100"):
        load_classes("imagenet7")
    with pytest.raises(UsageError, match="subset size must be 1..100"):
        load_classes("imagenet100:101")
    with pytest.raises(UsageError, match="n01440764 is not in that class set"):
        load_classes("imagenet100:n01440764")


def test_missing_wordnet_says_how_to_install_it(tmp_path):
    wnids = tmp_path / "x.txt"
    wnids.write_text("n02084071\n")  # not in the shipped ImageNet-1K table
    code = f"from streamgen.plan.classes import load_classes; load_classes({str(wnids)!r})"
    env = {"NLTK_DATA": str(tmp_path / "empty"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "WordNet data for nltk not found" in result.stderr and "nltk.download('wordnet')" in result.stderr
