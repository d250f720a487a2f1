"""Training-free speed-ups through their maintained packages (optional extras, like xformers).

- ``--generator.deepcache N``: DeepCache (Ma et al., CVPR 2024; ``pip install 'streamgen[deepcache]'``)
  recomputes the UNet's deep blocks every N steps and reuses their cached features in
  between, through its own ``DeepCacheSDHelper`` (``cache_branch_id=0``, uniform skipping, as
  its README's Stable Diffusion example).
- ``--generator.tome R``: ToMe-SD (Bolya & Hoffman, 2023; ``pip install 'streamgen[tome]'``)
  merges a fraction R of the tokens in the UNet's self-attention, through ``tomesd.apply_patch``.
  With ``use_rand=False``: its random partition is one draw for the whole batch from a
  process-wide generator (and switched off for odd batches), which would make a sample's image
  depend on its batch and on the calls before it; the fixed partition keeps a sample's image a
  function of its prompt, seed and settings alone.

Neither runs under torch.compile's whole-graph capture, measured on this stack (torch 2.14,
diffusers 0.42, ``torch.compile(unet, fullgraph=True)`` on the tiny model): DeepCache's
wrapped forward fails with "Data-dependent branching" (it looks the timestep up with
``.item()``), ToMe's with "Attempted to represent unregistered RemovableHandle" (its hooks).
So ``compile: auto`` leaves the UNet eager with either, and ``compile: on`` is refused.
"""

from __future__ import annotations

import importlib.util

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError

# what torch.compile(fullgraph=True) raised with each (see the module docstring)
COMPILE_FAILURE = {
    "deepcache": "DeepCache's wrapped forward branches on the timestep's value (Data-dependent branching)",
    "tome": "ToMe's forward hooks cannot be traced (unregistered RemovableHandle)",
}


def active(cfg: GeneratorConfig) -> list[str]:
    """The speed-ups this config turns on, by flag name."""
    return [name for name, on in (("deepcache", cfg.deepcache > 0), ("tome", cfg.tome > 0)) if on]


def check_speedups(cfg: GeneratorConfig) -> None:
    """Their packages are installed, and compile is not asked for with them: one line otherwise."""
    for name, module, extra in (("deepcache", "DeepCache", "deepcache"), ("tome", "tomesd", "tome")):
        if name not in active(cfg):
            continue
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"--generator.{name} needs the {module} package, not installed: pip install 'streamgen[{extra}]'"
            )
        if cfg.compile == "on":
            raise UsageError(
                f"--generator.{name} cannot run under --generator.compile on: {COMPILE_FAILURE[name]} under "
                "torch.compile's whole-graph capture; use --generator.compile auto or off (the UNet runs eager)"
            )


def apply_speedups(pipe, cfg: GeneratorConfig):
    """Patch ``pipe`` in place; returns the DeepCache helper (or None), which owns the patch."""
    helper = None
    if cfg.tome > 0:
        import tomesd

        tomesd.apply_patch(pipe, ratio=cfg.tome, use_rand=False)
    if cfg.deepcache > 0:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=cfg.deepcache, cache_branch_id=0)
        helper.enable()
    return helper
