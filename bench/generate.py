"""Images/s of streamgen's generator, measured as a generator process makes them, vs plain diffusers.

    python bench/generate.py                        # CPU: tiny model, 64 px, 20 steps, batch 8
    python bench/generate.py --model sd14-random    # GPU defaults: SD v1.4's shapes, 512 px, 50 steps, batch 16

Side by side, in one run, on the same model, scheduler, steps, guidance, resolution and batch:

(a) streamgen: `DiffusionGenerator.generate_into` one queue slot, exactly as a generator process
    does (`streamgen.stream.worker.worker_main`): cached text embeddings, one noise generator per
    sample, resize to the stream resolution and uint8 on the device, an asynchronous copy into
    the slot (page-locked with cudaHostRegister on a GPU), one host sync per unit. On a GPU:
    fp16, channels-last, the UNet under torch.compile with CUDA graphs.
(b) diffusers: ``pipe(prompts, generator=[...], ...)`` at the same batch, dtype and channels-last,
    output on the device (no resize, no copy out);
(c) on a GPU, (b) at batch 1 (diffusers as most people run it).

It also prints the UNet calls per batch (counted on (b): PNDM makes one more than its steps),
the redraws during the timed calls (random weights can make black images, which are redrawn and
would inflate (a)'s time), TFLOP per image from the counted calls, TFLOP/s achieved, and the VAE
decode: its share of (a)'s batch time and its time channels-last vs contiguous (GroupNorm on CUDA
returns contiguous outputs, so channels-last may not pay there). ``--compile-vae`` compiles the
decoder too (`--generator.compile_vae`). ``--json FILE`` writes every figure.

``--preset NAME`` (a ``configs/fast/`` preset: lcm4_cdc_g2, turbo1_cdc, turbo4_cdc, deepcache3_cdc_g2)
measures instead the preset's generator and the paper's setting (50 PNDM steps, guidance 7.5) side
by side in one run, as (a) above, and prints images/s, the measured speed-up over the paper's
setting and the one its FLOPs predict (`streamgen.generate.cost`):

    python bench/generate.py --preset lcm4_cdc_g2                       # GPU: the preset's model at 512 px
    python bench/generate.py --preset lcm4_cdc_g2 --model sd14-random --resolution 64 --batch 2   # CPU

On random weights (``sd14-random``; SD-Turbo's SD 2.1 UNet has about SD v1.4's cost) the preset's
LoRAs are left out: a fused LoRA changes no shape and no cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from streamgen.config import GeneratorConfig, parse_config
from streamgen.generate.cost import image_cost
from streamgen.generate.diffusion import DiffusionGenerator, resolve_dtype, tflop_per_image, unet_evaluations
from streamgen.generate.pipeline import load_pipeline, resolve_model
from streamgen.stream.queue import Doorbell, SlotQueue

PROMPTS = ["papillon, toy spaniel inside hockey arena", "tabby, tabby cat, domestic cat inside kitchen"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call, after one untimed call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def parser(gpu: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="tiny, sd14-random, or a diffusers folder (default: sd14-random on GPU, tiny on CPU; a preset's own model)",
    )
    p.add_argument("--resolution", type=int, default=512 if gpu else 64, help="generation size in px")
    p.add_argument(
        "--out-resolution", type=int, default=None, help="stream resolution (default: 256 on GPU, 32 on CPU)"
    )
    p.add_argument("--steps", type=int, default=50 if gpu else 20)
    p.add_argument("--guidance", type=float, default=7.5, help="<= 1: no classifier-free guidance")
    p.add_argument("--scheduler", default="default", help="default (the model's: PNDM for SD v1.4), ddim, dpm++")
    p.add_argument("--batch", type=int, default=16 if gpu else 8)
    p.add_argument("--iters", type=int, default=3, help="timed calls per side")
    p.add_argument("--compile", default="auto", help="auto (GPU: on), on, off")
    p.add_argument("--compile-vae", action="store_true", help="also compile the VAE decoder (needs the UNet compiled)")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense fp16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s)"
    )
    p.add_argument("--skip-batch1", action="store_true", help="skip (c), the plain batch-1 baseline (slow at 50 steps)")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument(
        "--preset",
        help="a configs/fast/ preset (NAME or a YAML path): its generator vs the paper's setting, side by side",
    )
    return p


FAST = Path(__file__).resolve().parents[1] / "configs" / "fast"


def preset_config(name: str) -> tuple[str, GeneratorConfig]:
    """(model, generator config) of a configs/fast/ preset: NAME (its stream arm) or a YAML path."""
    path = Path(name) if name.endswith(".yaml") else FAST / f"in100_{name}_stream.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("in100_").removesuffix("_stream") for p in FAST.glob("*_stream.yaml"))
        raise SystemExit(f"bench/generate.py: no preset {name!r} (known: {', '.join(known)})")
    cfg = parse_config(["--config", str(path)])
    return cfg.model, cfg.generator


def measure_presets(args: argparse.Namespace) -> dict:
    """images/s of the preset's generator and of the paper's setting, one after the other, same shapes."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    preset_model, preset = preset_config(args.preset)
    model = resolve_model(args.model or preset_model)
    out_res = args.out_resolution or (256 if gpu else 32)
    shared = dict(resolution=args.resolution, batch_size=args.batch, dtype=args.dtype, compile=args.compile)
    lora_left_out = bool(preset.lora) and model in ("tiny", "sd14-random")
    sides = {
        "paper": GeneratorConfig(**shared),  # 50 PNDM steps, guidance 7.5: the paper's cost
        args.preset: dataclasses.replace(preset, **shared, lora=[] if lora_left_out else preset.lora),
    }
    if sides[args.preset].deepcache or sides[args.preset].tome:
        sides[args.preset].compile = "off" if args.compile == "on" else args.compile  # refused under compile on
    prompts = [PROMPTS[i % 2] for i in range(args.batch)]
    seeds = list(range(args.batch))
    slot = SlotQueue(1, args.batch, out_res, Doorbell())
    pinned = slot.pin_memory() if gpu else False
    figures: dict = {
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)",
        "model": args.model or preset_model,
        "preset_model": preset_model,
        "resolution": args.resolution,
        "batch": args.batch,
        "lora_left_out": lora_left_out,
        "slot_pinned": pinned,
        "sides": {},
    }
    for name, cfg in sides.items():
        gen = DiffusionGenerator(cfg, model, out_res, device)
        gen.warmup()  # one full batch: the untimed call
        view = slot.view(0)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            gen.generate_into(view.images, prompts, seeds)
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.iters
        cost, at_512 = image_cost(cfg, model), image_cost(dataclasses.replace(cfg, resolution=512), model)
        figures["sides"][name] = {
            "scheduler": cfg.scheduler,
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "deepcache": cfg.deepcache,
            "tome": cfg.tome,
            "compiled": gen.pipe.unet.__class__.__name__ == "FreshOutputs",
            "unet_calls": cost["unet_calls"],
            "rows_per_call": cost["rows_per_call"],
            "tflop_per_image": cost["tflop_per_image"],
            "tflop_per_image_512": at_512["tflop_per_image"],
            "images_per_s": args.batch / seconds,
        }
        print(f"  measured {name}: {args.batch / seconds:.4g} images/s", flush=True)
    paper = figures["sides"]["paper"]
    for side in figures["sides"].values():
        side["speedup_measured"] = side["images_per_s"] / paper["images_per_s"]
        side["speedup_flops"] = paper["tflop_per_image"] / side["tflop_per_image"]
        side["speedup_flops_512"] = paper["tflop_per_image_512"] / side["tflop_per_image_512"]
    return figures


