"""Generate: (prompt, noise seed) -> uint8 images on a device, one batch at a time.

`pipeline` (the Stable Diffusion pipelines: from disk or the offline Hugging Face cache, or
random-weight ones built in code), `diffusion` (`DiffusionGenerator`: the paper's knobs on
diffusers' own pipeline, compiled, per-sample noise, redraws), `fake` (``--model fake``: no
diffusion, for testing the stream). Imports only `streamgen.plan` (and the foundation).
"""
