"""bench/gpu_session.py, the script a session lent a GPU runs first: its plumbing, on a CPU (--smoke)."""

import json
import subprocess

import pytest
from conftest import PYTHON, ROOT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_section_runs_and_the_table_reports_it(tmp_path):
    done = subprocess.run(
        [
            PYTHON,
            str(ROOT / "bench/gpu_session.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--only",
            "correctness,generate,trainer",
        ],
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_session.json").read_text())
    sections = results["sections"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    correctness = sections["correctness"]["figures"]
    cases = [c for c in correctness["cases"] if "unit" in c]
    assert len(cases) == 3 * 2 * 2  # schedulers x guidance x (full unit, unit with redraws)
    assert correctness["worst_max_diff"] == 0  # the emulated replay, with outputs copied out: bit for bit
    assert all(c["redraws"][0] == c["redraws"][1] > 0 for c in cases if c["unit"] == "redraws")
    generate = sections["generate"]["figures"]
    assert generate["unet_calls_counted"] == generate["unet_calls_expected"] == 2 + 1  # PNDM: steps + 1
    assert generate["text_cache"]["requires_grad"] is False
    assert "| correctness | worst max diff" in done.stdout and "| trainer |" in done.stdout
