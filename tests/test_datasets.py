"""Dataset readers (COCO, folder, target images) and the geometry of concept masks."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lavise.datasets import CocoDataset, FolderDataset, ImageFiles, open_reference
from lavise.errors import LaviseError
from lavise.models import Preprocessing, preprocess_image, preprocess_masks
from lavise.regions import masks_to_grid

WIDTH, HEIGHT = 40, 30


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def _write_coco(root: Path) -> Path:
    """Three images (one unannotated); category ids out of order; every annotation kind."""
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(images / name)
    rle = mask_utils.encode(np.asfortranarray(_disc(28, 20, 6)))
    crowd = np.zeros((HEIGHT, WIDTH), np.uint8)
    crowd[5:12, 20:38] = 1
    annotations = [
        # image 1: two instances of "dog" (polygon + compressed RLE), a crowd of "person",
        # and a box-only "kite"
        {"id": 1, "image_id": 1, "category_id": 5, "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "bbox": [2, 2, 10, 8], "iscrowd": 0, "area": 80},
        {"id": 2, "image_id": 1, "category_id": 5, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "bbox": [22, 14, 12, 12], "iscrowd": 0, "area": 113},
        {"id": 3, "image_id": 1, "category_id": 2, "segmentation": _uncompressed_rle(crowd), "bbox": [20, 5, 18, 7], "iscrowd": 1, "area": 126},
        {"id": 4, "image_id": 1, "category_id": 9, "segmentation": [], "bbox": [0.5, 20.2, 6.1, 4.3], "iscrowd": 0, "area": 26},
        # image 2: a triangle of "person"
        {"id": 5, "image_id": 2, "category_id": 2, "segmentation": [[5, 5, 30, 5, 5, 25]], "bbox": [5, 5, 25, 20], "iscrowd": 0, "area": 250},
    ]
    data = {
        "images": [
            {"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT}
            for i, name in enumerate(("a.png", "b.png", "c.png"))
        ],
        "annotations": annotations,
        "categories": [{"id": 9, "name": "kite"}, {"id": 2, "name": "person"}, {"id": 5, "name": "dog"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _reference_masks(path: Path, image_id: int) -> dict[int, np.ndarray]:
    """Category id -> union of its instance masks, straight from pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    merged: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        mask = coco.annToMask(ann) if ann["segmentation"] else None
        if mask is None:
            continue
        merged[ann["category_id"]] = np.maximum(merged.get(ann["category_id"], 0), mask)
    return merged


def test_coco_reader_merges_instances_and_reads_every_format(tmp_path):
    path = _write_coco(tmp_path)
    dataset = CocoDataset(path, tmp_path / "images")
    assert dataset.concepts == ["person", "dog", "kite"]  # sorted by category id: 2, 5, 9
    assert len(dataset) == 2  # c.png has no annotation
    assert [dataset.image_path(i).name for i in range(2)] == ["a.png", "b.png"]
    assert not dataset.skipped

    concepts, masks = dataset.masks(0, (WIDTH, HEIGHT))
    assert concepts == [0, 1, 2]
    assert masks.shape == (3, HEIGHT, WIDTH) and masks.dtype == np.uint8
    expected = _reference_masks(path, 1)
    np.testing.assert_array_equal(masks[0], expected[2])  # crowd, uncompressed RLE
    np.testing.assert_array_equal(masks[1], expected[5])  # polygon ∪ RLE
    # the merge is a union of two disjoint instances: both are there
    assert masks[1][2:10, 2:12].all() and masks[1][20, 28] == 1
    assert masks[1].sum() == expected[5].sum() > 80
    # box only: the box's pixels, rounded outwards and clipped
    box = np.zeros((HEIGHT, WIDTH), np.uint8)
    box[20:25, 0:7] = 1
    np.testing.assert_array_equal(masks[2], box)

    concepts, masks = dataset.masks(1, (WIDTH, HEIGHT))
    assert concepts == [0]
    np.testing.assert_array_equal(masks[0], _reference_masks(path, 2)[2])


def test_coco_masks_refuse_an_image_of_another_size(tmp_path):
    dataset = CocoDataset(_write_coco(tmp_path), tmp_path / "images")
    with pytest.raises(ValueError, match=f"image is 41x30 but the annotations say {WIDTH}x{HEIGHT}"):
        dataset.masks(0, (41, 30))


