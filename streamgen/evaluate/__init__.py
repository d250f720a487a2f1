"""Evaluate: real images, and what a trained network scores on them.

`benchmarks` (ImageNet-val/-V2/-Sketch/-R/-A as released), `realdata` (reading image folders,
skipping unreadable files), `transfer` (the probes' datasets), `probe` (Tab. 2's linear probe),
`probe_callback` (probes while training), `benchmark_eval` (Tab. 1's scores and both tables),
`cli` (eval.py's body). Imports `train` (the classifier) and the earlier stages.
"""