def report_presets(f: dict) -> str:
    lines = [
        f"device: {f['device']}; model {f['model']} (preset's: {f['preset_model']}); {f['resolution']} px, "
        f"batch {f['batch']}"
        + ("; the preset's LoRA left out (random weights; no cost change)" if f["lora_left_out"] else ""),
        f"{'setting':<20} {'sched':>8} {'steps':>5} {'guid':>5} {'extra':>8} {'UNet calls':>10} "
        f"{'TFLOP/img':>10} {'@512':>8} {'images/s':>9} {'x paper':>8} {'x (FLOPs)':>9} {'x @512':>7}",
    ]
    for name, s in f["sides"].items():
        extra = f"dc{s['deepcache']}" if s["deepcache"] else (f"tome{s['tome']:g}" if s["tome"] else "-")
        calls = f"{s['unet_calls']}x{s['rows_per_call']}"
        lines.append(
            f"{name:<20} {s['scheduler']:>8} {s['steps']:>5} {s['guidance']:>5g} {extra:>8} {calls:>10} "
            f"{s['tflop_per_image']:>10.4g} {s['tflop_per_image_512']:>8.2f} {s['images_per_s']:>9.3f} "
            f"{s['speedup_measured']:>8.2f} {s['speedup_flops']:>9.2f} {s['speedup_flops_512']:>7.2f}"
        )
    lines.append(
        "x paper: measured images/s over the paper's setting's; x (FLOPs): what the FLOPs at this size predict; "
        "x @512: at 512 px (a GPU's target)"
    )
    return "\n".join(lines)


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element list counting ``module``'s forward calls (an eager module: hooks run every call)."""
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def time_vae_decode(pipe, latents: torch.Tensor, iters: int, device: torch.device) -> dict[str, float]:
    """Seconds per decode of ``latents`` with the VAE channels-last and contiguous (restored after)."""
    vae = pipe.vae
    out = {}
    for name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        vae.to(memory_format=fmt)
        with torch.inference_mode():
            out[name] = timed(lambda: vae.decode(latents / vae.config.scaling_factor), iters, device)
    vae.to(memory_format=torch.channels_last)
    return out


