"""Each ImageNet benchmark, built in miniature exactly as its archive extracts, is read with the right labels."""

import pkgutil
from pathlib import Path

import pytest
import torchvision
from conftest import write_benchmark, write_image_folder

from streamgen.errors import UsageError
from streamgen.evaluate.benchmarks import check_folder, parse_data_spec, resolve, synsets
from streamgen.plan.classes import imagenet1k_wnids, imagenet100_wnids

WNID_LAYOUTS = ["in-val", "in-sketch", "in-r", "in-a"]


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """Every release extracted into its own folder, as a user downloads it."""
    base = tmp_path_factory.mktemp("releases")
    names = [*WNID_LAYOUTS, "in-v2:matched-frequency", "in-v2:threshold0.7", "in-v2:top-images"]
    return {name: write_benchmark(base / name.replace(":", "-"), name) for name in names}


@pytest.mark.parametrize("name", WNID_LAYOUTS)
def test_wordnet_id_layouts_read_as_imagefolder_reads_them(releases, name):
    root = releases[name]
    benchmark = resolve(root)
    assert benchmark.name == name and benchmark.root == root and benchmark.variant == ""
    oracle = torchvision.datasets.ImageFolder(str(root))  # README.txt (R/A) is not a class folder
    assert [(p, oracle.classes[i]) for p, i in oracle.samples] == list(benchmark.samples)
    assert benchmark.classes == sorted(synsets(name))
    assert len(benchmark.classes) == (200 if name in ("in-r", "in-a") else 1000)
    assert benchmark.predicts_among_its_classes == (name in ("in-r", "in-a"))


@pytest.mark.parametrize("variant", ["matched-frequency", "threshold0.7", "top-images"])
def test_imagenet_v2_folders_are_class_indices_not_sorted_names(releases, variant):
    root = releases[f"in-v2:{variant}"]
    benchmark = resolve(root)
    assert benchmark.name == "in-v2" and benchmark.variant == variant
    assert benchmark.title == ("IN-v2" if variant == "matched-frequency" else f"IN-v2 ({variant})")
    wnids = imagenet1k_wnids()
    # The maintainers' loader (imagenetv2_pytorch): label = int(parent folder name), in ImageNet-1K order.
    assert all(key == wnids[int(Path(path).parent.name)] for path, key in benchmark.samples)
    assert len(benchmark.samples) == 1000 and all(path.endswith(".jpeg") for path, _ in benchmark.samples)
    # A plain ImageFolder would sort '0', '1', '10', '100', ...: folder '10' is not its class 10.
    assert torchvision.datasets.ImageFolder(str(root)).class_to_idx["10"] == 2


def test_a_renamed_sketch_folder_is_still_imagenet_sketch(releases, tmp_path):
    renamed = tmp_path / "imagenet-sketch"
    releases["in-sketch"].rename(renamed)
    try:
        assert resolve(renamed).name == "in-sketch"
    finally:
        renamed.rename(releases["in-sketch"])


def test_release_folders_are_found_inside_the_folder_they_were_extracted_into(releases):
    for name, root in releases.items():
        assert resolve(root.parent).root == root, name  # e.g. /data/imagenet-sketch holding sketch/


def test_imagenet_r_and_a_classes_are_the_maintainers(releases):
    wnids = imagenet1k_wnids()
    for name in ("in-r", "in-a"):
        indices = pkgutil.get_data("timm.data", f"_info/imagenet_{name[-1]}_indices.txt").decode().split()
        assert [wnids[int(i)] for i in indices] == list(synsets(name))
    assert set(synsets("in-r")) != set(synsets("in-a"))


def test_named_benchmarks_are_checked_against_their_layout(releases, tmp_path):
    assert resolve(releases["in-sketch"], "in-sketch").name == "in-sketch"
    assert resolve(releases["in-val"], "in-sketch").name == "in-sketch"  # the same layout, renamed
    with pytest.raises(UsageError, match="in-v2=.*expected class-index folders 0..999"):
        resolve(releases["in-val"], "in-v2")
    with pytest.raises(UsageError, match="in-r=.*expected one folder per WordNet id of its 200 classes"):
        resolve(releases["in-a"], "in-r")
    with pytest.raises(UsageError, match="in-val=.*expected .*; found '0'"):
        resolve(releases["in-v2:top-images"], "in-val")


def test_data_specs():
    assert parse_data_spec("in-r=/data/imagenet-r") == ("in-r", "/data/imagenet-r")
    assert parse_data_spec("/data/imagenet-r") == (None, "/data/imagenet-r")
    with pytest.raises(UsageError, match="unknown dataset name 'imagenet-x'.*in-val, in-v2, in-sketch, in-r, in-a"):
        parse_data_spec("imagenet-x=/data/x")


def test_a_path_with_an_equals_sign_is_a_path(tmp_path):
    folder = write_image_folder(tmp_path / "a=b", ["n01440764"], per_class=1)
    assert parse_data_spec(str(folder)) == (None, str(folder))


def test_bad_folders_say_what_was_expected(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        resolve(tmp_path / "file.txt")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(UsageError, match="raw ImageNet validation images.*valprep.sh"):
        resolve(raw)
    empty = tmp_path / "empty"
    (empty / "n01440764").mkdir(parents=True)
    with pytest.raises(UsageError, match="hold no images"):
        resolve(empty)


def test_several_benchmarks_in_one_folder_are_not_guessed(tmp_path):
    write_benchmark(tmp_path, "in-v2:matched-frequency")
    write_benchmark(tmp_path, "in-v2:top-images")
    with pytest.raises(UsageError, match="holds several benchmarks"):
        resolve(tmp_path)


def test_a_subset_model_scores_the_common_classes(releases):
    keys = imagenet100_wnids()
    benchmark, samples = check_folder(releases["in-r"], keys, "--data")
    common = set(keys) & set(synsets("in-r"))
    assert 0 < len(common) < 100
    assert sorted({keys[label] for _, label in samples}) == sorted(common)
    assert all(Path(path).parent.name == keys[label] for path, label in samples)


def test_a_folder_without_the_models_classes_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "val", ["n01440764"], per_class=1)
    with pytest.raises(UsageError, match=r"--train.val_dir .*none of its 1 classes \(e.g. n01440764\)"):
        check_folder(folder, ["n09999999"], "--train.val_dir")


def test_custom_class_folders_are_a_generic_folder(tmp_path):
    folder = write_image_folder(tmp_path / "mine", ["cat", "dog"], per_class=2)
    benchmark = resolve(folder)
    assert benchmark.name == "folder" and benchmark.title == "mine" and benchmark.classes == ["cat", "dog"]
