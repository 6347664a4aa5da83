"""A small vision transformer for planted-concept scenes: the transformer counterpart of the scene CNN.

timm's ``VisionTransformer`` at the scene CNN's input (112 pixels) with 8-pixel patches,
so its blocks give a 14×14 grid of patch tokens — the grid of the scene CNN's
``features.11`` — after one class token: ``(N, 1 + 196, 192)``. Four blocks of width
192 (3 heads); the classifier pools the patch tokens (``global_pool="avg"``), so what a
scene holds must be carried by its patches, the tokens LaViSE reads. Trained by
:func:`lavise.demos.scene_training.train_scene_vit`; the checkpoint holds every weight
but the classifier, loadable as ``ModelSpec("scene_vit", None, path)``.

Layers to explain: ``blocks.0`` … ``blocks.3`` (192 filters on 14×14 each).
"""

from __future__ import annotations

from torch import nn

from lavise.errors import LaviseError
from lavise.models.preprocessing import Preprocessing
from lavise.models.scene_cnn import PREPROCESSING

DEFAULT_LAYER = "blocks.3"


def scene_vit(num_outputs: int = 0) -> nn.Module:
    """The network; ``num_outputs`` 0: no classifier (the target model)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=PREPROCESSING.crop_size, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                             mlp_ratio=4.0, num_classes=num_outputs, global_pool="avg", class_token=True)


def build_scene_vit(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    """The transformer as a target model; its weights come from ``--checkpoint``."""
    if weights is not None:
        raise LaviseError(
            f"Model 'scene_vit' has no named weights (got '{weights}'); pass the file that "
            "train_scene_vit wrote with --checkpoint."
        )
    return scene_vit(), PREPROCESSING
