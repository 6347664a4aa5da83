"""Broden reader: RG-encoded label maps, half-size maps, image-level labels, categories, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise.datasets import BrodenDataset, load_rgb, open_reference
from lavise.datasets.broden import label_masks
from lavise.errors import LaviseError
from lavise.reference import reference_rows as reference_features
from lavise.settings import ComputeSettings, ReferenceSettings

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
# number: (name, categories as label.csv writes them)
LABELS = {
    1: ("sky", "object(2)"),
    2: ("person", "object(2)"),
    3: ("head", "part(1)"),
    4: ("hand", "part(1)"),
    5: ("fabric", "material(1);object(1)"),
    6: ("red-c", "color(1)"),
    7: ("street-s", "scene(1)"),
    8: ("street", "object(1)"),
    9: ("banded", "texture(1)"),
    300: ("wood", "material(1)"),  # above 255: needs the green channel
}


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _encode(labels: np.ndarray) -> Image.Image:
    """Broden's encoding: label number = R + 256 * G."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb)


def write_broden(root: Path, images: list[dict], *, labels=LABELS, categories=CATEGORIES, drop_column=None) -> Path:
    """Write a Broden folder as NetDissect's broden1_224 lays it out.

    Each image: ``name`` (under images/), ``size`` (W, H), ``maps`` {category: [(h, w) label
    arrays]}, ``numbers`` {category: [label numbers]}, optional ``split``.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for image in images:
        width, height = image["size"]
        path = root / "images" / image["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not image.get("no_file"):
            Image.new("RGB", (width, height), (100, 120, 140)).save(path)
        seg_h, seg_w = next(iter(m[0].shape for m in image.get("maps", {}).values()), (height, width))
        cells = []
        for category in categories:
            items = []
            for k, labels_map in enumerate(image.get("maps", {}).get(category, [])):
                suffix = f"_{category}_{k + 1}" if category == "part" else f"_{category}"
                map_name = image["name"].rsplit(".", 1)[0] + suffix + ".png"
                _encode(labels_map).save(root / "images" / map_name)
                items.append(map_name)
            items += [str(n) for n in image.get("numbers", {}).get(category, [])]
            cells.append(";".join(items))
        rows.append([image["name"], image.get("split", "train"), height, width, seg_h, seg_w, *cells])
    header = ["image", "split", "ih", "iw", "sh", "sw", *categories]
    if drop_column:
        index = header.index(drop_column)
        header.pop(index)
        rows = [r[:index] + r[index + 1:] for r in rows]
    _write_csv(root / "index.csv", header, rows)
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               [[n, name, cats, 1, 1.0, ""] for n, (name, cats) in sorted(labels.items())])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[c, 1, 300, 1, 1] for c in categories])
    for category in categories:
        members = [(n, name) for n, (name, cats) in sorted(labels.items()) if category in cats]
        _write_csv(root / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[code + 1, n, name, 1, 1.0] for code, (n, name) in enumerate(members)])
    return root


def _scene_maps() -> dict[str, list[np.ndarray]]:
    """Half-size (16 x 24) label maps of a 48 x 32 image."""
    obj = np.zeros((16, 24), np.int64)
    obj[0:4, :] = 1  # sky
    obj[6:14, 4:10] = 2  # person
    obj[6:14, 14:20] = 5  # fabric (an object here)
    obj[14:16, :] = 8  # street
    part1 = np.zeros((16, 24), np.int64)
    part1[6:8, 4:10] = 3  # head
    part2 = np.zeros((16, 24), np.int64)
    part2[12:14, 4:6] = 4  # hand
    part2[10, 8:10] = 3  # more head, in the second part map
    material = np.zeros((16, 24), np.int64)
    material[0:2, 20:24] = 5  # fabric (a material here)
    material[14:16, 0:12] = 300  # wood
    color = np.zeros((16, 24), np.int64)
    color[4:6, :] = 6  # red
    return {"object": [obj], "part": [part1, part2], "material": [material], "color": [color]}


def _images() -> list[dict]:
    return [
        {"name": "ade20k/ADE_train_1.jpg", "size": (48, 32), "maps": _scene_maps(), "numbers": {"scene": [7]}},
        {"name": "dtd/banded_1.jpg", "size": (20, 20), "numbers": {"texture": [9]}, "split": "val"},
    ]


def _up(small: np.ndarray) -> np.ndarray:
    return np.kron(small, np.ones((2, 2), np.int64)).astype(np.uint8)


def test_label_maps_become_masks_at_the_image_size(tmp_path):
    dataset = BrodenDataset(write_broden(tmp_path / "broden", _images()))
    assert not dataset.skipped and len(dataset) == 2
    assert dataset.concepts == ["sky", "person", "head", "hand", "fabric", "red", "street (scene)", "street", "banded", "wood"]
    size = load_rgb(dataset.image_path(0)).size
    assert size == (48, 32)
    concepts, masks = dataset.masks(0, size)
    assert masks.shape == (len(concepts), 32, 48) and masks.dtype == np.uint8
    got = {dataset.concepts[c]: m for c, m in zip(concepts, masks)}
    maps = _scene_maps()
    assert set(got) == {"sky", "person", "head", "hand", "fabric", "red", "street (scene)", "street", "wood"}
    np.testing.assert_array_equal(got["sky"], _up(maps["object"][0] == 1))
    np.testing.assert_array_equal(got["head"], _up((maps["part"][0] == 3) | (maps["part"][1] == 3)))  # both part maps
    np.testing.assert_array_equal(got["fabric"], _up((maps["object"][0] == 5) | (maps["material"][0] == 5)))
    np.testing.assert_array_equal(got["wood"], _up(maps["material"][0] == 300))
    np.testing.assert_array_equal(got["red"], _up(maps["color"][0] == 6))
    assert got["street (scene)"].all()  # a scene label covers the image
    assert got["wood"][28:32, 0:24].all() and got["wood"].sum() == 4 * 24  # bottom-left, not transposed
    concepts, masks = dataset.masks(1, (20, 20))
    assert [dataset.concepts[c] for c in concepts] == ["banded"] and masks.all()


def test_categories_and_split_select_what_is_read(tmp_path):
    root = write_broden(tmp_path / "broden", _images())
    objects = BrodenDataset(root, categories=["object"])
    assert objects.concepts == ["sky", "person", "fabric", "street"]
    assert len(objects) == 1  # the texture image has no object
    concepts, _ = objects.masks(0, (48, 32))
    assert [objects.concepts[c] for c in concepts] == ["sky", "person", "fabric", "street"]
    materials = open_reference(root, settings=ReferenceSettings(categories="material, scene"))
    assert materials.concepts == ["fabric", "street (scene)", "wood"]
    assert [materials.concepts[c] for c in materials.masks(0, (48, 32))[0]] == ["fabric", "street (scene)", "wood"]
    assert len(BrodenDataset(root, split="val")) == 1 and len(BrodenDataset(root, split="train")) == 1
    assert objects.identity() != materials.identity()
    with pytest.raises(LaviseError, match=r"Unknown Broden category 'objects'; '.*index.csv' has: color, object, part"):
        BrodenDataset(root, categories=["objects"])


def test_label_masks_match_a_loop_over_labels():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 0, 3, 17, 256, 1000], size=(3, 9, 11))
    numbers, masks = label_masks(labels)
    assert numbers.tolist() == [3, 17, 256, 1000]
    for number, mask in zip(numbers, masks):
        np.testing.assert_array_equal(mask, (labels == number).any(axis=0).astype(np.uint8))


def test_bad_input_is_refused_or_counted(tmp_path):
    root = write_broden(tmp_path / "missing-column", _images(), drop_column="part")
    with pytest.raises(LaviseError, match=r"index.csv' has no column 'part'.*its header: image,split,ih,iw,sh,sw,color,object,material"):
        BrodenDataset(root)
    root = write_broden(tmp_path / "no-size", _images(), drop_column="ih")
    with pytest.raises(LaviseError, match="has no column 'ih'"):
        BrodenDataset(root)

    unknown_map = np.zeros((16, 24), np.int64)
    unknown_map[0:3, 0:3] = 77  # no label 77 in label.csv
    images = _images() + [
        {"name": "ade20k/ADE_train_1.jpg", "size": (48, 32), "maps": _scene_maps()},  # listed twice
        {"name": "ade20k/ADE_train_2.jpg", "size": (48, 32), "maps": {"object": [unknown_map]}, "numbers": {"scene": [999]}},
        {"name": "ade20k/ADE_train_3.jpg", "size": (48, 32), "numbers": {"scene": [7]}, "no_file": True},
    ]
    dataset = BrodenDataset(write_broden(tmp_path / "bad", images))
    assert dict(dataset.skipped.counts) == {
        "images listed twice in index.csv (first kept)": 1,
        "image-level labels with no name in label.csv": 1,
        "images whose file is missing": 1,
    }
    assert dataset.skipped.examples["image-level labels with no name in label.csv"] == ["ade20k/ADE_train_2.jpg: 999"]
    assert len(dataset) == 3
    with pytest.raises(ValueError, match=r"label map ade20k/ADE_train_2_object.png holds label numbers with no name in label.csv: 77"):
        dataset.masks(2, (48, 32))
    with pytest.raises(ValueError, match="image is 48x48 but index.csv says 48x32"):
        dataset.masks(0, (48, 48))


def test_reference_features_count_an_image_with_unnamed_labels(tmp_path, tiny_model):
    unknown_map = np.zeros((16, 24), np.int64)
    unknown_map[0:3, 0:3] = 77
    images = _images() + [{"name": "ade20k/ADE_train_2.jpg", "size": (48, 32), "maps": {"object": [unknown_map]}}]
    dataset = open_reference(write_broden(tmp_path / "broden", images) / "index.csv")
    assert isinstance(dataset, BrodenDataset)
    features = reference_features(tiny_model, "features.3", dataset, cache_dir=None,
                                  compute=ComputeSettings(num_workers=0, progress=False), activation_regions=0)
    assert features.skipped.counts["images whose annotations do not fit"] == 1
    assert "no name in label.csv: 77" in features.skipped.examples["images whose annotations do not fit"][0]
    assert sorted(set(features.images.tolist())) == [0, 1]
    assert len(features.vectors) == 10  # 9 labels in the scene image, 1 texture