def test_generated_coco_fixture_masks_match_pycocotools(coco):
    dataset = open_reference(coco)
    assert isinstance(dataset, CocoDataset)
    assert len(dataset) == 24
    crowd_seen = False
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(coco))
    for index in (0, 3, 10):
        image_id = index + 1
        anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
        crowd_seen |= any(a["iscrowd"] for a in anns)
        concepts, masks = dataset.masks(index, (64, 64))
        assert len(concepts) == 2
        for concept, mask in zip(concepts, masks):
            category = concept + 1
            expected = np.zeros((64, 64), np.uint8)
            for ann in anns:
                if ann["category_id"] == category:
                    expected = np.maximum(expected, reference.annToMask(ann))
            np.testing.assert_array_equal(mask, expected)
    assert crowd_seen


def test_coco_identity_follows_annotations_and_images(tmp_path):
    path = _write_coco(tmp_path)
    first = CocoDataset(path, tmp_path / "images").identity()
    assert CocoDataset(path, tmp_path / "images").identity() == first
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = [[3, 3, 12, 3, 12, 10]]
    path.write_text(json.dumps(data))
    edited = CocoDataset(path, tmp_path / "images").identity()
    assert edited["annotations"] != first["annotations"]


def _write_folder(root: Path) -> Path:
    (root / "traffic_light").mkdir(parents=True)
    (root / "dog" / "more").mkdir(parents=True)
    (root / "empty_class").mkdir()
    Image.new("RGB", (20, 10), "red").save(root / "traffic_light" / "x.png")
    Image.new("RGB", (8, 12), "blue").save(root / "dog" / "a.jpg")
    Image.new("RGB", (8, 12), "blue").save(root / "dog" / "more" / "b.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(b"")  # files at the top level belong to no class
    return root


def test_folder_dataset(tmp_path):
    dataset = FolderDataset(_write_folder(tmp_path / "ref"))
    assert dataset.concepts == ["dog", "empty class", "traffic light"]
    assert len(dataset) == 3
    paths = [dataset.image_path(i).relative_to(dataset.root).as_posix() for i in range(3)]
    assert paths == ["dog/a.jpg", "dog/more/b.png", "traffic_light/x.png"]
    concepts, masks = dataset.masks(2, (20, 10))
    assert concepts == [2]
    assert masks.shape == (1, 10, 20) and masks.dtype == np.uint8 and masks.min() == 1
    assert dataset.masks(1, (8, 12))[0] == [0]
    assert dataset.skipped.counts == {"files that are not images": 1, "class folders without images": 1}
    assert dataset.skipped.examples["files that are not images"] == [str(Path("dog") / "notes.txt")]


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(LaviseError, match="does not exist"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(LaviseError, match="no sub-folders"):
        FolderDataset(tmp_path / "flat")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(LaviseError, match="No image files"):
        FolderDataset(tmp_path / "empty")


def test_open_reference_guesses_the_format(tmp_path, coco):
    assert isinstance(open_reference(coco), CocoDataset)
    assert isinstance(open_reference(_write_folder(tmp_path / "ref")), FolderDataset)
    # a COCO JSON whose images are elsewhere
    path = _write_coco(tmp_path / "elsewhere")
    moved = tmp_path / "pictures"
    (tmp_path / "elsewhere" / "images").rename(moved)
    with pytest.raises(LaviseError, match="--reference-images"):
        open_reference(path)
    dataset = open_reference(path, images=moved)
    assert isinstance(dataset, CocoDataset) and dataset.root == moved
    # the format may be forced
    assert isinstance(open_reference(coco, format="coco"), CocoDataset)
    with pytest.raises(LaviseError, match="Unknown reference format 'voc'"):
        open_reference(coco, format="voc")


def test_image_files_lists_images_recursively_in_order(tmp_path):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.webp"):
        Image.new("RGB", (4, 4)).save(tmp_path / "t" / name, format="PNG" if name.endswith("png") else ("JPEG" if name.endswith("JPG") else "WEBP"))
    (tmp_path / "t" / "readme.md").write_text("x")
    files = ImageFiles(tmp_path / "t")
    assert [p.relative_to(files.root).as_posix() for p in files.paths] == ["a.JPG", "b.png", "sub/c.webp"]
    assert len(files) == 3


# --- mask geometry -----------------------------------------------------------------------


def test_masks_to_grid_keeps_a_tiny_object():
    masks = torch.zeros(1, 224, 224)
    masks[0, 100:103, 100:103] = 1  # 3x3 px, inside cell (3, 3) of a 7x7 grid
    grid = masks_to_grid(masks, (7, 7))
    assert grid.shape == (1, 7, 7)
    assert grid[0, 3, 3] == pytest.approx(9 / 32**2)
    assert (grid > 0).sum() == 1
    assert float(grid.sum()) * 32 * 32 == pytest.approx(9.0)


def test_masks_to_grid_is_the_area_fraction_when_divisible():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 56, 42, generator=generator) > 0.6).float()
    grid = masks_to_grid(masks, (7, 6))
    expected = masks.reshape(3, 7, 8, 6, 7).mean(dim=(2, 4))
    torch.testing.assert_close(grid, expected)


