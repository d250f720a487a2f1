"""``--model fake``: deterministic class-free images without diffusion, for testing the stream fast."""

from __future__ import annotations

import os
import time

import torch

from streamgen.config import GeneratorConfig

FAKE = "fake"  # --model fake: a seeded pattern per noise seed, no diffusion
DELAY_ENV = "STREAMGEN_FAKE_DELAY"  # a testing hook: seconds each fake batch takes (a slow generator)


class FakeGenerator:
    """Deterministic images without diffusion: a class-free pattern from the noise seed.

    For tests of the stream itself (``--model fake``): the same interface and the same
    per-sample reproducibility, thousands of images per second on a CPU.
    """

    def __init__(self, cfg: GeneratorConfig, out_resolution: int, device: torch.device) -> None:
        self.batch_size, self.out_resolution, self.device = cfg.batch_size, out_resolution, device
        self.redraws = 0
        self.delay = float(os.environ.get(DELAY_ENV) or 0)  # tests and bench/replay.py: a slow generator
        self.seconds_per_image = cfg.seconds_per_image or 0.0  # --generator.seconds_per_image

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        r = self.out_resolution
        if self.delay:
            time.sleep(self.delay)
        out = torch.empty(len(seeds), 3, r, r, dtype=torch.uint8)
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            low = torch.randint(0, 256, (1, 3, 4, 4), generator=g, dtype=torch.uint8)
            out[i] = torch.nn.functional.interpolate(low.float(), size=(r, r), mode="nearest")[0].to(torch.uint8)
        return out.to(self.device)

    @torch.inference_mode()
    def generate_into(self, out: torch.Tensor, prompts: list[str], seeds: list[int]) -> None:
        started = time.monotonic()
        out.copy_(self.generate(prompts, seeds))
        left = started + len(seeds) * self.seconds_per_image - time.monotonic()
        if left > 0:
            time.sleep(left)

    def warmup(self) -> None:
        pass
