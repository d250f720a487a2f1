"""Build streamgen/data/imagenet1k_wordnet.tsv: WordNet 3.0 metadata of the ImageNet-1K classes.

Run once with WordNet installed for nltk (see README, "WordNet"):

    NLTK_DATA=/path/to/nltk_data python scripts/build_wordnet_table.py

Rows follow the ImageNet-1K label order; tests/test_classes.py checks the shipped table
against nltk for all 1000 classes.
"""

import csv
from pathlib import Path

from streamgen.plan.classes import imagenet1k_wnids, wordnet_info

OUT = Path(__file__).resolve().parents[1] / "streamgen" / "data" / "imagenet1k_wordnet.tsv"


def main() -> None:
    with OUT.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["wnid", "lemmas", "hypernyms", "definition"])
        for wnid in imagenet1k_wnids():
            info = wordnet_info(wnid)
            writer.writerow([info.key, info.lemmas, info.hypernyms, info.definition])
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
