"""Tests of the planted-concept scene generator (lavise.synthetic)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lavise.errors import LaviseError
from lavise.synthetic import (
    OPENMOJI_ATTRIBUTION,
    Concept,
    SceneSettings,
    concept_pool,
    generate_scenes,
    render_concept,
)
from lavise.synthetic.concepts import EXCLUDED_NAME_WORDS, concept_word

# pycocotools' decode trips a NumPy 2 deprecation; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = SceneSettings(image_size=96, num_images=12, num_concepts=20, seed=3)
# Plain backgrounds only, crowded and large so that occlusion and drops happen.
PLAIN = SceneSettings(
    image_size=96,
    num_images=16,
    concepts_per_image=(3, 6),
    num_concepts=15,
    scale=(0.3, 0.8),
    backgrounds=("plain",),
    seed=11,
)


def _generate(path: Path, settings: SceneSettings, **kwargs) -> Path:
    return generate_scenes(path, settings, progress=False, **kwargs)


def _load_coco(out: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out / "annotations.json"))


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def plain_scenes(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("plain"), PLAIN, part="evaluation")


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("reference"), SMALL, part="reference")


@pytest.fixture(scope="module")
def small_evaluation(tmp_path_factory) -> Path:
    settings = SceneSettings(**{**SMALL.to_dict(), "num_images": 40})
    return _generate(tmp_path_factory.mktemp("evaluation"), settings, part="evaluation")


# --- concept pool -----------------------------------------------------------------------


def test_concept_word_rule() -> None:
    assert concept_word("DOG") == "dog"
    assert concept_word("RACING CAR") == "car"
    assert concept_word("HIGH-HEELED SHOE") == "shoe"
    assert concept_word("BOWLING") == "bowling"  # a one-word name may end in -ing
    for rejected in (
        "SLICE OF PIZZA",  # prepositional: the last word is not the whole object
        "FORK AND KNIFE",
        "DOG FACE",
        "GRINNING FACE WITH SMILING EYES",
        "WAVING WHITE FLAG",
        "REGIONAL INDICATOR SYMBOL LETTER A",
        "EMOJI MODIFIER FITZPATRICK TYPE-1-2",
        "NO BICYCLES",
        "HORSE RACING",  # participle
        "HEAVY MULTIPLICATION X",  # one letter
        "SQUARED CJK UNIFIED IDEOGRAPH-7121",
    ):
        assert concept_word(rejected) is None, rejected


def test_pool_follows_the_rule() -> None:
    pool = concept_pool()
    assert len(pool) > 300
    words = [c.word for c in pool]
    assert words == sorted(words) and len(set(words)) == len(words)
    for concept in pool:
        assert isinstance(concept, Concept)
        assert re.fullmatch(r"[a-z]{2,}", concept.word), concept
        assert 0x1F300 <= concept.codepoint <= 0x1FAFF, concept
        char = chr(concept.codepoint)
        assert unicodedata.category(char) == "So"
        assert unicodedata.name(char) == concept.name
        assert not EXCLUDED_NAME_WORDS.intersection(concept.name.split()), concept
        assert concept.word == concept.name.split()[-1].lower()
        assert not 0x1F1E6 <= concept.codepoint <= 0x1F1FF  # regional indicators (flags)
        assert not 0x1F3FB <= concept.codepoint <= 0x1F3FF  # skin-tone modifiers
        assert "FLAG" not in concept.name and "KEYCAP" not in concept.name
    by_word = {c.word: c for c in pool}
    assert by_word["dog"] == Concept("dog", 0x1F415, "DOG")  # not HOT DOG or GUIDE DOG
    assert "face" not in by_word
    assert concept_pool() == pool  # deterministic


def test_pool_allowed_words_and_limit() -> None:
    pool = concept_pool(["cat", "dog", "pizza", "zzzz", "cat"])
    assert [c.word for c in pool] == ["cat", "dog"]
    assert concept_pool(limit=5) == concept_pool()[:5]
    assert concept_pool(set(), limit=3) == []
    with pytest.raises(LaviseError, match="allowed_words"):
        concept_pool("dog")
    with pytest.raises(LaviseError, match="limit"):
        concept_pool(limit=0)


def test_render_concept_is_cropped_rgba() -> None:
    pool = concept_pool()
    for concept in pool[:: len(pool) // 12]:
        for size in (17, 64, 150):
            image = render_concept(concept, size)
            assert image.mode == "RGBA"
            assert abs(max(image.size) - size) <= 2, (concept, size, image.size)
            alpha = np.asarray(image)[..., 3]
            # cropped: every border row and column touches the glyph
            for edge in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
                assert edge.any()
            assert (alpha == 255).any()
    with pytest.raises(LaviseError, match="size_px"):
        render_concept(pool[0], 0)


def test_attribution() -> None:
    assert "OpenMoji" in OPENMOJI_ATTRIBUTION and "CC BY-SA 4.0" in OPENMOJI_ATTRIBUTION


# --- determinism and caching ------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_reference) -> None:
    again = _files(_generate(tmp_path / "again", SMALL))
    first = _files(small_reference)
    assert again.keys() == first.keys()
    assert len([k for k in first if k.startswith("images/")]) == SMALL.num_images
    for name in first:
        assert again[name] == first[name], name
    other_settings = SceneSettings(**{**SMALL.to_dict(), "seed": SMALL.seed + 1})
    other = _files(_generate(tmp_path / "other", other_settings))
    assert other["annotations.json"] != first["annotations.json"]
    assert all(other[k] != first[k] for k in first if k.startswith("images/"))


def test_second_call_is_a_no_op_and_other_settings_are_refused(tmp_path) -> None:
    settings = SceneSettings(**{**SMALL.to_dict(), "num_images": 3})
    out = _generate(tmp_path / "scenes", settings)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    os.utime(out / "annotations.json", ns=(1, 1))  # a rewrite would change this
    assert _generate(tmp_path / "scenes", settings) == out
    assert (out / "annotations.json").stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "annotations.json")
    assert not [p for p in out.rglob("*.tmp")]

    (out / "images" / "000001.png").unlink()  # incomplete: generated again
    _generate(tmp_path / "scenes", settings)
    assert (out / "images" / "000001.png").is_file()

    changed = SceneSettings(**{**settings.to_dict(), "seed": 99})
    with pytest.raises(LaviseError, match="settings.seed"):
        _generate(tmp_path / "scenes", changed)
    with pytest.raises(LaviseError, match="part"):
        _generate(tmp_path / "scenes", settings, part="evaluation")


# --- COCO validity ----------------------------------------------------------------------


def test_coco_file_is_valid(small_evaluation) -> None:
    coco = _load_coco(small_evaluation)
    data = json.loads((small_evaluation / "annotations.json").read_text())
    assert data["annotations"], "no instances generated"
    category_names = {c["id"]: c["name"] for c in data["categories"]}
    for info in data["images"]:
        with Image.open(small_evaluation / "images" / info["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        masks = []
        seen_categories = set()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            assert ann["category_id"] in category_names
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann)
            assert mask.shape == (info["height"], info["width"])
            assert np.array_equal(mask, mask_utils.decode(ann["segmentation"]))
            assert ann["area"] == int(mask.sum()) == int(mask_utils.area(ann["segmentation"]))
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == [float(v) for v in box]
            assert ann["category_id"] not in seen_categories  # one instance per concept
            seen_categories.add(ann["category_id"])
            masks.append(mask.astype(bool))
        if masks:
            assert np.stack(masks).sum(axis=0).max() <= 1  # occlusion applied: disjoint


def test_lavise_coco_reader_accepts_it(small_reference) -> None:
    from lavise.datasets.coco import CocoDataset

    dataset = CocoDataset(small_reference / "annotations.json", small_reference / "images")
    assert len(dataset) > 0
    concepts, masks = dataset.masks(0, (SMALL.image_size, SMALL.image_size))
    assert masks.shape[1:] == (SMALL.image_size, SMALL.image_size) and len(concepts) >= 1


# --- mask correctness -------------------------------------------------------------------


def _placed_layers(out: Path, image_id: int, coco: COCO, concepts: dict[int, dict]):
    """Re-render each kept instance of an image: [(mask, alpha (S,S) float, rgb (S,S,3))]."""
    layers = []
    size = coco.imgs[image_id]["height"]
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        place = ann["lavise_placement"]
        info = concepts[ann["category_id"]]
        glyph = render_concept(Concept(info["word"], info["codepoint"], info["name"]), place["size_px"])
        rgba = np.asarray(glyph)
        assert rgba.shape[:2] == (place["height"], place["width"])
        alpha = np.zeros((size, size))
        rgb = np.zeros((size, size, 3))
        y, x = place["y"], place["x"]
        alpha[y : y + rgba.shape[0], x : x + rgba.shape[1]] = rgba[..., 3] / 255
        rgb[y : y + rgba.shape[0], x : x + rgba.shape[1]] = rgba[..., :3]
        layers.append((coco.annToMask(ann).astype(bool), alpha, rgb, place["layer"]))
    assert [layer[3] for layer in layers] == sorted(layer[3] for layer in layers)
    return layers


def test_masks_are_exactly_the_visible_pixels(plain_scenes) -> None:
    coco = _load_coco(plain_scenes)
    split = json.loads((plain_scenes / "split.json").read_text())
    concepts = {c["id"]: c for c in split["concepts"]}
    for image_id, info in coco.imgs.items():
        image = np.asarray(Image.open(plain_scenes / "images" / info["file_name"])).astype(int)
        background = np.array(info["lavise_background"]["color"])
        layers = _placed_layers(plain_scenes, image_id, coco, concepts)
        covered = np.zeros(image.shape[:2], dtype=bool)
        for mask, alpha, rgb, _ in layers:
            assert not (mask & (alpha <= 0.5)).any()  # a mask lies inside its glyph
            covered |= alpha > 0
        # outside every kept glyph: exactly the background (hidden instances not drawn)
        assert (image[~covered] == background).all()
        # the top-most opaque glyph at a pixel shows its exact colour, and owns the pixel
        owner = np.full(image.shape[:2], -1)
        for k, (_, alpha, _, _) in enumerate(layers):
            owner[alpha == 1.0] = k
            owner[(alpha > 0) & (alpha < 1.0)] = -1
        for k, (mask, alpha, rgb, _) in enumerate(layers):
            top = owner == k
            assert (image[top] == rgb[top]).all()
            assert mask[top].all()
        # the masks are where more than half of the colour comes from the glyph
        above = np.ones(image.shape[:2])
        for mask, alpha, _, _ in reversed(layers):
            assert np.array_equal(mask, alpha * above > 0.5)
            above = above * (1 - alpha)
        # an independent composite (Pillow) matches up to rounding
        canvas = Image.new("RGBA", image.shape[1::-1], tuple(int(c) for c in background) + (255,))
        for _, alpha, rgb, _ in layers:
            rgba = np.dstack([rgb, np.round(alpha * 255)]).astype(np.uint8)
            canvas = Image.alpha_composite(canvas, Image.fromarray(rgba, "RGBA"))
        assert np.abs(np.asarray(canvas)[..., :3].astype(int) - image).max() <= 2


def test_hidden_instances_are_dropped_and_counted(plain_scenes) -> None:
    record = json.loads((plain_scenes / "scenes.json").read_text())
    summary = record["summary"]
    assert summary["dropped_hidden_instances"] > 0
    coco = _load_coco(plain_scenes)
    assert summary["instances"] == len(coco.anns)
    assert sum(summary["instances_per_concept"].values()) == len(coco.anns)
    split = json.loads((plain_scenes / "split.json").read_text())
    concepts = {c["id"]: c for c in split["concepts"]}
    for image_id in coco.imgs:
        for mask, alpha, _, _ in _placed_layers(plain_scenes, image_id, coco, concepts):
            assert mask.sum() >= PLAIN.min_visible_area
            assert mask.sum() >= PLAIN.min_visible_fraction * (alpha > 0.5).sum()
    assert record["attribution"][0] == OPENMOJI_ATTRIBUTION
    assert record["settings"] == json.loads(json.dumps(PLAIN.to_dict()))


def test_texture_backgrounds_are_concepts(tmp_path) -> None:
    settings = SceneSettings(
        image_size=64,
        num_images=6,
        concepts_per_image=(1, 2),
        num_concepts=10,
        unseen_fraction=0.0,
        scale=(0.2, 0.4),
        backgrounds=("texture",),
        texture_area=(1.0, 1.0),
    )
    out = _generate(tmp_path / "textures", settings)
    coco = _load_coco(out)
    texture_ids = {c["id"] for c in coco.cats.values() if c["supercategory"] == "texture"}
    assert {coco.cats[i]["name"] for i in texture_ids} == {"brick", "grass", "gravel"}
    for image_id, info in coco.imgs.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        textures = [a for a in anns if a["category_id"] in texture_ids]
        assert len(textures) == 1 and textures[0]["lavise_placement"]["width"] == 64
        assert coco.cats[textures[0]["category_id"]]["name"] == info["lavise_background"]["texture"]
        union = np.stack([coco.annToMask(a) for a in anns]).sum(axis=0)
        assert union.max() == 1 and union.mean() > 0.9  # only glyph edges are unowned


def test_plain_backgrounds_are_colour_concepts_under_the_other_layers(tmp_path) -> None:
    from lavise.synthetic.backgrounds import COLOUR_PROTOTYPES, colour_names

    settings = SceneSettings(image_size=64, num_images=12, concepts_per_image=(1, 3), num_concepts=10,
                             unseen_fraction=0.3, scale=(0.2, 0.5), backgrounds=("plain", "photo"),
                             background_concepts=True, seed=3)
    out = _generate(tmp_path / "colours", settings, part="reference")
    split = json.loads((out / "split.json").read_text())
    colours = {c["word"] for c in split["concepts"] if c["source"] == "colour"}
    assert colours == set(COLOUR_PROTOTYPES) and len(split["concepts"]) == 10 + 11
    assert not colours & set(split["unseen"]) and len(split["unseen"]) == 3  # colours are always seen; 30 % of the rest
    coco = _load_coco(out)
    photos = 0
    for image_id, info in coco.imgs.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        background = [a for a in anns if coco.cats[a["category_id"]]["supercategory"] == "colour"]
        if info["lavise_background"]["kind"] == "photo":
            photos += 1
            assert background == [] and "colour" not in info["lavise_background"]
            continue
        name = info["lavise_background"]["colour"]
        assert name not in split["unseen"]  # the reference part draws only seen colours
        assert colour_names(np.array([info["lavise_background"]["color"]], dtype=np.uint8))[0] == name
        [mask] = [coco.annToMask(a).astype(bool) for a in background]
        assert coco.cats[background[0]["category_id"]]["name"] == name
        others = [coco.annToMask(a).astype(bool) for a in anns if a is not background[0]]
        covered = np.any(others, axis=0) if others else np.zeros_like(mask)
        assert not (mask & covered).any()  # under the emoji, the background is not visible
        image = np.asarray(Image.open(out / "images" / info["file_name"]))
        plain = (image[mask] == info["lavise_background"]["color"]).all(axis=1)
        assert plain.mean() > 0.9  # its mask: the background left visible (glyph edges blend into it)
        assert mask.mean() > 0.2
    assert 0 < photos < 12
    # off by default, and then absent from the recorded settings: earlier scenes keep their key
    assert "background_concepts" not in SceneSettings().to_dict()


# --- seen / unseen split ----------------------------------------------------------------


def test_reference_holds_no_unseen_concept(small_reference, small_evaluation) -> None:
    split = json.loads((small_reference / "split.json").read_text())
    assert (small_evaluation / "split.json").read_bytes() == (small_reference / "split.json").read_bytes()
    seen, unseen = set(split["seen"]), set(split["unseen"])
    words = [c["word"] for c in split["concepts"]]
    assert len(words) == SMALL.num_concepts + 3  # emoji and the three textures
    assert len(split["unseen"]) == len(unseen) == round(SMALL.unseen_fraction * len(words))
    assert seen.isdisjoint(unseen) and seen | unseen == set(words)

    reference = _load_coco(small_reference)
    assert {c["name"] for c in reference.cats.values()} <= seen
    used = {reference.cats[a["category_id"]]["name"] for a in reference.anns.values()}
    assert used and used <= seen

    evaluation = _load_coco(small_evaluation)
    used = {evaluation.cats[a["category_id"]]["name"] for a in evaluation.anns.values()}
    assert used & unseen, "evaluation scenes should show unseen concepts"
    ids = {c["name"]: c["id"] for c in evaluation.cats.values()}
    assert all(ids[c["name"]] == c["id"] for c in reference.cats.values())
    first = "images/000000.png"
    assert (small_reference / first).read_bytes() != (small_evaluation / first).read_bytes()


def test_split_depends_on_seed_only(tmp_path) -> None:
    def unseen(seed: int, images: int) -> list[str]:
        settings = SceneSettings(**{**SMALL.to_dict(), "seed": seed, "num_images": images})
        out = _generate(tmp_path / f"s{seed}-{images}", settings, allowed_words=None)
        return json.loads((out / "split.json").read_text())["unseen"]

    assert unseen(5, 1) == unseen(5, 2)
    assert unseen(5, 1) != unseen(6, 1)


def test_allowed_words_restrict_the_concepts(tmp_path) -> None:
    allowed = {"apple", "banana", "cat", "dog", "grass", "tree", "car", "pig"}
    settings = SceneSettings(**{**SMALL.to_dict(), "num_concepts": 6, "num_images": 4})
    out = _generate(tmp_path / "allowed", settings, allowed_words=allowed, part="evaluation")
    split = json.loads((out / "split.json").read_text())
    assert {c["word"] for c in split["concepts"]} <= allowed
    assert "grass" in split["seen"] + split["unseen"]
    with pytest.raises(LaviseError, match="num_concepts"):
        _generate(tmp_path / "too-many", SceneSettings(num_concepts=8), allowed_words=allowed)


# --- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 0),
        ("num_images", 0),
        ("concepts_per_image", (3, 2)),
        ("concepts_per_image", (0, 2)),
        ("num_concepts", 0),
        ("unseen_fraction", 1.0),
        ("seed", -1),
        ("scale", (0.0, 0.5)),
        ("scale", (0.5, 1.5)),
        ("backgrounds", ("sky",)),
        ("backgrounds", ()),
        ("texture_area", (0.5, 0.2)),
        ("min_visible_area", 0),
        ("min_visible_fraction", 2.0),
        ("texture_concepts", "yes"),
    ],
)
def test_bad_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(LaviseError, match=field):
        SceneSettings(**{field: value})


def test_bad_generate_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(LaviseError, match="part"):
        generate_scenes(tmp_path / "x", SMALL, part="train", progress=False)
    with pytest.raises(LaviseError, match="allowed_words"):
        generate_scenes(tmp_path / "x", SMALL, allowed_words="dog", progress=False)
    with pytest.raises(LaviseError, match="settings"):
        generate_scenes(tmp_path / "x", {"seed": 1}, progress=False)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("")
    with pytest.raises(LaviseError, match="out_dir"):
        generate_scenes(tmp_path / "file", SMALL, progress=False)
    assert SceneSettings.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    numpy_numbers = SceneSettings(seed=np.int64(3), scale=(np.float32(0.25), 1), concepts_per_image=[1, 2])
    assert numpy_numbers == SceneSettings(seed=3, scale=(0.25, 1.0), concepts_per_image=(1, 2))
    assert json.dumps(numpy_numbers.to_dict())
