"""`DiffusionGenerator`: turn (prompt, noise seed) into uint8 images on the device with Stable Diffusion.

It drives a diffusers `StableDiffusionPipeline` (text encoder, UNet, scheduler, VAE) with the
paper's knobs. It calls the pipeline itself, so the denoising loop is diffusers' own, and adds
only what a stream needs:

- one CPU ``torch.Generator`` per sample for the initial latents, so a sample's image depends
  on its prompt, seed and the settings only, never on its batch or its GPU;
- text embeddings cached per distinct prompt (class prompts repeat thousands of times);
- the UNet under ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs on GPU), compiled
  and captured once per process by `warmup`, for a fixed batch shape (redraws are padded);
  its outputs copied out of the graph's static buffers (`FreshOutputs`), since the next replay
  overwrites them and a scheduler may keep one between steps (PNDM does, without guidance);
- everything (text encoding, denoising, decoding, resizing) under ``torch.inference_mode()``:
  nothing it keeps, the text-embedding cache above all, holds an autograd graph;
- black or non-finite images (fp16 overflow, the safety checker when on) redrawn with a seed
  derived from the sample's, and counted;
- the batch resized (antialiased) to the stream resolution and quantised to uint8 on the device.

A generator process (`streamgen.stream.worker`) builds one and writes its images into queue slots.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generate.cost import guided
from streamgen.generate.pipeline import load_pipeline
from streamgen.generate.sampling import check_sampling, make_scheduler, resolved_eta
from streamgen.generate.speedups import active, apply_speedups, check_speedups
from streamgen.generate.tokens import quiet_truncation_warnings
from streamgen.generate.weights import check_weights, fuse_loras, load_unet
from streamgen.plan.samples import redraw_seed


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def compiles(cfg: GeneratorConfig, device_type: str) -> bool:
    """Whether the UNet runs under ``torch.compile``: the one place that decides ``compile: auto``.

    Auto compiles on a GPU (with CUDA graphs), except with xformers attention, whose kernels
    break the graph under torch.compile (xformers issue #765), and with DeepCache or ToMe, whose
    patches break it too (measured: `streamgen.generate.speedups`); `check_generator` refuses an
    explicit ``on`` with any of them."""
    if cfg.compile == "auto":
        return device_type == "cuda" and cfg.attention != "xformers" and not active(cfg)
    return cfg.compile == "on"


def check_generator(cfg: GeneratorConfig, device_type: str, model: str | None = None) -> None:
    """Settings that cannot work together, found in the launcher before any process starts.

    With ``model`` (a resolved model folder or builtin name) also what must fit the model: the
    scheduler's steps and eta, the guidance, a replacement UNet and every LoRA."""
    check_attention(cfg.attention)
    check_speedups(cfg)
    if model is not None:
        check_sampling(cfg, model)
        check_weights(cfg, model)
        check_guidance(cfg, model)
    if cfg.attention == "xformers" and cfg.compile == "on":
        raise UsageError(
            "--generator.attention xformers cannot run under --generator.compile on: xformers' attention breaks "
            "torch.compile's graph (xformers issue #765); use --generator.attention sdpa (as fast, and compiled) "
            "or --generator.compile off"
        )
    if cfg.compile_vae and not compiles(cfg, device_type):
        raise UsageError(
            "--generator.compile_vae compiles the VAE decoder beside the UNet: it needs the UNet compiled too "
            "(--generator.compile on, or auto on a GPU with sdpa attention)"
        )


def check_attention(attention: str) -> None:
    """xformers must be importable when asked for (checked in the launcher, before spawning)."""
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UsageError(
                "--generator.attention xformers: xformers is not installed "
                "(pip install 'streamgen[xformers]' with a matching torch, or use sdpa)"
            ) from None


# Models distilled without classifier-free guidance: CFG on them is wasted compute and worse images
# (SD-Turbo's model card: "SD-Turbo does not make use of guidance_scale"; DMD2's one-step UNets).
GUIDANCE_FREE = ("sd-turbo", "sdxl-turbo", "dmd2")


def check_guidance(cfg: GeneratorConfig, model: str) -> None:
    """Guidance > 1 on a model distilled without it is refused (its name says which: GUIDANCE_FREE)."""
    if cfg.guidance <= 1:
        return
    for flag, name in (("--model", model), ("--generator.unet", cfg.unet or "")):
        hit = next((m for m in GUIDANCE_FREE if m in name.lower()), None)
        if hit:
            raise UsageError(
                f"--generator.guidance {cfg.guidance:g} with {flag} {name}: {hit} is distilled without "
                "classifier-free guidance and ignores it (at twice the cost); use --generator.guidance 0"
            )


def unet_evaluations(scheduler, steps: int) -> int:
    """UNet calls of one denoising run: the scheduler's timesteps for ``steps`` (PNDM: steps + 1,
    its PLMS warm-up evaluates one timestep twice). Each call is on 2B rows with guidance."""
    scheduler = type(scheduler).from_config(scheduler.config)  # a copy: set_timesteps changes it
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def tflop_per_image(unet_calls: int, guided: bool, resolution: int) -> float:
    """SD v1.x's cost of one image: UNet calls x (2 with guidance) x one UNet row + VAE decode + text
    encoder, from the published per-step figures (``data/sd_v1_4_shapes.json``), scaled by area."""
    from streamgen.generate.pipeline import sd14_shapes

    cost = sd14_shapes()["flops_per_image_published"]
    area = (resolution / 512) ** 2
    unet_row = cost["unet_per_cfg_step_tflop"] / 2  # the published figure is one CFG pair
    return (
        area * (unet_row * unet_calls * (2 if guided else 1) + cost["vae_decode_512_tflop"])
        + cost["text_encoder_tflop"]
    )


def _copied(out):
    """``out`` (a tensor, a tuple of them, or a diffusers output) with every tensor copied."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copied(x) for x in out)
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(out)(**{k: _copied(v) for k, v in out.items()})
    return out


class FreshOutputs(torch.nn.Module):
    """A compiled module whose outputs are the caller's own memory, not the graph's.

    Under CUDA graphs (``mode="reduce-overhead"``) a compiled module returns static buffers that
    its next replay overwrites. diffusers' schedulers may keep a UNet output between steps (PNDM
    appends it to ``ets`` and reads it at the next steps), so without guidance, where the
    pipeline hands the UNet output to the scheduler as it is, every kept output would silently
    become the latest one (diffusers #7420). With guidance the CFG combination happens to make a
    fresh tensor. The copy costs one latent-sized tensor per call (~0.5 MB at 512 px, batch 16).

    ``mark_step``: tell CUDA-graph trees that a new invocation starts (the documented call for
    inference loops: the previous outputs are dead), so they never keep memory for them.
    Attributes the pipeline reads (``config``, ``dtype``, ``device``, ...) come from the inner module.
    """

    def __init__(self, module, mark_step: bool = False) -> None:
        super().__init__()
        self.inner = module  # a (compiled) module, or a compiled function
        self.mark_step = mark_step

    def forward(self, *args, **kwargs):
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        return _copied(self.inner(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class ReplayedOutputs(torch.nn.Module):
    """What a CUDA-graph replay does to a module's outputs, on any device: one static buffer,
    overwritten by every call. Put in place of ``torch.compile`` (tests, ``bench/gpu_session.py
    --smoke``), it shows on a CPU whether a caller keeps outputs across calls (`FreshOutputs`)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.buffer: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        if self.buffer is None or self.buffer.shape != sample.shape:
            self.buffer = torch.empty_like(sample)
        self.buffer.copy_(sample)
        return (self.buffer,)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _compile(module, device: torch.device) -> FreshOutputs:
    """``module`` (or a function) under torch.compile (CUDA graphs on a GPU), whole-graph, outputs copied out."""
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
    return FreshOutputs(torch.compile(module, mode=mode, fullgraph=True), mark_step=device.type == "cuda")


def _compile_vae_decode(vae, device: torch.device) -> None:
    """Route ``vae.decode`` through a compiled copy of itself (outputs copied out, as the
    UNet's); the pipeline's call is unchanged. The noise generators it passes are unused by
    SD's VAE and left out of the compiled call."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    compiled = _compile(vae.decode, device)  # the bound method as it is now

    def decode(z: torch.Tensor, return_dict: bool = True, generator=None):
        (sample,) = compiled(z, return_dict=False)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.decode = decode


def to_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] float NCHW -> uint8 NCHW at ``size``, resized with antialiasing, on the device."""
    if images.shape[-1] != size or images.shape[-2] != size:
        from torchvision.transforms.v2 import functional as F

        images = F.resize(images, [size, size], antialias=True)
    images = torch.nan_to_num(images, nan=0.0)  # non-finite pixels (fp16 overflow) -> black
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class DiffusionGenerator:
    """Stable Diffusion images for (prompt, seed) batches; see the module docstring."""

    def __init__(self, cfg: GeneratorConfig, model: str, out_resolution: int, device: torch.device) -> None:
        self.cfg, self.device, self.out_resolution = cfg, device, out_resolution
        self.batch_size = cfg.batch_size
        self.dtype = resolve_dtype(cfg.dtype, device)
        quiet_truncation_warnings()  # said once at start-up by the launcher, not at every batch
        pipe = load_pipeline(model, self.dtype, cfg.safety_checker).to(device)
        pipe.set_progress_bar_config(disable=True)
        if cfg.unet:  # before the LoRAs: they are fused into the UNet that runs
            pipe.unet = load_unet(cfg.unet, self.dtype).to(device)
        fuse_loras(pipe, cfg.lora)
        scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config, cfg.timestep_spacing)
        if scheduler is not None:
            pipe.scheduler = scheduler
        self.eta = resolved_eta(cfg)
        self.guided = guided(cfg, pipe.unet.config)
        self.deepcache = apply_speedups(pipe, cfg)  # before compile (refused with it) and channels-last
        if cfg.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        if cfg.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if compiles(cfg, device.type):
            pipe.unet = _compile(pipe.unet, device)
            if cfg.compile_vae:
                _compile_vae_decode(pipe.vae, device)
        self.pipe = pipe
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._negative: torch.Tensor | None = None
        self.redraws = 0

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[B, 77, D]`` from the cache; misses are encoded in one call."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeds))
        if missing:
            embeds, _ = self.pipe.encode_prompt(missing, self.device, 1, False)
            for prompt, embed in zip(missing, embeds):
                self._embeds[prompt] = embed
            while len(self._embeds) > max(self.cfg.text_cache, len(prompts)):
                self._embeds.popitem(last=False)
        for p in prompts:
            self._embeds.move_to_end(p)
        return torch.stack([self._embeds[p] for p in prompts])

    @torch.inference_mode()
    def negative(self, n: int) -> torch.Tensor | None:
        if not self.guided:
            return None
        if self._negative is None:
            self._negative = self.pipe.encode_prompt([""], self.device, 1, False)[0]
        return self._negative.expand(n, -1, -1)

    def _denoise(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] at the generation size, and a per-sample 'bad' mask."""
        n = len(prompts)
        out = self.pipe(
            prompt_embeds=self.encode(prompts),
            negative_prompt_embeds=self.negative(n),
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            num_inference_steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance,
            eta=self.eta,  # read by DDIM and TCD only (the pipeline passes it where the step takes it)
            height=self.cfg.resolution,
            width=self.cfg.resolution,
            output_type="pt",
        )
        images = out.images
        bad = ~torch.isfinite(images).flatten(1).all(1) | (images.flatten(1).amax(1) <= 0)
        if out.nsfw_content_detected is not None:
            bad |= torch.tensor(out.nsfw_content_detected, device=bad.device)
        return images, bad

    def _batch(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images at the stream resolution and their 'bad' mask, both on the device.

        Padded to ``batch_size``: a fixed batch shape keeps the compiled graph."""
        n, pad = len(prompts), self.batch_size - len(prompts)
        images, bad = self._denoise(prompts + prompts[:1] * pad, list(seeds) + list(seeds[:1]) * pad)
        return to_uint8(images[:n], self.out_resolution), bad[:n]

    @torch.inference_mode()
    def generate_into(self, out: torch.Tensor, prompts: list[str], seeds: list[int]) -> None:
        """Write a unit's images into ``out`` (uint8 ``[N, 3, R, R]``: a pinned queue slot, or
        device memory), ``batch_size`` at a time. Copies out are asynchronous and bad images are
        redrawn only after every batch is queued, so the GPU never waits for the host."""
        bad = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            images, batch_bad = self._batch(prompts[start:stop], seeds[start:stop])
            out[start:stop].copy_(images, non_blocking=True)
            bad.append(batch_bad)
        self._redraw(out, prompts, seeds, torch.cat(bad))

    def _redraw(self, out: torch.Tensor, prompts: list[str], seeds: list[int], bad: torch.Tensor) -> None:
        for attempt in range(1, self.cfg.max_redraws + 1):
            todo = torch.nonzero(bad).flatten().tolist()  # the one host sync of a unit
            if not todo:
                return
            self.redraws += len(todo)
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start : start + self.batch_size]
                images, again = self._batch(
                    [prompts[i] for i in idx], [redraw_seed(int(seeds[i]), attempt) for i in idx]
                )
                out[idx] = images.to(out.device)
                bad[idx] = again
        # a sample still bad after max_redraws stays as it came out (black)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """uint8 ``[N, 3, R, R]`` on the device, R = the stream resolution."""
        r = self.out_resolution
        out = torch.empty(len(prompts), 3, r, r, dtype=torch.uint8, device=self.device)
        self.generate_into(out, prompts, seeds)
        return out

    def warmup(self) -> None:
        """One full batch: loads kernels, compiles and captures the CUDA graphs."""
        self.generate(["warm-up"] * self.batch_size, list(range(self.batch_size)))
        self._embeds.pop("warm-up", None)
        self.redraws = 0