def test_tiny_object_survives_resize_crop_and_grid():
    masks = np.zeros((1, 224, 224), np.uint8)
    masks[0, 110:113, 110:113] = 1
    cells = masks_to_grid(preprocess_masks(masks, Preprocessing(256, 224)), (7, 7))
    assert float(cells.sum()) > 0


@pytest.mark.parametrize("size", [(120, 80), (80, 120)])
def test_masks_stay_aligned_with_the_image(size):
    """The mask gets exactly the image's resize and centre crop, on non-square images."""
    width, height = size
    rng = np.random.default_rng(1)
    mask = (rng.random((height, width)) > 0.5).astype(np.uint8)
    mask[: height // 3, : width // 4] = 1  # asymmetric blocks catch flips and transposes
    mask[-height // 4 :, -width // 3 :] = 0
    image = Image.fromarray(np.repeat(mask[:, :, None] * 255, 3, axis=2))
    preprocessing = Preprocessing(64, 48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pixels = preprocess_image(image, preprocessing)
    masks = preprocess_masks(mask[None], preprocessing)
    assert pixels.shape == (3, 48, 48) and masks.shape == (1, 48, 48)
    assert masks.dtype == torch.float32 and 0 <= masks.min() and masks.max() <= 1
    torch.testing.assert_close(masks[0], pixels[0], atol=0.01, rtol=0)


def test_left_half_stays_left_after_centre_crop():
    mask = np.zeros((1, 80, 120), np.uint8)  # W=120, H=80
    mask[0, :, :60] = 1
    out = preprocess_masks(mask, Preprocessing(64, 64))[0]
    # resized to 96x64, cropped from x=16: the left half ends at x = 48 - 16 = 32
    assert out[:, :31].min() > 0.99
    assert out[:, 33:].max() < 0.01
    top = np.zeros((1, 120, 80), np.uint8)  # portrait: the top third
    top[0, :40, :] = 1
    out = preprocess_masks(top, Preprocessing(64, 64))[0]
    # resized to 64x96, cropped from y=16: the top third ends at y = 32 - 16 = 16
    assert out[:15].min() > 0.99 and out[17:].max() < 0.01


def test_coco_images_without_width_and_height_take_the_file_size(tmp_path, coco_maker):
    import json

    import numpy as np

    from lavise.datasets import open_reference

    path = coco_maker(tmp_path / "c", images=6)
    data = json.loads(path.read_text())
    for image in data["images"]:
        del image["width"], image["height"]
    # an RLE of 32x32 (its counts agree with its size) that fits no image: refused when drawn
    data["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": [1000, 24]}
    path.write_text(json.dumps(data))
    dataset = open_reference(path)
    concepts, masks = dataset.masks(1, (64, 64))
    assert masks.shape == (len(concepts), 64, 64) and masks.sum() > 0
    with pytest.raises(ValueError, match="RLE"):
        dataset.masks(0, (64, 64))
    reference = coco_maker(tmp_path / "d", images=6)
    expected = open_reference(reference).masks(1, (64, 64))
    assert expected[0] == concepts and np.array_equal(expected[1], masks)
