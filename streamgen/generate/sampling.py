"""Samplers: ``--generator.scheduler``, its timestep spacing and eta, all diffusers' own schedulers.

Every scheduler is built from the model's scheduler config (its betas and training timesteps),
as diffusers' documentation does it (``LCMScheduler.from_config(pipe.scheduler.config)``):

- ``default``: the model's own (PNDM for SD v1.4, Euler with trailing spacing for SD-Turbo);
- ``ddim``, ``dpm++`` (DPM-Solver++ multistep), ``euler-a`` (Euler ancestral), ``lcm``
  (LCM, for LCM-LoRA and LCM-distilled UNets), ``tcd`` (TCD, for TCD / Hyper-SD LoRAs).

LCM, TCD (with eta > 0) and Euler-ancestral draw new noise at every step. They draw it with
``diffusers.utils.torch_utils.randn_tensor`` from the pipeline's ``generator`` argument, which
with a list of generators draws each sample's noise from its own generator: the one
`DiffusionGenerator` seeds from the sample's seed, so a sample's image depends on its prompt,
seed and settings only (tests/generate/test_sampling.py checks it, alone, in a batch, padded).

`check_sampling` builds the scheduler from the model's config in the launcher and sets its
timesteps: what diffusers refuses (LCM above its 50 original steps, ...) is a one-line error
before any process starts.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError

# --generator.scheduler -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
TCD_GAMMA = 0.3  # TCD's default gamma (its paper and diffusers' TCD docs): the pipeline's `eta`


def model_scheduler_config(model: str) -> dict:
    """The scheduler config of ``model`` (a builtin name or a resolved folder), read without weights."""
    from streamgen.generate.pipeline import BUILTIN_MODELS, sd14_shapes

    if model in BUILTIN_MODELS:
        return dict(sd14_shapes()["scheduler"])
    return json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())


def make_scheduler(name: str, config, spacing: str = "default"):
    """The scheduler ``name`` built from the model's scheduler ``config``; None for the model's own, unchanged."""
    import diffusers

    extra = {} if spacing == "default" else {"timestep_spacing": spacing}
    if name == "default":
        if not extra:
            return None
        cls = getattr(diffusers, dict(config)["_class_name"])
        return cls.from_config(config, **extra)
    cls_name, options = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **options, **extra)


def takes_eta(scheduler) -> bool:
    """Whether the scheduler's step reads ``eta`` (DDIM, TCD): the pipeline passes it only then."""
    return "eta" in inspect.signature(scheduler.step).parameters


def resolved_eta(cfg: GeneratorConfig) -> float:
    """The ``eta`` handed to the pipeline: as configured, or TCD's gamma for tcd, else diffusers' 0."""
    if cfg.eta is not None:
        return cfg.eta
    return TCD_GAMMA if cfg.scheduler == "tcd" else 0.0


def scheduler_for(cfg: GeneratorConfig, model: str):
    """The scheduler a generator runs ``model`` with (built from its config, no weights loaded)."""
    import diffusers

    config = model_scheduler_config(model)
    built = make_scheduler(cfg.scheduler, config, cfg.timestep_spacing)
    return built if built is not None else getattr(diffusers, config["_class_name"]).from_config(config)


def check_sampling(cfg: GeneratorConfig, model: str) -> None:
    """The scheduler takes these steps and eta, found in the launcher before any process starts."""
    scheduler = scheduler_for(cfg, model)
    try:
        scheduler.set_timesteps(cfg.steps)
    except ValueError as e:  # diffusers' own limits (LCM/TCD: at most original_inference_steps)
        raise UsageError(
            f"--generator.steps {cfg.steps} does not work with --generator.scheduler {cfg.scheduler} "
            f"({type(scheduler).__name__}): {str(e).splitlines()[0].strip()}"
        ) from None
    if cfg.eta is not None and not takes_eta(scheduler):
        raise UsageError(
            f"--generator.eta is read by the ddim and tcd schedulers only, not by {type(scheduler).__name__} "
            f"(--generator.scheduler {cfg.scheduler}): leave it unset"
        )
