"""Shared fixtures: a tiny SD pipeline, image folders, and helpers to run train.py for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wordnet_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True
    except LookupError:
        return False


needs_wordnet = pytest.mark.skipif(
    not wordnet_available(),
    reason="WordNet for nltk is not installed (scripts/install-wordnet.sh DIR; export NLTK_DATA=DIR)",
)


@pytest.fixture(scope="session")
def tiny_pipe():
    from streamgen.generate.pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_image_folder(
    root: Path, keys: list[str], per_class: int = 3, size: tuple[int, int] = (40, 48), seed: int = 0
) -> Path:
    """A folder in the ImageNet-val layout: root/<key>/<i>.png, random RGB images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for key in keys:
        (root / key).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / key / f"{i}.png")
    return root


def write_benchmark(parent: Path, name: str, per_class: int = 1, seed: int = 0) -> Path:
    """An ImageNet benchmark in miniature, exactly as its archive extracts into ``parent``: the same
    folders, file names and extra files, with tiny random JPEGs; returns the extracted folder.

    ``name``: in-val, in-sketch, in-r, in-a, or in-v2:VARIANT (matched-frequency, threshold0.7, top-images).
    """
    import hashlib

    from PIL import Image

    from streamgen.evaluate.benchmarks import synsets

    rng = np.random.default_rng(seed)
    name, _, variant = name.partition(":")
    top = {
        "in-val": "val",
        "in-v2": f"imagenetv2-{variant}-format-val",
        "in-sketch": "sketch",
        "in-r": "imagenet-r",
        "in-a": "imagenet-a",
    }[name]
    root = parent / top
    for c, wnid in enumerate(synsets(name)):
        folder = root / (str(c) if name == "in-v2" else wnid)  # ImageNet-V2: class index folders
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            n = c * per_class + k
            file = {
                "in-val": f"ILSVRC2012_val_{n + 1:08d}.JPEG",
                "in-v2": f"{hashlib.sha1(f'{c}-{k}'.encode()).hexdigest()}.jpeg",
                "in-sketch": f"sketch_{k}.JPEG",
                "in-r": f"{('art', 'cartoon', 'origami', 'sketch')[k % 4]}_{k}.jpg",
                "in-a": f"0.{n:06d}_thing _ thing_0.{k + 1}5.jpg",
            }[name]
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / file, "JPEG")
    if name in ("in-r", "in-a"):
        (root / "README.txt").write_text(f"{top}\n" + "".join(f"{w} class\n" for w in synsets(name)))
    return root


def write_checkpoint(path: Path, keys: list[str], arch: str = "resnet18", crop: int | None = None, seed: int = 0):
    """A classifier checkpoint as train.py leaves it (the format `Classifier.load_from_checkpoint` reads);
    with ``crop``, inside a run folder whose config.yaml says ``train.crop``. Returns the model (eval mode)."""
    import lightning
    import yaml

    from streamgen.train.model import Classifier

    torch.manual_seed(seed)
    model = Classifier(arch, keys)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    if crop is not None:
        (path.parent.parent / "config.yaml").write_text(yaml.safe_dump({"train": {"arch": arch, "crop": crop}}))
    return model.eval()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _is_resource_tracker(pid: str) -> bool:
    """multiprocessing's own helper: started once per interpreter by the first spawn, it lives as
    long as the test session by design (a run's processes are checked, not Python's)."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc), for checking that a run left no process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _is_resource_tracker(entry):
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``: a run and all it started, even
    those reparented after their parent died."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(entry):
            try:
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def memfd_holders(pids: list[int], prefix: str = "memfd:streamgen") -> list[int]:
    """Those of ``pids`` that hold a streamgen shared-memory file."""
    holders = []
    for pid in pids:
        try:
            if any(prefix in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")):
                holders.append(pid)
        except OSError:
            continue
    return holders


def train_cmd(*args: str, config: str = "configs/smoke_tiny.yaml") -> list[str]:
    return [PYTHON, str(ROOT / "train.py"), "--config", str(ROOT / config), *args]


class TrainRun:
    """train.py in a subprocess (its own process group), with its output kept for assertions."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp_path / f"train-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        # Every process of the run inherits this marker: tests find them all by it.
        self.marker = f"STREAMGEN_TEST_RUN={self.log_path}"
        marker_env = {"STREAMGEN_TEST_RUN": str(self.log_path)}
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), **marker_env},
            start_new_session=True,
        )

    def processes(self) -> list[int]:
        return processes_with_env(self.marker)

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"train.py exited ({self.proc.returncode}) before {text!r}:\n{self.output[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.2)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def train_run(tmp_path):
    runs: list[TrainRun] = []

    def start(
        *args: str,
        config: str = "configs/smoke_tiny.yaml",
        env: dict[str, str] | None = None,
        wrap: tuple[str, ...] = (),
    ) -> TrainRun:
        # wrap: a command that runs train.py, e.g. ("timeout", "900") as a user's script does
        run = TrainRun([*wrap, *train_cmd("--out", str(tmp_path / "runs"), *args, config=config)], tmp_path, env)
        runs.append(run)
        return run

    yield start
    for run in runs:  # never leave a run behind, whatever the test did
        if run.proc.poll() is None:
            run.kill_group()


NODE_FLAGS = ("--model", "fake", "--train.log_every", "2")
NODE_SECRET = {"STREAMGEN_DIST_SECRET": "a secret the nodes of the test share"}


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the trainers' DDP group and the launchers' store)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


def start_nodes(train_run, nodes: int, *args: str, port: int | None = None, extra: dict | None = None) -> list:
    """Start `nodes` launchers of one multi-node run on this machine (node 0 at 127.0.0.1), sharing a secret."""
    port = port or free_port_pair()
    runs = []
    for rank in range(nodes):
        flags = ["--dist.nodes", str(nodes), "--dist.node_rank", str(rank)]
        flags += ["--dist.master_addr", "127.0.0.1", "--dist.master_port", str(port)]
        runs.append(train_run(*NODE_FLAGS, *flags, *args, *(extra or {}).get(rank, ()), env=NODE_SECRET))
    return runs


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_consumed(run_dir: Path, rank: int = 0) -> list[tuple[int, int]]:
    path = run_dir / f"consumed-rank{rank}.tsv"
    return [tuple(map(int, line.split("\t"))) for line in path.read_text().splitlines()]


def make_lora(folder: Path, seed: int = 0, **unet_changes) -> Path:
    """A LoRA in diffusers' format with random low-rank weights (peft on a tiny UNet, saved by
    diffusers' own save_lora_weights); ``unet_changes`` make it for another UNet's shapes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from streamgen.generate.pipeline import tiny_configs

    unet_config = dict(tiny_configs()[0], **unet_changes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        unet.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"
