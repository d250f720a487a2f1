"""The first thing a session lent a GPU runs: one script, no model weights, every section on its own.

    python bench/gpu_session.py --out $OUT            # on the device: < 8 minutes on one H100/H200
    python bench/gpu_session.py --smoke --out /tmp/s  # on a CPU: the same sections at toy sizes (plumbing)

Sections, in order of value (a failing section is printed with its traceback and the next runs):

1. ``correctness``: the tiny model in fp16, UNet compiled with CUDA graphs vs eager, for PNDM, DDIM
   and DPM++ x guidance 7.5 and 1.0, a full unit (two generator batches) and a unit with redraws:
   the max pixel difference (target <= 1 level of 255, a max, not a mean), CUDA-graph skips
   (target 0: graphs really used) and graphs compiled after warm-up (target 0: no recompile).
2. ``generate``: ``bench/generate.py`` at SD v1.4's shapes (``sd14-random``), 512 px, 50 steps,
   batch 16: warm-up, images/s of streamgen and diffusers, UNet TFLOP/s against the peak, the VAE's
   share; and the text-embedding cache's GPU MiB per prompt (no autograd graph kept).
3. ``slots``: a trainer batch (256 x 3 x 256 x 256 uint8, 50 MB) copied host->device and
   device->host from a queue slot, page-locked (cudaHostRegister, as both sides now do) vs pageable.
4. ``trainer``: ResNet-50 training images/s on the GPU (bf16 autocast, channels-last, SGD), fed
   uint8 stream batches: single crop (224) and t-ReX's multi-crop (1x224 + 8x96), augmentation on the GPU.
5. ``pytest``: ``pytest -m gpu`` (the gpu-marked tests), its summary line.

Writes ``gpu_session.json`` (every figure, each section's status and seconds) into ``--out`` and
prints a Markdown table: paste it into the README and the closing note. Targets are benchmark
figures: the generator >= 5.5 images/s per H100 at the paper's settings, compiled >= 1.3x eager.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = ("default", "ddim", "dpm++")  # default: PNDM, SD v1.4's own
GUIDANCES = (7.5, 1.0)


def _graph_counters() -> dict[str, int]:
    """Dynamo/inductor counters: graphs compiled so far, and CUDA-graph skips (a skipped graph runs eager)."""
    from torch._dynamo.utils import counters

    skips = sum(v for k, v in counters["inductor"].items() if "cudagraph_skip" in k)
    return {"graphs": int(counters["stats"]["unique_graphs"]), "cudagraph_skips": int(skips)}


class _FlagFirstCall(torch.nn.Module):
    """A stand-in safety checker that flags every image of its first call: those are blacked out
    and redrawn by the generator (a unit with redraws, deterministic on both sides)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, images, clip_input):
        self.calls += 1
        flagged = [self.calls == 1] * len(images)
        return (images * 0 if self.calls == 1 else images), flagged


def _with_redraws(generator) -> None:
    from transformers import CLIPImageProcessor

    generator.pipe.safety_checker = _FlagFirstCall().to(generator.device)
    generator.pipe.feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
    )


def section_correctness(args) -> dict:
    from streamgen.config import GeneratorConfig
    from streamgen.generate.diffusion import DiffusionGenerator, ReplayedOutputs, make_scheduler

    device = torch.device("cuda" if not args.smoke else "cpu")
    dtype = "float16" if device.type == "cuda" else "float32"
    batch, steps = (2, 2) if args.smoke else (4, 8)
    prompts = ["papillon", "pirate, pirate ship", "tabby cat inside kitchen", "school bus"][:batch] * 2  # 2 batches
    seeds = list(range(101, 101 + len(prompts)))
    fake_compile = mock.patch.object(torch, "compile", lambda m, **kw: ReplayedOutputs(m)) if args.smoke else None
    results, worst = [], 0
    for guidance in GUIDANCES:
        settings = dict(resolution=64, steps=steps, guidance=guidance, batch_size=batch, dtype=dtype)
        with fake_compile or contextlib.nullcontext():
            graphs = DiffusionGenerator(GeneratorConfig(**settings, compile="on"), "tiny", 32, device)
        eager = DiffusionGenerator(GeneratorConfig(**settings, compile="off"), "tiny", 32, device)
        started = time.perf_counter()
        graphs.warmup()
        warmup_s = time.perf_counter() - started
        before = _graph_counters()
        for scheduler in SCHEDULERS:
            for gen in (graphs, eager):  # the same scheduler on both, the UNet graph unchanged
                made = make_scheduler(scheduler, gen.pipe.scheduler.config)
                if made is not None:
                    gen.pipe.scheduler = made
                else:  # the model's own: PNDM for SD v1.x, as the tiny model's
                    from diffusers import PNDMScheduler

                    gen.pipe.scheduler = PNDMScheduler.from_config(gen.pipe.scheduler.config)
            for unit in ("full", "redraws"):
                if unit == "redraws":
                    _with_redraws(graphs)
                    _with_redraws(eager)
                graphs.redraws = eager.redraws = 0
                a = graphs.generate(prompts, seeds)
                b = eager.generate(prompts, seeds)
                diff = int((a.int() - b.int()).abs().max())
                worst = max(worst, diff)
                results.append(
                    {
                        "scheduler": scheduler,
                        "guidance": guidance,
                        "unit": unit,
                        "max_diff": diff,
                        "redraws": [graphs.redraws, eager.redraws],
                    }
                )
                for gen in (graphs, eager):
                    gen.pipe.safety_checker = None
        after = _graph_counters()
        results.append(
            {
                "guidance": guidance,
                "warmup_s": warmup_s,
                "graphs_after_warmup": after["graphs"] - before["graphs"],
                "cudagraph_skips": after["cudagraph_skips"],
            }
        )
    return {"cases": results, "worst_max_diff": worst, "ok": worst <= 1}


