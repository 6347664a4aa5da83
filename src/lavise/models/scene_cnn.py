"""A small CNN for planted-concept scenes: a target whose filters carry known concepts.

The demos train it (:mod:`lavise.demos.scene_training`): to tell which concepts a scene
contains, or to tell groups of scenes apart from their group labels alone. As a target
model it is the backbone only (``features``): LaViSE never computes anything after the
explained layer, so the classifier is kept apart and the checkpoint holds the
backbone's weights.

Layers: ``features.2``, ``.5``, ``.8``, ``.11`` are the ReLU outputs (32×56×56,
64×28×28, 128×14×14, 256×14×14 at the 112-pixel input); ``features.11`` is the
default layer to explain.
"""

from __future__ import annotations

import torch
from torch import nn

from lavise.errors import LaviseError
from lavise.models.preprocessing import Preprocessing

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
    """Backbone plus a linear classifier over globally pooled features (one logit per output).

    ``pooling`` is "mean" (average over positions) or "max" (each filter's peak: whether
    something is anywhere in the scene, the quantity LaViSE thresholds).
    """

    def __init__(self, num_outputs: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise LaviseError(f"pooling must be 'mean' or 'max', not {pooling!r}.")
        self.pooling = pooling
        self.classifier = nn.Linear(256, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images)
        pooled = maps.amax(dim=(2, 3)) if self.pooling == "max" else maps.mean(dim=(2, 3))
        return self.classifier(pooled)


def build_scene_cnn(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    """The backbone as a target model; its weights come from ``--checkpoint``."""
    if weights is not None:
        raise LaviseError(
            f"Model 'scene_cnn' has no named weights (got '{weights}'); pass the file that "
            "'lavise demo' wrote with --checkpoint."
        )
    return SceneBackbone(), PREPROCESSING
