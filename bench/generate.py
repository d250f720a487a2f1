"""Images/s of streamgen's generator vs a plain diffusers StableDiffusionPipeline call.

    python bench/generate.py                                  # CPU: tiny model, 64 px
    python bench/generate.py --model sd14-random --resolution 512 --steps 50 --batch 16   # GPU

Both sides use the same model, scheduler, steps, guidance, resolution and batch; (a) is
streamgen's `DiffusionGenerator.generate` (cached text embeddings, per-sample noise,
resize + uint8 on the device, and on a GPU fp16 + channels-last + torch.compile with CUDA
graphs), (b) is ``pipe(prompts, generator=[...], ...)`` at the same batch and, on a GPU,
also at batch 1 (plain diffusers as most people run it). On a GPU it also prints the achieved
TFLOP/s and the fraction of the FLOP bound, from the published SD v1.4 costs
(``streamgen/data/sd_v1_4_shapes.json``): UNet 1.68 TFLOP per guided step at 512 px, VAE
decode 2.54 TFLOP. Without the real weights, ``--model sd14-random`` has the same shapes and
so the same cost.
"""

import argparse
import time

import torch

from streamgen.config import GeneratorConfig
from streamgen.generator import DiffusionGenerator, resolve_dtype
from streamgen.pipeline import load_pipeline, resolve_model, sd14_shapes

PROMPTS = ["papillon, toy spaniel inside hockey arena", "tabby, tabby cat, domestic cat inside kitchen"]


def tflop_per_image(resolution: int, steps: int, guided: bool) -> float:
    cost = sd14_shapes()["flops_per_image_published"]
    area = (resolution / 512) ** 2
    unet = cost["unet_per_cfg_step_tflop"] * (1.0 if guided else 0.5) * steps
    return area * (unet + cost["vae_decode_512_tflop"]) + cost["text_encoder_tflop"]


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd14-random" if gpu else "tiny")
    parser.add_argument("--resolution", type=int, default=512 if gpu else 64)
    parser.add_argument(
        "--out-resolution", type=int, default=None, help="stream resolution (default: the generation size)"
    )
    parser.add_argument("--steps", type=int, default=50 if gpu else 20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=16 if gpu else 8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--compile", default="auto", help="auto (GPU: on), on, off")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--peak-tflops", type=float, default=800.0, help="dense bf16/fp16 peak of the GPU (H100 SXM: ~800-990)"
    )
    parser.add_argument("--skip-batch1", action="store_true", help="skip the plain batch-1 baseline (slow at 50 steps)")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(torch.get_num_threads())
    model = resolve_model(args.model)
    cfg = GeneratorConfig(
        resolution=args.resolution,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch,
        compile=args.compile,
        dtype=args.dtype,
    )
    out_res = args.out_resolution or args.resolution
    prompts = [PROMPTS[i % 2] for i in range(args.batch)]
    seeds = list(range(args.batch))

    ours = DiffusionGenerator(cfg, model, out_res, device)
    t0 = time.perf_counter()
    ours.warmup()
    warmup_s = time.perf_counter() - t0
    t_ours = timed(lambda: ours.generate(prompts, seeds), args.iters, device)

    pipe = load_pipeline(model, resolve_dtype(cfg.dtype, device)).to(device)
    pipe.set_progress_bar_config(disable=True)

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

    t_plain = timed(lambda: plain(args.batch), args.iters, device)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; model {args.model}; {args.resolution} px, {args.steps} steps, guidance {args.guidance}, batch {args.batch}"
    )
    print(f"streamgen warm-up (load excluded; compile/capture included): {warmup_s:.1f} s")
    print(f"(a) streamgen generator : {t_ours:8.3f} s/batch  {args.batch / t_ours:8.2f} images/s")
    print(f"(b) diffusers pipeline  : {t_plain:8.3f} s/batch  {args.batch / t_plain:8.2f} images/s")
    print(f"    time ratio (a)/(b)  : {t_ours / t_plain:8.3f}   (target <= 1.05 on CPU)")
    if gpu:
        if not args.skip_batch1:
            t_one = timed(lambda: plain(1), args.iters, device)
            print(
                f"(c) diffusers, batch 1  : {t_one:8.3f} s/image  {1 / t_one:8.2f} images/s; (a) is {args.batch / t_ours * t_one:.2f}x (target >= 3x)"
            )
        flop = tflop_per_image(args.resolution, args.steps, args.guidance > 1)
        achieved = args.batch / t_ours * flop
        print(
            f"    {flop:.1f} TFLOP/image -> {achieved:.0f} TFLOP/s achieved, {100 * achieved / args.peak_tflops:.0f}% of {args.peak_tflops:.0f} TFLOP/s "
            f"(bound {args.peak_tflops / flop:.2f} images/s; target >= 5.5 images/s, >= 60%)"
        )


if __name__ == "__main__":
    main()
