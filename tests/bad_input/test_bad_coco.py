"""Bad input: COCO instances files with wrong, missing or duplicated fields, and malformed masks.

Each test writes its own dataset (``coco_maker``: 64x64 PNGs, an RLE and a polygon per
image), breaks one thing, and asserts the message: a LaviseError naming the file, the
entry and what is wrong, or a counted skip for one bad annotation.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lavise.datasets import CocoDataset, LaviseWarning, open_reference
from lavise.datasets.masks import decode_rle_string, rle_mask, rle_problem
from lavise.errors import LaviseError
from lavise.settings import ReferenceSettings


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _broken(tmp_path, coco_maker, change, images: int = 4) -> tuple[Path, dict]:
    """A generated COCO file after ``change(data)``, and the changed data."""
    path = coco_maker(tmp_path / "c", images=images)
    data = json.loads(path.read_text())
    change(data)
    return _write(path, data), data


def _open(path: Path) -> CocoDataset:
    return CocoDataset(path, path.parent / "images")


def _all_masks(dataset) -> list[tuple[list[int], np.ndarray]]:
    return [dataset.masks(i, (64, 64)) for i in range(len(dataset))]


# --- duplicates -------------------------------------------------------------------------


def test_two_images_with_one_id_are_refused(tmp_path, coco_maker):
    def change(data):
        data["images"][2]["id"] = data["images"][0]["id"]

    path, _ = _broken(tmp_path, coco_maker, change)
    with pytest.raises(LaviseError, match=r"annotations\.json.*image id 1 is listed twice \(images\[0\] and images\[2\]\)"):
        _open(path)


def test_two_ids_naming_one_file_are_refused(tmp_path, coco_maker):
    def change(data):
        data["images"][3]["file_name"] = "./" + data["images"][1]["file_name"]

    path, _ = _broken(tmp_path, coco_maker, change)
    with pytest.raises(LaviseError, match=r"images with ids 2 and 4 both name the file '\./0001\.png'"):
        _open(path)


def test_two_categories_with_one_id_are_refused(tmp_path, coco_maker):
    def change(data):
        data["categories"].append({"id": 1, "name": "antenna"})

    path, _ = _broken(tmp_path, coco_maker, change)
    with pytest.raises(LaviseError, match=r"annotations\.json.*category id 1 is listed twice \(categories\[0\] and categories\[4\]\)"):
        _open(path)


@pytest.mark.parametrize("spelling", ["circle", "Circle", "  circle ", "CIRCLE"])
def test_categories_of_one_name_are_merged_with_a_warning(tmp_path, coco_maker, spelling):
    def change(data):
        data["categories"].append({"id": 9, "name": spelling})
        for ann in data["annotations"]:
            if ann["category_id"] == 1 and ann["image_id"] % 2:
                ann["category_id"] = 9  # half of the circles under the second id

    path, data = _broken(tmp_path, coco_maker, change, images=8)
    with pytest.warns(LaviseWarning, match=r"2 categories share 1 name, each merged into one concept: 'circle' \(ids 1, 9\)"):
        dataset = _open(path)
    assert dataset.concepts == ["circle", "square", "triangle", "traffic light"]
    for i in range(len(dataset)):
        image_id = dataset._image_ids[i]
        wanted = {({9: 1}).get(a["category_id"], a["category_id"]) - 1 for a in data["annotations"] if a["image_id"] == image_id}
        concepts, masks = dataset.masks(i, (64, 64))
        assert set(concepts) == wanted and masks.shape[0] == len(wanted)


def test_distinct_names_are_not_merged(tmp_path, coco_maker):
    path = coco_maker(tmp_path / "c", images=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)
        assert len(_open(path).concepts) == 4


# --- the structure: wrong types and missing fields --------------------------------------


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ([], r"its top level is a list, expected an object"),
        (None, r"its top level is null"),
        ("images", r"its top level is a string"),
        (3, r"its top level is a number"),
        ({"images": [], "annotations": []}, r"no categories"),
        ({"images": [], "annotations": [], "categories": None}, r"'categories' is null, expected a list"),
        ({"images": {}, "annotations": [], "categories": []}, r"'images' is an object, expected a list"),
        ({"images": [], "annotations": "none", "categories": []}, r"'annotations' is a string, expected a list"),
    ],
)
def test_top_level_of_the_wrong_shape(tmp_path, coco, top, message):
    path = _write(tmp_path / "bad.json", top)
    with pytest.raises(LaviseError, match=r"bad\.json.*" + message):
        CocoDataset(path, coco.parent / "images")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (None, "not an object", r"images\[1\] is a string, expected an object"),
        ("id", ..., r"images\[1\] has no 'id', expected a whole number"),
        ("id", "2", r"images\[1\] has 'id' \"2\" \(a string\), expected a whole number"),
        ("id", None, r"images\[1\] has 'id' null \(null\)"),
        ("id", True, r"images\[1\] has 'id' true \(a boolean\)"),
        ("id", 2.5, r"images\[1\] has 'id' 2\.5 \(a number\)"),
        ("file_name", ..., r"images\[1\] \(id 2\) has no 'file_name', expected a file name"),
        ("file_name", 1, r"images\[1\] \(id 2\) has 'file_name' 1 \(a number\), expected a file name"),
        ("file_name", "", r"images\[1\] \(id 2\) has 'file_name' \"\" \(a string\)"),
        ("file_name", ["0001.png"], r"images\[1\] \(id 2\) has 'file_name' \[\"0001\.png\"\] \(a list\)"),
        ("width", ..., r"images\[1\] \(id 2\) has a height but no width; give both or neither"),
        ("height", None, r"images\[1\] \(id 2\) has a width but no height"),
        ("width", 0, r"images\[1\] \(id 2\) has 'width' 0 \(a number\), expected a positive whole number"),
        ("height", -64, r"images\[1\] \(id 2\) has 'height' -64 \(a number\), expected a positive"),
        ("width", "64", r"images\[1\] \(id 2\) has 'width' \"64\" \(a string\)"),
        ("width", 63.5, r"images\[1\] \(id 2\) has 'width' 63\.5"),
        ("height", False, r"images\[1\] \(id 2\) has 'height' false \(a boolean\)"),
        ("width", math.inf, r"images\[1\] \(id 2\) has 'width' Infinity"),
    ],
)
def test_image_entries_of_the_wrong_shape(tmp_path, coco_maker, field, value, message):
    def change(data):
        if field is None:
            data["images"][1] = value
        elif value is ...:
            del data["images"][1][field]
        else:
            data["images"][1][field] = value

    path, _ = _broken(tmp_path, coco_maker, change)
    with pytest.raises(LaviseError, match=r"annotations\.json'?: " + message):
        _open(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (None, [1, "circle"], r"categories\[0\] is a list, expected an object"),
        ("id", ..., r"categories\[0\] has no 'id', expected a whole number"),
        ("id", "1", r"categories\[0\] has 'id' \"1\" \(a string\)"),
        ("name", ..., r"categories\[0\] \(id 1\) has no 'name', expected a non-empty name"),
        ("name", "", r"categories\[0\] \(id 1\) has 'name' \"\" \(a string\), expected a non-empty name"),
        ("name", "   ", r"categories\[0\] \(id 1\) has 'name' \"   \""),
        ("name", 7, r"categories\[0\] \(id 1\) has 'name' 7 \(a number\)"),
        ("name", None, r"categories\[0\] \(id 1\) has 'name' null"),
    ],
)
def test_category_entries_of_the_wrong_shape(tmp_path, coco_maker, field, value, message):
    def change(data):
        if field is None:
            data["categories"][0] = value
        elif value is ...:
            del data["categories"][0][field]
        else:
            data["categories"][0][field] = value

    path, _ = _broken(tmp_path, coco_maker, change)
    with pytest.raises(LaviseError, match=r"annotations\.json'?: " + message):
        _open(path)


def _first_box_annotation(data: dict, **fields) -> dict:
    """The first annotation, made a box-only one with ``fields`` changed."""
    ann = data["annotations"][0]
    ann["segmentation"] = []
    ann.update(fields)
    return ann


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["annotations"].__setitem__(0, "an annotation"), "annotations that are not objects"),
        (lambda d: d["annotations"].__setitem__(0, None), "annotations that are not objects"),
        (lambda d: d["annotations"][0].pop("category_id"), "annotations without a category_id"),
        (lambda d: d["annotations"][0].pop("image_id"), "annotations without an image_id"),
        (lambda d: d["annotations"][0].update(category_id="1"), "annotations of unknown categories"),
        (lambda d: d["annotations"][0].update(category_id=None), "annotations of unknown categories"),
        (lambda d: d["annotations"][0].update(category_id=True), "annotations of unknown categories"),
        (lambda d: d["annotations"][0].update(image_id="1"), "annotations of unknown images"),
        (lambda d: d["annotations"][0].update(image_id=None), "annotations of unknown images"),
        (lambda d: _first_box_annotation(d, bbox=[1, None, 4, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, 4, 4, 5]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, -4, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, 4, 0]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, math.nan, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=[1, 2, math.inf, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=["1", 2, 4, 4]), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox={"x": 1}), "annotations with a malformed box"),
        (lambda d: _first_box_annotation(d, bbox=None), "annotations without a mask or box"),
        (lambda d: _first_box_annotation(d, segmentation=None, bbox=[]), "annotations without a mask or box"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, 30, 2, None, 30]]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, 30, 2, math.nan, 30]]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, 30, 2, 1e30, 30]]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, 30, 2, 30]]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, True, 2, 30, 30]]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=[1, 2, 30, 2, 30, 30]), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation="polygon"), "annotations with a malformed segmentation"),
        (lambda d: d["annotations"][1].update(segmentation=5), "annotations with a malformed segmentation"),
    ],
)
def test_one_bad_annotation_is_skipped_and_counted(tmp_path, coco_maker, change, reason):
    path, _ = _broken(tmp_path, coco_maker, change)
    dataset = _open(path)
    [(counted, count)] = dataset.skipped.counts.items()
    assert counted.startswith(reason) and count == 1, dataset.skipped.lines()
    assert len(dataset) == 4  # every image kept: each has another annotation
    for concepts, masks in _all_masks(dataset):
        assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1} and len(concepts) >= 1


def test_an_annotation_without_an_id_is_used(tmp_path, coco_maker):
    """pycocotools' index needed every annotation's id (a KeyError); lavise's does not, and
    two annotations sharing an id both count."""

    def change(data):
        del data["annotations"][0]["id"]
        data["annotations"][3]["id"] = data["annotations"][2]["id"]

    path, data = _broken(tmp_path, coco_maker, change)
    dataset = _open(path)
    assert not dataset.skipped
    reference = _open(coco_maker(tmp_path / "d", images=4))
    for (c1, m1), (c2, m2) in zip(_all_masks(dataset), _all_masks(reference)):
        assert c1 == c2 and np.array_equal(m1, m2)


# --- RLE ---------------------------------------------------------------------------------


def test_the_rle_decoder_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        if trial % 4 == 0:
            mask[:] = mask[0, 0]  # one run
        rle = mask_utils.encode(np.asfortranarray(mask))
        text = rle["counts"].decode()
        assert rle_problem(text, height, width) is None
        assert np.array_equal(rle_mask(text, height, width), mask)
        assert sum(decode_rle_string(text)) == height * width


@pytest.mark.parametrize(
    ("counts", "problem"),
    [
        ("~~~~", "does not decode"),  # characters outside '0'..'o'
        ("0 1", "does not decode"),
        ("4a", "does not decode"),  # the last count cut off in the middle
        ("ab", "does not decode"),
        ("42102", "summing to 12, not 8x8"),  # a valid string of a 3x4 mask
        ("P1", "summing"),
        ("111@", "does not decode"),  # a difference (-16) that makes a run negative
        ([64, -10, 10], "a negative count"),
        ([30, 30], "summing to 60, not 8x8 = 64"),
        ([60, 5], "summing to 65"),
        ([64.0], "neither a string nor a list of whole numbers"),
        ([True, 63], "neither a string nor a list"),
        (["64"], "neither a string nor a list"),
        (None, "neither a string nor a list"),
        ({"a": 1}, "neither a string nor a list"),
    ],
)
def test_malformed_rle_counts_are_found(counts, problem):
    assert problem in rle_problem(counts, 8, 8)


@pytest.mark.parametrize("counts", ["~~~~", "4a", "0 1", "42102", "P1", "111@", [4096, -5, 5], [100], [2000, 2000, 97], [-1, 4097]])
def test_malformed_rle_is_skipped_and_masks_stay_binary_and_repeatable(tmp_path, coco_maker, counts):
    def change(data):
        data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": counts}

    path, _ = _broken(tmp_path, coco_maker, change)
    dataset = _open(path)
    assert dataset.skipped.counts == {"annotations with a malformed segmentation": 1}
    assert dataset.skipped.examples["annotations with a malformed segmentation"] == ["id=1"]
    first, second = _all_masks(dataset), _all_masks(dataset)
    for (c1, m1), (c2, m2) in zip(first, second):
        assert c1 == c2 and np.array_equal(m1, m2) and set(np.unique(m1)) <= {0, 1}


@pytest.mark.parametrize("size", [[64], [64, 64, 1], [0, 64], [64, -64], ["64", 64], None, [64.5, 64]])
def test_rle_of_a_malformed_size_is_skipped(tmp_path, coco_maker, size):
    def change(data):
        data["annotations"][0]["segmentation"]["size"] = size

    path, _ = _broken(tmp_path, coco_maker, change)
    assert _open(path).skipped.counts == {"annotations with a malformed segmentation": 1}


def test_rle_of_another_size_than_its_image_says_so(tmp_path, coco_maker):
    def change(data):
        data["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": [1024]}

    path, _ = _broken(tmp_path, coco_maker, change)
    dataset = _open(path)
    assert dataset.skipped.counts == {"annotations whose RLE size differs from their image's height and width": 1}


def test_a_json_size_differing_from_the_file_says_the_sizes_disagree(tmp_path, coco_maker):
    """The JSON width no longer matches the file (nor the RLE, made on the file): the
    message is about sizes, not a malformed segmentation."""

    def change(data):
        data["images"][0]["width"] = 80

    path, _ = _broken(tmp_path, coco_maker, change)
    dataset = _open(path)
    assert dataset.skipped.counts == {"annotations whose RLE size differs from their image's height and width": 1}
    with pytest.raises(ValueError, match=r"image is 64x64 but the annotations say 80x64"):
        dataset.masks(0, (64, 64))


def test_masks_of_every_kind_are_binary(coco):
    dataset = _open(coco)
    for concepts, masks in _all_masks(dataset):
        assert masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}


# --- paths outside the image folder --------------------------------------------------------


def test_file_names_outside_the_image_folder_are_refused_without_saying_if_they_exist(tmp_path, coco_maker):
    messages = []
    for case, exists in (("a", True), ("b", False)):
        root = tmp_path / case
        path = coco_maker(root / "c", images=4)
        (root / "outside").mkdir()
        if exists:
            (path.parent / "images" / "0001.png").rename(root / "outside" / "secret.png")
        data = json.loads(path.read_text())
        data["images"][1]["file_name"] = "../../outside/secret.png"
        data["images"][2]["file_name"] = str(root / "outside" / "secret.png")
        _write(path, data)
        with pytest.raises(LaviseError) as error:
            _open(path)
        messages.append(str(error.value).replace(str(root), "ROOT"))
    assert messages[0] == messages[1]  # nothing tells whether the file exists
    assert re.search(r"COCO annotation file 'ROOT/c/annotations\.json' names 2 image paths outside the image folder", messages[0])
    assert "../../outside/secret.png (image id 2)" in messages[0] and "ROOT/outside/secret.png (image id 3)" in messages[0]
    assert "--allow-outside-root" in messages[0]
    assert not re.search(r"exist|missing|not found", messages[0])


def test_a_symbolic_link_out_of_the_image_folder_is_refused(tmp_path, coco_maker):
    path = coco_maker(tmp_path / "c", images=4)
    images = path.parent / "images"
    outside = tmp_path / "elsewhere.png"
    (images / "0002.png").rename(outside)
    (images / "0002.png").symlink_to(outside)
    with pytest.raises(LaviseError, match=r"names 1 image path outside .*0002\.png \(image id 3\)"):
        _open(path)
    inside = images / "sub"
    inside.mkdir()
    (images / "0003.png").rename(inside / "real.png")
    (images / "0003.png").symlink_to(inside / "real.png")  # a link that stays inside is fine
    (images / "0002.png").unlink()
    outside.rename(images / "0002.png")
    assert len(_open(path)) == 4


def test_paths_outside_are_read_when_allowed(tmp_path, coco_maker):
    path = coco_maker(tmp_path / "c", images=4)
    (tmp_path / "outside").mkdir()
    (path.parent / "images" / "0001.png").rename(tmp_path / "outside" / "a.png")
    data = json.loads(path.read_text())
    data["images"][1]["file_name"] = "../../outside/a.png"
    data["images"][2]["file_name"] = str(tmp_path / "outside" / "missing.png")
    _write(path, data)
    dataset = open_reference(path, settings=ReferenceSettings(allow_outside_root=True))
    assert len(dataset) == 3 and dataset.image_path(1).resolve() == (tmp_path / "outside" / "a.png").resolve()
    assert dataset.skipped.counts == {"annotated images whose file is missing": 1}
    with pytest.raises(LaviseError, match="outside the image folder"):
        open_reference(path)
