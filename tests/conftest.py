"""Small generated datasets in their native layouts, and a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from lavise.models import Preprocessing, TargetModel

# Concepts are drawn as flat-coloured shapes: each has its own colour and place, so a
# model's features differ between them.
SHAPES = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220), "traffic light": (230, 200, 30)}


def _shape_mask(kind: str, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "circle":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)
    if kind == "triangle":
        height = y1 - y0
        half = (x1 - x0) / 2 * (yy - y0) / max(height, 1)
        cx = (x0 + x1) / 2
        return ((yy >= y0) & (yy < y1) & (np.abs(xx - cx) <= half)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def make_coco(root: Path, *, images: int = 24, size: int = 64, seed: int = 0, names=tuple(SHAPES)) -> Path:
    """Write ``root/images/*.png`` and ``root/annotations.json`` (RLE, polygons, crowd)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    image_entries, annotations = [], []
    for index in range(images):
        canvas = np.full((size, size, 3), 128, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        chosen = rng.choice(len(names), size=2, replace=False)
        for slot, c in enumerate(chosen):
            half = size // 2
            x0 = slot * half + int(rng.integers(0, 4))
            y0 = int(rng.integers(4, half))
            box = (x0, y0, x0 + half - 6, y0 + half - 6)
            mask = _shape_mask(list(SHAPES)[c % len(SHAPES)], size, box)
            canvas[mask.astype(bool)] = list(SHAPES.values())[c % len(SHAPES)]
            if slot == 0:  # RLE
                rle = mask_utils.encode(np.asfortranarray(mask))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:  # polygon of the bounding box
                ys, xs = np.nonzero(mask)
                a, b, c2, d = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                segmentation = [[float(a), float(b), float(c2), float(b), float(c2), float(d), float(a), float(d)]]
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": int(c) + 1,
                "segmentation": segmentation, "area": float(mask.sum()),
                "bbox": [float(v) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])],
                "iscrowd": int(index % 7 == 3 and slot == 0),
            })
        name = f"{index:04d}.png"
        Image.fromarray(canvas).save(root / "images" / name)
        image_entries.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": image_entries, "annotations": annotations, "categories": categories}))
    return path


class TinyNet(nn.Module):
    """Two convolutions: 64 px -> (8, 8, 8) features at ``features.3``; a classifier after."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=4, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Filters that are known colour detectors, for end-to-end tests of evaluate.
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220)}


class ColourNet(nn.Module):
    """Filter c is 1 − (distance to concept c's colour), at full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(list(COLOURS.values())).float() / 255)
        self.detect = nn.Identity()

    def forward(self, x):
        distance = (x.unsqueeze(1) - self.colours.view(1, -1, 3, 1, 1)).abs().amax(dim=2)  # (n, C, H, W)
        return self.detect((1 - 10 * distance).clamp_min(0))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_model() -> TargetModel:
    torch.manual_seed(0)
    return TargetModel.from_module(TinyNet(), Preprocessing(resize_size=64, crop_size=64), name="tiny")


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


@pytest.fixture
def targets(tmp_path: Path) -> Path:
    """A folder of plain target images (reuses the generator's pictures)."""
    make_coco(tmp_path / "target-src", images=12, seed=1)
    return tmp_path / "target-src" / "images"


# ---------------------------------------------------------------------------------------
# Shared helpers for the core test suite.


@pytest.fixture
def compute():
    """Fast, in-process settings: no worker processes, no progress bars, small batches."""
    from lavise.settings import ComputeSettings

    return ComputeSettings(device="cpu", batch_size=8, num_workers=0, progress=False)


@pytest.fixture
def coco_maker():
    """``make_coco`` as a fixture, so test modules need not import conftest."""
    return make_coco


@pytest.fixture
def tiny_net_type():
    """The TinyNet class, for tests that build their own variant of the tiny model."""
    return TinyNet


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_model: TargetModel, coco: Path, compute):
    """A run of the tiny model on the generated COCO reference (2 epochs)."""
    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import TrainSettings

    return train(
        tiny_model, "features.3", open_reference(coco), tmp_path / "run",
        settings=TrainSettings(epochs=2), compute=compute, cache_dir=tmp_path / "cache",
    )


# ---------------------------------------------------------------------------------------
# Two groups of images and an explained run, for compare-groups and compare-models.

RED, BLUE = (230, 30, 30), (30, 40, 230)


def draw_disc_scene(path: Path, rng: np.random.Generator, colour) -> None:
    """A noisy grey image with a coloured disc at a random place."""
    canvas = np.full((64, 64, 3), 120, np.uint8) + rng.integers(0, 30, (64, 64, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    cx, cy = rng.integers(14, 50, size=2)
    canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= 100] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


@pytest.fixture
def grouped(tmp_path) -> Path:
    """Group 'reds': 20 images, 16 with a red disc; group 'blues': 20, 16 with a blue disc."""
    rng = np.random.default_rng(0)
    root = tmp_path / "grouped"
    for group, colour in (("reds", RED), ("blues", BLUE)):
        for i in range(20):
            draw_disc_scene(root / group / f"{i:02d}.png", rng, colour if i < 16 else (120, 120, 120))
    return root


@pytest.fixture
def explained(tiny_run, tiny_model, grouped, compute, tmp_path):
    from lavise.explain import explain
    from lavise.settings import ExplainSettings

    explain(tiny_run, grouped, settings=ExplainSettings(top_images=5, vocabulary_size=500), compute=compute,
            model=tiny_model, cache_dir=tmp_path / "cache")
    return tiny_run




def pytest_configure(config):
    # pycocotools' mask decoder trips a NumPy 2 deprecation on every mask; it is not ours.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


# ---------------------------------------------------------------------------------------
# Several processes on Gloo, as torchrun would start them.


def free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch_ranks(arguments: list[str], *, world: int = 2, timeout: float = 240, env: dict | None = None) -> list:
    """Run ``python ARGUMENTS`` as ``world`` ranks of one process group (the variables torchrun
    sets); the completed processes, rank by rank. A hang fails the test instead of the suite."""
    import os
    import subprocess
    import sys

    port = str(free_port())
    processes = []
    for rank in range(world):
        variables = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                     "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                     "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, *arguments], env=variables, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise AssertionError(f"a rank did not finish within {timeout} s (a hang?)") from None
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results
