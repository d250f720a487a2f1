import json

import pytest
import torch

from streamgen.errors import UsageError
from streamgen.generate.pipeline import build_tiny_pipeline, resolve_model


def test_tiny_pipeline_is_identical_every_time():
    a, b = build_tiny_pipeline(), build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.tokenizer.model_max_length == 77
    assert a.vae_scale_factor == 8  # as in the real model: a resolution must divide by 8


def test_builtin_and_missing_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("tiny") == "tiny"
    with pytest.raises(UsageError, match="not a folder, and not in the Hugging Face cache"):
        resolve_model("CompVis/stable-diffusion-v1-4")
    with pytest.raises(UsageError, match="model 'no-such-model' not found"):
        resolve_model("no-such-model")


def test_folder_must_hold_a_text_to_image_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": []}))
    with pytest.raises(UsageError, match="needs a Stable Diffusion 1.x/2.x text-to-image pipeline"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(UsageError, match="not a diffusers pipeline folder"):
        resolve_model(str(tmp_path))


def test_saved_pipeline_folder_resolves_and_loads(tmp_path, tiny_pipe):
    from streamgen.generate.pipeline import load_pipeline

    tiny_pipe.save_pretrained(tmp_path / "sd")
    path = resolve_model(str(tmp_path / "sd"))
    pipe = load_pipeline(path, torch.float32)
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)
