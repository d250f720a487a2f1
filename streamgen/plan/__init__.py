"""Plan: what sample ``i`` is, a pure function of (run seed, i): its class, prompt, scene and noise seed.

`classes` (the class sets: ImageNet-1K/100 with WordNet metadata, your own files), `prompts` (the
paper's templates), `scenes` (Places365 backgrounds), `samples` (`SamplePlan`: id -> label, scene,
seed, prompt; units of ids and each rank's cursor over them), `preview` (``python -m
streamgen.prompts``). Imports nothing of the later stages.
"""
