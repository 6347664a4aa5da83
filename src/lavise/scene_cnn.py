"""A small CNN trained on planted-concept scenes: a target whose filters carry known concepts.

It learns which concepts a scene contains (multi-label), so its last convolutional
layer must represent them. The demo trains it in about a minute on two CPU cores and
explains it next to an ImageNet model. As a target model it is the backbone only
(``features``): LaViSE never computes anything after the explained layer, so the
classifier is kept apart and the checkpoint holds the backbone's weights.

Layers: ``features.2``, ``.5``, ``.8``, ``.11`` are the ReLU outputs (32×56×56,
64×28×28, 128×14×14, 256×14×14 at the 112-pixel input); ``features.11`` is the
default layer to explain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lavise.datasets.base import BadImage, load_rgb
from lavise.datasets.coco import CocoDataset
from lavise.errors import LaviseError
from lavise.models import Preprocessing

PREPROCESSING = Preprocessing(resize_size=112, crop_size=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
DEFAULT_LAYER = "features.11"


def backbone() -> nn.Sequential:
    """Four conv-BN-ReLU blocks: (3, 112, 112) -> (256, 14, 14)."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 128, 2), *block(128, 256, 1))


class SceneBackbone(nn.Module):
    """The target model: layer paths are ``features.N``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = backbone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class SceneCNN(SceneBackbone):
    """Backbone plus a linear multi-label classifier over globally pooled features."""

    def __init__(self, num_concepts: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(256, num_concepts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean(dim=(2, 3)))


def build_scene_cnn(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    """The backbone as a target model; its weights come from ``--checkpoint``."""
    if weights is not None:
        raise LaviseError(
            f"Model 'scene_cnn' has no named weights (got '{weights}'); pass the file that "
            "'lavise demo' wrote with --checkpoint."
        )
    return SceneBackbone(), PREPROCESSING


def _load_scenes(dataset: CocoDataset, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All scenes as uint8 (N, 3, 112, 112) and their (N, C) concept-presence labels."""
    images, labels = [], []
    for index in tqdm(range(len(dataset)), desc="loading scenes", unit="img", disable=not progress):
        try:
            image = load_rgb(dataset.image_path(index))
        except BadImage:
            continue
        image = image.resize((PREPROCESSING.crop_size, PREPROCESSING.crop_size))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        row = torch.zeros(len(dataset.concepts))
        row[dataset.image_concepts(index)] = 1
        labels.append(row)
    return torch.stack(images), torch.stack(labels)


def train_scene_cnn(
    dataset: CocoDataset,
    out_path: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> dict:
    """Train on a scene dataset; save the backbone's state_dict to ``out_path``.

    Returns training facts (epochs, final loss, mean per-concept accuracy on the
    training scenes) for the run's record.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = _load_scenes(dataset, progress)
    model = SceneCNN(labels.shape[1]).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(images) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    mean = torch.tensor(PREPROCESSING.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESSING.std).view(1, 3, 1, 1)

    def batch(rows: torch.Tensor, flip: bool) -> torch.Tensor:
        x = (images[rows].float() / 255 - mean) / std
        if flip:
            x = torch.where(torch.rand(len(rows), 1, 1, 1, generator=generator) < 0.5, x.flip(3), x)
        return x.to(device)

    bar = tqdm(range(epochs), desc="training scene CNN", unit="epoch", disable=not progress)
    loss_value = float("nan")
    for _ in bar:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            if len(rows) < 2:
                continue
            loss = F.binary_cross_entropy_with_logits(model(batch(rows, True)), labels[rows].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(batch(torch.arange(s, min(s + 256, len(images))), False)).cpu() for s in range(0, len(images), 256)])
    accuracy = float(((predicted > 0) == labels.bool()).float().mean())
    from lavise.storage import atomic_path

    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    with atomic_path(Path(out_path)) as tmp:
        torch.save(state, tmp)
    return {"epochs": epochs, "final_loss": loss_value, "train_label_accuracy": accuracy, "seed": seed}
