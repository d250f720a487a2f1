"""streamgen: train an image classifier on a live stream of Stable Diffusion images.

One sub-package per stage, data flowing one way (an import never points to a later stage):

    plan -> generate -> stream -> cache -> train -> evaluate -> launch      (compare reads run folders)

`config` (every setting) and `errors` (`UsageError`) are the foundation every stage may import.
``train.py`` and ``eval.py`` are thin entry points; so are ``python -m streamgen.prompts``,
``python -m streamgen.cache`` and ``python -m streamgen.compare``. See README.md's *Design*.
"""

__version__ = "0.1.0"