def section_generate(args) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import generate as bench_generate  # bench/generate.py

    gpu = not args.smoke
    cli = (
        ["--model", "sd14-random", "--resolution", "512", "--steps", "50", "--batch", "16", "--iters", "3"]
        if gpu
        else ["--model", "tiny", "--resolution", "64", "--steps", "2", "--batch", "2", "--iters", "1"]
    )
    options = bench_generate.parser(gpu).parse_args(cli + ["--peak-tflops", str(args.peak_tflops)])
    figures = bench_generate.measure(options)
    figures["report"] = bench_generate.report(figures, args.peak_tflops)
    figures["text_cache"] = _text_cache_cost(gpu)
    return figures


def _text_cache_cost(gpu: bool) -> dict:
    """Device memory the text-embedding cache holds per distinct prompt (an embedding is 77 x 768
    fp16 = 0.11 MiB at SD v1.4's shapes; a kept autograd graph was ~27 MiB), and whether any
    cached embedding requires grad."""
    from streamgen.config import GeneratorConfig
    from streamgen.generate.diffusion import DiffusionGenerator

    device = torch.device("cuda" if gpu else "cpu")
    model = "sd14-random" if gpu else "tiny"
    gen = DiffusionGenerator(GeneratorConfig(compile="off"), model, 64, device)
    n = 256
    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
    for start in range(0, n, 32):
        gen.encode([f"a photo of thing number {i}, a kind of object" for i in range(start, start + 32)])
    held = sum(e.nbytes for e in gen._embeds.values())
    out = {
        "prompts": n,
        "embedding_mib_per_prompt": held / n / 2**20,
        "requires_grad": any(e.requires_grad for e in gen._embeds.values()),
    }
    if gpu:
        torch.cuda.synchronize()
        out["device_mib_per_prompt"] = (torch.cuda.memory_allocated(device) - before) / n / 2**20
    return out


