"""Bad input: image files and folders — decompression bombs, names that are not UTF-8,
EXIF orientation, broken symbolic links, a file where a folder is expected."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lavise.datasets import BadImage, CocoDataset, FolderDataset, ImageFiles, LaviseWarning, load_rgb, read_groups
from lavise.datasets.base import BROKEN_LINKS, SkipLog, image_size, orient_masks, printable
from lavise.datasets.broden import read_label_map
from lavise.errors import LaviseError
from lavise.features import count_problems, load_batches
from lavise.storage import files_digest
from lavise.tallies import _GroundTruthMasks


def _png(path: Path, size=(16, 12), colour=(120, 30, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG whose header claims width x height pixels (10^10: over twice Pillow's limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


# --- decompression bombs -------------------------------------------------------------------


def test_an_image_over_the_bomb_limit_is_a_bad_image(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", size=(64, 64))
    assert load_rgb(path).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
    with pytest.raises(BadImage, match=r"over Pillow's decompression-bomb limit .*Raise PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_rgb(path)
    with pytest.raises(BadImage, match="decompression-bomb"):
        image_size(path)


def test_a_header_claiming_a_huge_size_is_a_bad_image(tmp_path):
    path = _bomb(tmp_path / "bomb.png")
    with pytest.raises(BadImage, match=r"decompression-bomb limit \(Image size \(10000000000 pixels\)"):
        load_rgb(path)
    with pytest.raises(BadImage, match="decompression-bomb"):
        image_size(path)
    with pytest.raises(ValueError, match="label map bomb.png is unreadable"):
        read_label_map(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bomb_is_skipped_and_counted_also_in_a_worker(tmp_path, tiny_model, compute, workers):
    folder = tmp_path / "target"
    for i in range(3):
        _png(folder / f"{i}.png", size=(64, 64))
    _bomb(folder / "1b.png")
    images = ImageFiles(folder)
    assert len(images) == 4
    skipped = SkipLog()
    settings = dataclasses.replace(compute, num_workers=workers)
    good = []
    for items in load_batches(images, tiny_model.preprocessing, [[0, 1], [2, 3]], settings):
        good.extend(count_problems(items, images, skipped))
    assert len(good) == 3
    assert skipped.counts == {"unreadable images": 1}
    [example] = skipped.examples["unreadable images"]
    assert example.endswith("1b.png (over Pillow's decompression-bomb limit (Image size (10000000000 pixels) exceeds "
                            "limit of 178956970 pixels, could be decompression bomb DOS attack. Raise "
                            "PIL.Image.MAX_IMAGE_PIXELS to read it.))")


def test_a_bomb_among_reference_images_is_counted_when_masks_are_tallied(tmp_path, coco_maker, tiny_model):
    path = coco_maker(tmp_path / "c", images=3)
    _bomb(path.parent / "images" / "0001.png", 64, 10**8)
    dataset = CocoDataset(path, path.parent / "images")
    masks = _GroundTruthMasks(dataset, tiny_model.preprocessing, 8)
    assert masks[0].problem is None
    reason, detail = masks[1].problem
    assert reason == "unreadable images" and "decompression-bomb" in detail


# --- names that are not UTF-8 --------------------------------------------------------------


def _bad_name(folder: Path, name: bytes = b"bad\xff.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(str(folder)), name)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(open(raw, "wb"), format="PNG")
    return Path(os.fsdecode(raw))


def test_a_name_that_is_not_utf8_digests_and_prints(tmp_path):
    path = _bad_name(tmp_path / "t")
    other = _png(tmp_path / "t" / "good.png", size=(8, 8))
    digest = files_digest([path, other])
    assert len(digest) == 64 and digest != files_digest([other, path]) and digest != files_digest([other])
    assert files_digest([other]) == files_digest([str(other)])  # valid names digest as before
    images = ImageFiles(tmp_path / "t")
    assert images.paths == sorted([path, other])
    json.dumps(images.identity())
    assert load_rgb(path).size == (8, 8)
    log = SkipLog()
    log.add("unreadable images", f"{path} (why)")
    assert log.examples["unreadable images"][0].endswith("bad\\xff.png (why)")
    log.lines()[0].encode("utf-8")  # safe to print and to write
    assert printable(path).endswith("bad\\xff.png")


def test_a_class_folder_named_in_another_encoding(tmp_path):
    _bad_name(Path(os.fsdecode(os.path.join(os.fsencode(str(tmp_path / "ref")), b"caf\xe9"))), b"1.png")
    _png(tmp_path / "ref" / "tea" / "1.png")
    dataset = FolderDataset(tmp_path / "ref")
    assert dataset.concepts == ["caf\\xe9", "tea"]
    json.dumps(dataset.identity()).encode("utf-8")


def test_a_broken_link_with_an_undecodable_name_is_counted_printably(tmp_path):
    folder = tmp_path / "t"
    _png(folder / "a.png")
    os.symlink(b"nowhere", os.path.join(os.fsencode(str(folder)), b"gone\xfe.png"))
    with pytest.warns(LaviseWarning, match=r"skipped 1 broken symbolic links \(e\.g\. gone\\xfe\.png\)") as record:
        ImageFiles(folder)
    str(record[0].message).encode("utf-8")


# --- EXIF orientation ------------------------------------------------------------------------


def _quadrants(size=(40, 24)) -> np.ndarray:
    """An image whose four quadrants have distinct colours, so any turn or flip shows."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (250, 0, 0)
    pixels[: height // 2, width // 2:] = (0, 250, 0)
    pixels[height // 2:, : width // 2] = (0, 0, 250)
    pixels[height // 2:, width // 2:] = (250, 250, 250)
    return pixels


def _oriented_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_rgb_applies_the_exif_orientation(tmp_path, orientation):
    path = _oriented_jpeg(tmp_path / "photo.jpg", _quadrants(), orientation)
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == orientation and stored.size == (40, 24)
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    loaded = load_rgb(path)
    assert np.array_equal(np.asarray(loaded), expected)
    assert image_size(path) == loaded.size == ((24, 40) if orientation >= 5 else (40, 24))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_masks_are_turned_as_pillow_turns_the_image(orientation):
    mask = (np.random.default_rng(orientation).random((5, 7)) < 0.5).astype(np.uint8)
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    image = Image.fromarray(mask * 255)
    expected = np.asarray(image if method is None else image.transpose(method)) // 255
    turned = orient_masks(mask[None], orientation)
    assert turned.shape == (1, *expected.shape) and np.array_equal(turned[0], expected)


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_reference_masks_turn_with_their_image(tmp_path, orientation):
    """A COCO box drawn on the stored pixels covers the same pixels once the photo is upright."""
    root = tmp_path / "c"
    pixels = np.full((30, 50, 3), 90, np.uint8)
    pixels[4:14, 30:46] = (250, 20, 20)  # the 'thing' the box covers, in stored coordinates
    _oriented_jpeg(root / "images" / "1.jpg", pixels, orientation)
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 50, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [30, 4, 16, 10]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    dataset = CocoDataset(root / "annotations.json", root / "images")
    image = load_rgb(dataset.image_path(0))
    concepts, masks = dataset.masks(0, image.size)
    red = np.asarray(image)[..., 0] > 170
    assert concepts == [0] and masks.shape == (1, image.size[1], image.size[0])
    assert red.sum() > 100 and np.logical_xor(red, masks[0] > 0).sum() <= 0.05 * red.sum()


# --- broken symbolic links and folders that are files -----------------------------------------


def _links(folder: Path) -> None:
    (folder / "gone.png").symlink_to(folder / "nowhere.png")  # dangling
    (folder / "loop.png").symlink_to(folder / "loop.png")  # a loop
    (folder / "gonedir").symlink_to(folder / "no-such-folder")
    (folder / "fine.png").symlink_to(folder / "a.png")  # a working link is an image like any


def test_broken_links_in_a_target_folder_are_counted(tmp_path):
    folder = tmp_path / "t"
    _png(folder / "a.png")
    _links(folder)
    with pytest.warns(LaviseWarning, match=r"target .*t: skipped 3 broken symbolic links \(e\.g\. ") as record:
        images = ImageFiles(folder)
    assert [p.name for p in images.paths] == ["a.png", "fine.png"]
    message = str(record[0].message)
    assert all(name in message for name in ("gone.png", "loop.png", "gonedir"))
    assert images.skipped.counts == {BROKEN_LINKS: 3}


def test_broken_links_in_a_folder_dataset_are_counted(tmp_path):
    folder = tmp_path / "ref"
    _png(folder / "cat" / "a.png")
    _png(folder / "dog" / "b.png")
    _links(folder / "cat")
    dataset = FolderDataset(folder)
    assert dataset.skipped.counts[BROKEN_LINKS] == 3
    assert sorted(dataset.skipped.examples[BROKEN_LINKS]) == ["cat/gone.png", "cat/gonedir", "cat/loop.png"]
    assert len(dataset) == 3


def test_broken_links_in_group_folders_are_counted(tmp_path):
    for group in ("x", "y"):
        _png(tmp_path / "g" / group / "a.png")
    _links(tmp_path / "g" / "x")
    groups = read_groups(tmp_path / "g")
    assert groups.skipped.counts[BROKEN_LINKS] == 3 and len(groups) == 3


def test_a_clean_folder_warns_nothing(tmp_path):
    _png(tmp_path / "t" / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)
        ImageFiles(tmp_path / "t")


@pytest.mark.parametrize(
    ("open_folder", "what"),
    [(ImageFiles, "Target folder"), (FolderDataset, "Reference folder"), (read_groups, "Target folder")],
)
def test_a_file_given_for_a_folder_says_so(tmp_path, open_folder, what):
    path = _png(tmp_path / "a.png")
    with pytest.raises(LaviseError, match=rf"{what} '.*a\.png' is a file, not a folder\."):
        open_folder(path)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LaviseError, match=rf"{what} '.*link' is a broken symbolic link\."):
        open_folder(tmp_path / "link")
    with pytest.raises(LaviseError, match=rf"{what} '.*absent' does not exist\."):
        open_folder(tmp_path / "absent")


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_masks_annotated_on_the_upright_photo_are_not_turned_again(tmp_path, orientation):
    """A tool that showed the photo upright records its upright size (and boxes on it):
    the sizes tell, so the box is drawn as it is."""
    root = tmp_path / "c"
    stored = np.full((30, 50, 3), 90, np.uint8)
    _oriented_jpeg(root / "images" / "1.jpg", stored, orientation)
    upright = load_rgb(root / "images" / "1.jpg")
    assert upright.size == (30, 50)
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 30, "height": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [2, 30, 10, 12]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    concepts, masks = CocoDataset(root / "annotations.json", root / "images").masks(0, upright.size)
    expected = np.zeros((50, 30), np.uint8)
    expected[30:42, 2:12] = 1
    assert concepts == [0] and np.array_equal(masks[0], expected)


def test_explain_records_the_broken_links_of_its_target(tmp_path, tiny_run, tiny_model, targets, compute):
    from lavise.explain import explain
    from lavise.settings import ExplainSettings

    (targets / "gone.png").symlink_to(targets / "nowhere.png")
    with pytest.warns(LaviseWarning, match="skipped 1 broken symbolic links"):
        explain(tiny_run, targets, settings=ExplainSettings(top_images=3, vocabulary_size=300), compute=compute,
                model=tiny_model, cache_dir=tmp_path / "cache")
    recorded = json.loads((tiny_run.path / "explanations.json").read_text())["target"]["skipped"]
    assert recorded[BROKEN_LINKS] == {"count": 1, "examples": ["gone.png"]}
