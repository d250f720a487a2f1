"""streamgen: train an image classifier on a live stream of Stable Diffusion images.

Data flows one way through the modules:
classes -> prompts -> plan -> generator -> queue -> supervisor -> stream -> augment -> model
-> callbacks; evaluate reads real images. ``launch`` wires them together for ``train.py``.
"""

__version__ = "0.1.0"