def measure(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    model = resolve_model(args.model)
    out_res = args.out_resolution or (256 if gpu else 32)
    cfg = GeneratorConfig(
        resolution=args.resolution,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        batch_size=args.batch,
        compile=args.compile,
        compile_vae=args.compile_vae,
        dtype=args.dtype,
    )
    prompts = [PROMPTS[i % 2] for i in range(args.batch)]
    seeds = list(range(args.batch))
    figures: dict = {
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)",
        "model": args.model,
        "resolution": args.resolution,
        "out_resolution": out_res,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "batch": args.batch,
    }

    # (a) streamgen, into a queue slot as the worker writes it
    ours = DiffusionGenerator(cfg, model, out_res, device)
    started = time.perf_counter()
    ours.warmup()
    figures["warmup_s"] = time.perf_counter() - started
    slot = SlotQueue(1, args.batch, out_res, Doorbell())
    figures["slot_pinned"] = slot.pin_memory() if gpu else False
    view = slot.view(0)
    ours.redraws = 0
    figures["a_s_per_batch"] = timed(lambda: ours.generate_into(view.images, prompts, seeds), args.iters, device)
    figures["a_redraws"] = ours.redraws
    figures["a_images_per_s"] = args.batch / figures["a_s_per_batch"]

    # (b) plain diffusers, channels-last like (a)
    pipe = load_pipeline(model, resolve_dtype(cfg.dtype, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(ours.pipe.scheduler).from_config(ours.pipe.scheduler.config)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    calls = count_calls(pipe.unet)

    def plain(n: int):
        return pipe(
            prompts[:n],
            generator=[torch.Generator().manual_seed(s) for s in seeds[:n]],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.resolution,
            width=args.resolution,
            output_type="pt",
        ).images

    figures["b_s_per_batch"] = timed(lambda: plain(args.batch), args.iters, device)
    figures["b_images_per_s"] = args.batch / figures["b_s_per_batch"]
    figures["unet_calls_counted"] = calls[0] // (args.iters + 1)
    figures["unet_calls_expected"] = unet_evaluations(pipe.scheduler, args.steps)
    figures["ratio_a_over_b"] = figures["a_s_per_batch"] / figures["b_s_per_batch"]
    if gpu and not args.skip_batch1:
        figures["c_s_per_image"] = timed(lambda: plain(1), args.iters, device)
        figures["a_over_c_speedup"] = figures["a_images_per_s"] * figures["c_s_per_image"]

    # cost: the counted UNet calls, the published per-call FLOPs (SD v1.x shapes)
    flop = tflop_per_image(figures["unet_calls_counted"], args.guidance > 1, args.resolution)
    figures["tflop_per_image"] = flop
    figures["tflops_achieved"] = figures["a_images_per_s"] * flop
    figures["flop_bound_images_per_s"] = args.peak_tflops / flop

    # the VAE decode: its share of a batch of (a), channels-last vs contiguous
    latent = args.resolution // 8
    latents = torch.randn(args.batch, 4, latent, latent, device=device, dtype=pipe.vae.dtype)
    vae = time_vae_decode(pipe, latents, args.iters, device)
    figures["vae_decode_s"] = vae
    figures["vae_share_of_a"] = vae["channels_last"] / figures["a_s_per_batch"]
    return figures


def report(f: dict, peak: float) -> str:
    lines = [
        f"device: {f['device']}; model {f['model']}; {f['resolution']} px -> {f['out_resolution']} px, "
        f"{f['steps']} steps ({f['scheduler']}), guidance {f['guidance']}, batch {f['batch']}",
        f"streamgen warm-up (load excluded; compile and graph capture included): {f['warmup_s']:.1f} s",
        f"(a) streamgen into a {'page-locked ' if f['slot_pinned'] else ''}slot: {f['a_s_per_batch']:8.3f} s/batch "
        f"{f['a_images_per_s']:8.2f} images/s  ({f['a_redraws']} redraws in the timed calls)",
        f"(b) diffusers pipeline      : {f['b_s_per_batch']:8.3f} s/batch {f['b_images_per_s']:8.2f} images/s",
        f"    time ratio (a)/(b)      : {f['ratio_a_over_b']:8.3f}  (compiled on GPU: target <= 1/1.3)",
    ]
    if "c_s_per_image" in f:
        lines.append(
            f"(c) diffusers, batch 1      : {f['c_s_per_image']:8.3f} s/image {1 / f['c_s_per_image']:8.2f} images/s; "
            f"(a) is {f['a_over_c_speedup']:.2f}x"
        )
    lines += [
        f"    UNet calls per batch    : {f['unet_calls_counted']} counted, {f['unet_calls_expected']} from the scheduler "
        f"(x2 rows with guidance)",
        f"    {f['tflop_per_image']:.1f} TFLOP/image -> {f['tflops_achieved']:.1f} TFLOP/s achieved, "
        f"{100 * f['tflops_achieved'] / peak:.1f}% of {peak:.0f} (bound {f['flop_bound_images_per_s']:.2f} images/s)"
        + ("  [SD v1.x's cost: not the tiny model's]" if f["model"] == "tiny" else ""),
        f"    VAE decode of a batch   : {f['vae_decode_s']['channels_last']:.3f} s channels-last, "
        f"{f['vae_decode_s']['contiguous']:.3f} s contiguous; {100 * f['vae_share_of_a']:.0f}% of (a)'s batch",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parser(torch.cuda.is_available()).parse_args()
    if args.preset:
        figures = measure_presets(args)
        print(report_presets(figures))
    else:
        args.model = args.model or ("sd14-random" if torch.cuda.is_available() else "tiny")
        figures = measure(args)
        print(report(figures, args.peak_tflops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
