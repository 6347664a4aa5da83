"""Pasting concept layers on a background, with exact visible masks.

Each layer is an RGBA patch pasted in order, so that later ones occlude earlier ones.
Because every pixel's colour is a known mix of the layers, the masks are exact:

    weight of layer k at a pixel = alpha_k * prod_{j > k} (1 - alpha_j)

and the mask of layer k is where that weight exceeds 1/2, i.e. where more than half of
the pixel's colour comes from the concept. Masks of one image never overlap. Layers
left with too little visible area are not drawn at all (so that no unlabelled concept
is visible). Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lavise.settings import SceneSettings

VISIBLE_WEIGHT = 0.5  # a pixel belongs to a layer when more than this share of it is that layer


@dataclass(frozen=True)
class SceneConcept:
    """A concept as used in scenes: an OpenMoji emoji or a scikit-image texture.

    Attributes:
        word: the category name.
        source: ``"openmoji"``, ``"texture"`` or ``"colour"`` (a plain background).
        codepoint: the emoji's codepoint (emoji only).
        name: the Unicode name (emoji) or the skimage.data function name (texture).
    """

    word: str
    source: str
    codepoint: int | None = None
    name: str = ""

    def to_dict(self) -> dict:
        return {"word": self.word, "source": self.source, "codepoint": self.codepoint, "name": self.name}


@dataclass
class Layer:
    """One pasted concept instance.

    Attributes:
        rgba: (h, w, 4) uint8 patch; its alpha is the instance's coverage.
        x, y: top-left corner of the patch in the image.
        concept: what it depicts.
        placement: how to redraw it, stored in the annotation.
    """

    rgba: np.ndarray
    x: int
    y: int
    concept: SceneConcept
    placement: dict = field(default_factory=dict)


def compose(
    background: np.ndarray, layers: Sequence[Layer], settings: SceneSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste layers in order, drop hidden ones, and compute the visible masks.

    Args:
        background: (S, S, 3) uint8 image under all layers.
        layers: bottom to top.
        settings: for ``min_visible_area`` and ``min_visible_fraction``.

    Returns:
        (image (S, S, 3) uint8, masks (K, S, S) bool of the K kept layers in order,
        keep (L,) bool). A dropped layer is not drawn.
    """
    size = background.shape[0]
    alphas = layer_alphas(layers, size)  # (L, S, S)
    masks = visible_masks(alphas)
    own = (alphas > VISIBLE_WEIGHT).sum(axis=(1, 2))
    visible = masks.sum(axis=(1, 2))
    keep = (visible >= settings.min_visible_area) & (visible >= settings.min_visible_fraction * own)
    # Dropping a layer only uncovers the layers below it, so the kept ones stay above
    # the thresholds and one pass is enough.
    masks = visible_masks(alphas[keep])
    image = blend(background, [layer for layer, k in zip(layers, keep) if k])
    return image, masks, keep


def layer_alphas(layers: Sequence[Layer], size: int) -> np.ndarray:
    """(L, S, S) float64 coverage in [0, 1] of each layer on the S x S canvas."""
    alphas = np.zeros((len(layers), size, size), dtype=np.float64)
    for k, layer in enumerate(layers):
        h, w = layer.rgba.shape[:2]
        alphas[k, layer.y : layer.y + h, layer.x : layer.x + w] = layer.rgba[..., 3] / 255.0
    return alphas


def visible_masks(alphas: np.ndarray) -> np.ndarray:
    """(L, S, S) bool: where more than half of a pixel's colour comes from each layer.

    Args:
        alphas: (L, S, S) coverage of each layer, bottom to top.
    """
    if len(alphas) == 0:
        return np.zeros(alphas.shape, dtype=bool)
    above = np.ones_like(alphas)  # above[k] = prod_{j > k} (1 - alpha_j)
    for k in range(len(alphas) - 2, -1, -1):
        above[k] = above[k + 1] * (1.0 - alphas[k + 1])
    return alphas * above > VISIBLE_WEIGHT


def blend(background: np.ndarray, layers: Sequence[Layer]) -> np.ndarray:
    """Alpha-composite layers (bottom to top) over a background; (S, S, 3) uint8."""
    canvas = background.astype(np.float64)
    for layer in layers:
        h, w = layer.rgba.shape[:2]
        region = canvas[layer.y : layer.y + h, layer.x : layer.x + w]  # (h, w, 3) view
        alpha = layer.rgba[..., 3:4] / 255.0  # (h, w, 1)
        region *= 1.0 - alpha
        region += alpha * layer.rgba[..., :3]
    return np.clip(np.floor(canvas + 0.5), 0, 255).astype(np.uint8)