def section_slots(args) -> dict:
    from streamgen.stream.queue import Doorbell, SlotQueue

    if args.smoke:
        return {"skipped": "no GPU"}
    batch, res = 256, 256
    queue = SlotQueue(1, batch, res, Doorbell())
    host = queue.view(0).images
    host.fill_(3)
    device = torch.device("cuda")
    on_gpu = torch.empty(host.shape, dtype=torch.uint8, device=device)
    gbytes = host.numel() / 1e9

    def bandwidth(fn, iters: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return gbytes * iters / (time.perf_counter() - started)

    out = {"bytes": host.numel()}
    for state in ("pageable", "registered"):
        if state == "registered":
            out["registered_ok"] = queue.pin_memory()
        out[f"h2d_gb_s_{state}"] = bandwidth(lambda: on_gpu.copy_(host, non_blocking=True))
        out[f"d2h_gb_s_{state}"] = bandwidth(lambda: host.copy_(on_gpu, non_blocking=True))
    return out


def section_trainer(args) -> dict:
    from streamgen.config import TrainConfig
    from streamgen.train.augment import build_augment
    from streamgen.train.model import Classifier

    device = torch.device("cpu" if args.smoke else "cuda")
    arch, batch, res, crop = ("resnet18", 8, 64, 32) if args.smoke else ("resnet50", 256, 256, 224)
    steps, warm = (2, 1) if args.smoke else (20, 8)
    torch.backends.cudnn.benchmark = True
    out = {"arch": arch, "batch": batch, "stream_resolution": res, "crop": crop}
    for recipe in ("single", "multicrop"):
        t = TrainConfig(arch=arch, crop=crop, augment=recipe)
        augment = build_augment(t)
        model = Classifier(arch, [f"c{i}" for i in range(100)], head="trex" if recipe == "multicrop" else "linear")
        model = model.to(device)
        if device.type == "cuda":
            model.net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
        labels = torch.randint(0, 100, (batch,), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                logits = model.forward_crops(augment(images))
                loss = torch.nn.functional.cross_entropy(logits, labels.repeat(logits.shape[0] // batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warm):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{recipe}_images_per_s"] = batch * steps / (time.perf_counter() - started)
    return out


def section_pytest(args) -> dict:
    if args.smoke:
        return {"skipped": "no GPU"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts="]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:])}


SECTIONS = {
    "correctness": section_correctness,
    "generate": section_generate,
    "slots": section_slots,
    "trainer": section_trainer,
    "pytest": section_pytest,
}


def table(results: dict) -> str:
    """The Markdown summary pasted into the README and the closing note."""
    rows = ["| section | figure | value |", "|---|---|---|"]

    def add(section: str, figure: str, value) -> None:
        rows.append(f"| {section} | {figure} | {value} |")

    for name, r in results["sections"].items():
        if r["status"] != "ok":
            add(name, r["status"], r.get("error", "").strip().splitlines()[-1][:120] if r.get("error") else "")
            continue
        f = r["figures"]
        if "skipped" in f:
            add(name, "skipped", f["skipped"])
        elif name == "correctness":
            add(name, "worst max diff, compiled vs eager (levels of 255)", f["worst_max_diff"])
            for case in f["cases"]:
                if "unit" in case:
                    add(name, f"{case['scheduler']} g={case['guidance']} {case['unit']}", case["max_diff"])
                else:
                    add(
                        name,
                        f"g={case['guidance']}: graphs after warm-up / cudagraph skips / warm-up s",
                        f"{case['graphs_after_warmup']} / {case['cudagraph_skips']} / {case['warmup_s']:.0f}",
                    )
        elif name == "generate":
            add(name, "streamgen images/s (a)", f"{f['a_images_per_s']:.2f}")
            add(
                name,
                "diffusers images/s (b), batch 1 (c)",
                f"{f['b_images_per_s']:.2f}, {1 / f.get('c_s_per_image', float('inf')):.2f}",
            )
            add(name, "compiled speed-up (b)/(a) time", f"{1 / f['ratio_a_over_b']:.2f}x")
            add(name, "warm-up s", f"{f['warmup_s']:.0f}")
            add(name, "UNet calls / TFLOP per image", f"{f['unet_calls_counted']} / {f['tflop_per_image']:.1f}")
            add(
                name,
                "TFLOP/s achieved (% of peak)",
                f"{f['tflops_achieved']:.0f} ({100 * f['tflops_achieved'] / results['peak_tflops']:.0f}%)",
            )
            add(
                name,
                "VAE share of a batch; channels-last / contiguous s",
                f"{100 * f['vae_share_of_a']:.0f}%; {f['vae_decode_s']['channels_last']:.3f} / {f['vae_decode_s']['contiguous']:.3f}",
            )
            tc = f["text_cache"]
            add(
                name,
                "text cache MiB per prompt (device; embedding)",
                f"{tc.get('device_mib_per_prompt', float('nan')):.3f}; {tc['embedding_mib_per_prompt']:.3f}",
            )
        elif name == "slots":
            add(
                name, "H2D GB/s pageable / registered", f"{f['h2d_gb_s_pageable']:.1f} / {f['h2d_gb_s_registered']:.1f}"
            )
            add(
                name, "D2H GB/s pageable / registered", f"{f['d2h_gb_s_pageable']:.1f} / {f['d2h_gb_s_registered']:.1f}"
            )
        elif name == "trainer":
            add(
                name,
                f"{f['arch']} images/s single crop / multi-crop",
                f"{f['single_images_per_s']:.0f} / {f['multicrop_images_per_s']:.0f}",
            )
        elif name == "pytest":
            add(name, "pytest -m gpu", f["summary"])
        add(name, "section seconds", f"{r['seconds']:.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_session.json (default: $OUT)")
    p.add_argument("--smoke", action="store_true", help="CPU: every section at toy sizes, to check the script itself")
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections to run, comma-separated ({','.join(SECTIONS)})"
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16 peak (H100/H200 SXM: 989)")
    p.add_argument("--pytest-timeout", type=float, default=180.0, help="seconds for the gpu-marked tests")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_session: no CUDA GPU here; run it on the device, or with --smoke on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
        "peak_tflops": args.peak_tflops,
        "sections": {},
    }
    try:
        import diffusers

        results["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    for name in args.only.split(","):
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            figures = SECTIONS[name](args)
            entry = {"status": "ok", "figures": figures}
        except Exception:
            entry = {"status": "failed", "error": traceback.format_exc()}
            print(entry["error"], file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - started
        results["sections"][name] = entry
        (out / "gpu_session.json").write_text(
            json.dumps(results, indent=1, default=str)
        )  # after each: a kill keeps the rest
        if entry["status"] == "ok" and "report" in entry.get("figures", {}):
            print(entry["figures"]["report"], flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
