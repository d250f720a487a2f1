import subprocess
import sys
from pathlib import Path

import pytest

from streamgen.errors import UsageError
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate, places365_scenes, readable_scene

ROOT = Path(__file__).resolve().parents[2]
PAPILLON, PIRATE, TABBY = "n02086910", "n03947888", "n02123045"


def render(template: str, wnid: str, scene: str | None = None) -> str:
    cls = load_classes(f"imagenet1k:{wnid}").classes[0]
    return PromptTemplate.parse(template).render(cls, scene)


def test_paper_prompt_families_exact_strings():
    assert render("c", PAPILLON) == "papillon"
    assert render("c", PIRATE) == "pirate, pirate ship"
    assert render("c", TABBY) == "tabby, tabby cat"
    assert render("c_hc", PAPILLON) == "papillon, toy spaniel"
    assert render("c_hc", PIRATE) == "pirate, pirate ship, ship"
    assert render("c_dc", PAPILLON) == (
        "papillon, small slender toy spaniel with erect ears and a black-spotted brown to white coat"
    )
    assert render("c_hc_b", PAPILLON, "hockey arena") == "papillon, toy spaniel inside hockey arena"


def test_places_scenes_are_readable():
    scenes = places365_scenes()
    assert len(scenes) == 365 and len(set(scenes)) == 365
    assert readable_scene("arena/hockey") == "hockey arena"
    assert readable_scene("airport_terminal") == "airport terminal"
    assert readable_scene("athletic_field/outdoor") == "outdoor athletic field"
    assert "hockey arena" in scenes and not any("/" in s or "_" in s for s in scenes)


def test_user_templates():
    assert render("a photo of a {c}", TABBY) == "a photo of a tabby, tabby cat"
    assert PromptTemplate.parse("{c} in {b}").uses_background
    with pytest.raises(UsageError, match=r"unknown placeholder \{x\}"):
        PromptTemplate.parse("a {x} photo")
    with pytest.raises(UsageError, match="unknown prompt template 'c_hb'"):
        PromptTemplate.parse("c_hb")


def test_template_needing_what_a_custom_class_lacks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- name: heat pump\n  description: a device that moves heat\n")
    classes = load_classes(str(path))
    PromptTemplate.parse("c_dc").check_classes(classes)
    with pytest.raises(UsageError, match="needs \\{h\\}.*'heat pump' has none"):
        PromptTemplate.parse("c_hc").check_classes(classes)


def preview(*args: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "streamgen.prompts", *args], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert out[0].split("\t") == ["id", "wnid", "label", "seed", "scene", "prompt"]
    return [line.split("\t") for line in out[1:]]


def test_preview_command():
    rows = preview("--classes", "imagenet100", "--prompt", "c_hc_b", "--n", "5")
    assert [int(r[0]) for r in rows] == list(range(5))
    keys = load_classes("imagenet100").keys
    for _, wnid, label, _, scene, prompt in rows:
        assert keys[int(label)] == wnid and prompt.endswith(f" inside {scene}")


def test_preview_shows_a_runs_own_prompts():
    from streamgen.config import parse_config
    from streamgen.plan.samples import SamplePlan

    config = str(ROOT / "configs" / "smoke_tiny.yaml")
    rows = preview("--config", config, "--start", "100", "--n", "8")
    cfg = parse_config(["--config", config])  # what train.py makes of the same config
    plan = SamplePlan(load_classes(cfg.classes), PromptTemplate.parse(cfg.prompt), cfg.seed)
    samples = plan.samples(range(100, 108))
    assert [(int(r[0]), r[1], int(r[3]), r[5]) for r in rows] == [(s.id, s.key, s.seed, s.prompt) for s in samples]
    flags = preview("--config", config, "--seed", "7", "--prompt", "a photo of a {c}", "--n", "3")
    assert all(r[5].startswith("a photo of a ") and r[4] == "-" for r in flags)  # the flags win over the config


def test_the_stage_imports_no_later_stage():
    code = "import sys, streamgen.plan.prompts; print(sorted(m for m in sys.modules if m.startswith('streamgen.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "streamgen.plan.samples" not in loaded and "streamgen.config" not in loaded


def test_preview_bad_template_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "streamgen.prompts", "--template", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
