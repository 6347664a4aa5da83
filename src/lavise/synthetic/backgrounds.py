"""Scene backgrounds from scikit-image's bundled data: tinted textures and photographs.

Textures ("brick", "grass", "gravel") are grey images tinted to a mean colour and cut
into rectangles; photographs were chosen to show nothing that is an emoji concept. All
of it ships with scikit-image (no download).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from lavise.errors import LaviseError
from lavise.settings import SceneSettings
from lavise.synthetic.compose import Layer, SceneConcept

# scikit-image textures (grey) and the mean colour each is tinted to.
TEXTURE_TINTS = {"brick": (185, 95, 70), "grass": (95, 160, 60), "gravel": (150, 145, 135)}
# Broden's 11 colour names and a prototype of each (sRGB); a background is named by the
# prototype nearest its colour in CIELAB.
COLOUR_PROTOTYPES = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (139, 69, 19), "green": (0, 128, 0), "grey": (128, 128, 128),
    "orange": (255, 140, 0), "pink": (255, 105, 180), "purple": (128, 0, 128), "red": (255, 0, 0),
    "white": (255, 255, 255), "yellow": (255, 255, 0),
}  # fmt: skip
COLOUR_DRAWS = 512  # candidate colours drawn at once when a background must have a given colour name
# scikit-image photographs bundled with the package (no download), showing no concept.
PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry")
SKIMAGE_ATTRIBUTION = "Backgrounds: scikit-image sample data (skimage.data); see its licences"


def texture_layer(rng: np.random.Generator, name: str, settings: SceneSettings) -> Layer:
    """A tinted texture rectangle covering a random share of the image."""
    size = settings.image_size
    area = rng.uniform(*settings.texture_area)
    low, high = max(np.log(0.5), np.log(area)), min(np.log(2.0), -np.log(area))
    ratio = float(np.exp(rng.uniform(low, high))) if high > low else 1.0
    w = int(np.clip(round(size * np.sqrt(area * ratio)), 1, size))
    h = int(np.clip(round(size * np.sqrt(area / ratio)), 1, size))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    texture = _texture(name)  # (T, T, 3) uint8
    zoom = min(rng.uniform(1.0, 2.0), texture.shape[0] / max(w, h))
    cw, ch = max(1, round(w * zoom)), max(1, round(h * zoom))
    tx = int(rng.integers(0, texture.shape[1] - cw + 1))
    ty = int(rng.integers(0, texture.shape[0] - ch + 1))
    patch = Image.fromarray(texture[ty : ty + ch, tx : tx + cw]).resize((w, h), Image.Resampling.BILINEAR)
    rgba = np.concatenate([np.asarray(patch), np.full((h, w, 1), 255, dtype=np.uint8)], axis=2)
    concept = SceneConcept(word=name, source="texture", name=name)
    placement = {"layer": 0, "texture": name, "x": x, "y": y, "width": w, "height": h}
    return Layer(rgba=rgba, x=x, y=y, concept=concept, placement=placement)


def colour_names(rgb: np.ndarray) -> np.ndarray:
    """The colour name nearest each colour in CIELAB, of :data:`COLOUR_PROTOTYPES`.

    (n, 3) uint8 -> (n,) names

    Example:
        >>> colour_names(np.array([[250, 10, 5], [20, 20, 20], [240, 0, 250]], dtype=np.uint8)).tolist()
        ['red', 'black', 'purple']
    """
    from skimage.color import rgb2lab

    names = list(COLOUR_PROTOTYPES)
    prototypes = rgb2lab(np.array([COLOUR_PROTOTYPES[n] for n in names], dtype=np.float64)[None] / 255)[0]
    lab = rgb2lab(np.asarray(rgb, dtype=np.float64)[None] / 255)[0]
    distances = ((lab[:, None, :] - prototypes[None]) ** 2).sum(axis=2)
    return np.array(names)[distances.argmin(axis=1)]


def colour_of_name(rng: np.random.Generator, name: str) -> np.ndarray:
    """A random colour whose name is ``name``: the first of :data:`COLOUR_DRAWS` uniform draws
    that has it, else the name's prototype. (3,) uint8"""
    candidates = rng.integers(0, 256, size=(COLOUR_DRAWS, 3)).astype(np.uint8)
    hits = np.nonzero(colour_names(candidates) == name)[0]
    return candidates[hits[0]] if len(hits) else np.array(COLOUR_PROTOTYPES[name], dtype=np.uint8)


def photo_crop(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A random square crop of a photograph, resized to (size, size, 3) uint8."""
    photo = _photo(name)
    side_max = min(photo.shape[:2])
    side = int(rng.integers(side_max // 2, side_max + 1))
    x = int(rng.integers(0, photo.shape[1] - side + 1))
    y = int(rng.integers(0, photo.shape[0] - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """A scikit-image grey texture tinted to its mean colour; (T, T, 3) uint8."""
    grey = _skimage_data(name).astype(np.float64)
    tint = np.asarray(TEXTURE_TINTS[name], dtype=np.float64)
    rgb = np.clip(np.floor(grey[..., None] / grey.mean() * tint + 0.5), 0, 255).astype(np.uint8)
    rgb.setflags(write=False)
    return rgb


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    photo = np.ascontiguousarray(_skimage_data(name)[..., :3])
    photo.setflags(write=False)
    return photo


def _skimage_data(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise LaviseError(
            "Texture and photo backgrounds need scikit-image: 'pip install scikit-image', "
            "or set SceneSettings.backgrounds=('plain',)."
        ) from None
    try:
        return np.asarray(getattr(skimage.data, name)())
    except Exception as error:  # a missing optional download, a renamed image
        raise LaviseError(
            f"scikit-image's sample image '{name}' cannot be loaded ({error}); remove its "
            "background kind from SceneSettings.backgrounds."
        ) from None
