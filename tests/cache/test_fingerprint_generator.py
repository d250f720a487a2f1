"""A cache records the few-step and cached generator settings that made its pixels."""

from streamgen.cache.layout import LATER_PIXEL_SETTINGS, differing_setting, fingerprint
from streamgen.config import parse_config


def _fingerprint(*flags):
    return fingerprint(parse_config(["--model", "tiny", *flags]), "classes", None, 256)


def test_a_cache_made_before_these_settings_existed_still_fits_a_run_at_their_defaults():
    old = {k: v for k, v in _fingerprint().items() if k.removeprefix("generator.") not in LATER_PIXEL_SETTINGS}
    assert differing_setting(old, _fingerprint()) is None
    assert "--generator.deepcache is None" not in (
        differing_setting(old, _fingerprint("--generator.deepcache", "3")) or ""
    )
    assert differing_setting(old, _fingerprint("--generator.deepcache", "3")) == (
        "--generator.deepcache is 0 in the cache but 3 in this run"
    )


def test_a_cache_made_with_a_lora_or_another_sampler_does_not_fit_a_run_without():
    lora = _fingerprint("--generator.lora", "x.safetensors:0.5", "--generator.scheduler", "lcm")
    assert "--generator.scheduler" in differing_setting(lora, _fingerprint("--generator.lora", "x.safetensors:0.5"))
    assert "--generator.lora" in differing_setting(lora, _fingerprint("--generator.scheduler", "lcm"))
    assert (
        differing_setting(lora, _fingerprint("--generator.lora", "x.safetensors:0.5", "--generator.scheduler", "lcm"))
        is None
    )
