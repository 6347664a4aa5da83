"""Manifest reader (CSV and JSON Lines): boxes, mask files, whole images, bad rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise.datasets import ManifestDataset, load_rgb, open_reference
from lavise.errors import LaviseError
from lavise.settings import ComputeSettings
from lavise.reference import reference_rows as reference_features

ROWS = [
    # image, concept, box, mask
    ("photos/wide.png", "kite", (30, 5, 8, 10), None),
    ("photos/wide.png", "kite", (2, 2, 4, 4), None),  # a second kite: merged
    ("photos/wide.png", "sky", None, "masks/wide_sky.png"),
    ("photos/tall.png", "kite", (2, 30, 10, 6), None),
    ("photos/tall.png", "beach", None, None),  # the whole image
]


def _sky() -> np.ndarray:
    sky = np.zeros((20, 40), np.uint8)
    sky[0:6, :] = 255
    return sky


def write_files(root: Path) -> Path:
    (root / "photos").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (40, 20), (10, 120, 200)).save(root / "photos" / "wide.png")
    Image.new("RGB", (20, 40), (200, 120, 10)).save(root / "photos" / "tall.png")
    Image.fromarray(_sky()[::2, ::2]).save(root / "masks" / "wide_sky.png")  # half size: resized nearest
    return root


def write_csv(root: Path, rows=ROWS, *, name="manifest.csv", header=("image", "concept", "box", "mask")) -> Path:
    with open(root / name, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for image, concept, box, mask in rows:
            row = [image, concept, " ".join(str(v) for v in box) if box else "", mask or ""]
            writer.writerow(row[: len(header)])
    return root / name


def write_jsonl(root: Path, rows=ROWS, *, name="manifest.jsonl", extra_lines=()) -> Path:
    lines = []
    for image, concept, box, mask in rows:
        entry = {"image": image, "concept": concept}
        if box:
            entry["box"] = list(box)
        if mask:
            entry["mask"] = mask
        lines.append(json.dumps(entry))
    (root / name).write_text("\n".join([*lines, *extra_lines]) + "\n")
    return root / name


def _expected(dataset: ManifestDataset, index: int) -> dict[str, np.ndarray]:
    concepts, masks = dataset.masks(index, load_rgb(dataset.image_path(index)).size)
    return {dataset.concepts[c]: m for c, m in zip(concepts, masks)}


@pytest.mark.parametrize("writer", [write_csv, write_jsonl])
def test_boxes_masks_and_whole_images_in_both_formats(tmp_path, writer):
    dataset = open_reference(writer(write_files(tmp_path)))
    assert isinstance(dataset, ManifestDataset) and not dataset.skipped
    assert dataset.concepts == ["beach", "kite", "sky"] and len(dataset) == 2
    wide = _expected(dataset, 0)
    kite = np.zeros((20, 40), np.uint8)
    kite[5:15, 30:38] = 1  # x along the width, y along the height
    kite[2:6, 2:6] = 1
    np.testing.assert_array_equal(wide["kite"], kite)
    np.testing.assert_array_equal(wide["sky"], (_sky() > 0).astype(np.uint8))
    tall = _expected(dataset, 1)
    assert set(tall) == {"beach", "kite"} and tall["beach"].shape == (40, 20) and tall["beach"].all()
    kite = np.zeros((40, 20), np.uint8)
    kite[30:36, 2:12] = 1
    np.testing.assert_array_equal(tall["kite"], kite)


def test_csv_and_jsonl_give_the_same_dataset(tmp_path):
    root = write_files(tmp_path)
    from_csv, from_jsonl = ManifestDataset(write_csv(root)), ManifestDataset(write_jsonl(root))
    assert from_csv.concepts == from_jsonl.concepts and len(from_csv) == len(from_jsonl)
    for i in range(len(from_csv)):
        a, b = _expected(from_csv, i), _expected(from_jsonl, i)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert from_csv.identity()["manifest"] != from_jsonl.identity()["manifest"]


def test_bad_rows_are_counted(tmp_path):
    root = write_files(tmp_path)
    rows = ROWS + [
        ("photos/wide.png", "kite", (30, 5, 8, 10), None),  # listed twice
        ("./photos/wide.png", "kite", (2, 2, 4, 4), None),  # the same row, spelled differently
        ("photos/wide.png", "cloud", (50, 1, 3, 3), None),  # entirely outside the 40 x 20 image
        ("photos/wide.png", "cloud", (36, 16, 10, 10), None),  # partly outside: clipped
        ("photos/wide.png", "cloud", (3, 3, 0, 2), None),  # zero area
        ("photos/gone.png", "kite", None, None),  # no such image
        ("photos/tall.png", "sea", None, "masks/gone.png"),  # no such mask
        ("photos/tall.png", "", None, None),  # no concept
    ]
    path = write_jsonl(root, rows, extra_lines=['{"image": "photos/tall.png", "concept": "kite", "box": [1, 2, 3]}', "not json"])
    dataset = ManifestDataset(path)
    assert dict(dataset.skipped.counts) == {
        "rows listed twice (first kept)": 2,
        "boxes entirely outside their image": 1,
        "box parts outside their image (the boxes were clipped)": 1,
        "boxes of zero area": 1,
        "rows whose image file is missing": 1,
        "rows whose mask file is missing": 1,
        "rows without an image or a concept": 1,
        "rows whose box is not four numbers x, y, w, h": 1,
        "lines that are not valid JSON": 1,
    }
    assert dataset.skipped.examples["rows listed twice (first kept)"] == ["line 6", "line 7"]
    cloud = _expected(dataset, 0)["cloud"]
    expected = np.zeros((20, 40), np.uint8)
    expected[16:20, 36:40] = 1
    np.testing.assert_array_equal(cloud, expected)


def test_missing_columns_and_empty_manifests_are_refused(tmp_path):
    root = write_files(tmp_path)
    with pytest.raises(LaviseError, match=r"manifest.csv' has no column 'concept' \(its header: image,label"):
        ManifestDataset(write_csv(root, header=("image", "label")))
    with pytest.raises(LaviseError, match="has no usable row: skipped 1 rows whose image file is missing"):
        ManifestDataset(write_jsonl(root, [("photos/none.png", "kite", None, None)], name="empty.jsonl"))
    (root / "list.txt").write_text("image,concept\n")
    with pytest.raises(LaviseError, match="neither CSV nor JSON Lines"):
        ManifestDataset(root / "list.txt")


def test_images_may_live_elsewhere_and_features_come_out(tmp_path, tiny_model):
    root = write_files(tmp_path / "data")
    manifest = write_csv(tmp_path)  # the manifest is not beside the images
    with pytest.raises(LaviseError, match="--class-names does not apply to the manifest format"):
        from lavise.settings import ReferenceSettings

        open_reference(manifest, images=root, settings=ReferenceSettings(class_names="imagenet"))
    dataset = open_reference(manifest, images=root)
    assert dataset.image_path(0) == root / "photos" / "wide.png"
    features = reference_features(tiny_model, "features.3", dataset, cache_dir=None,
                                  compute=ComputeSettings(num_workers=0, progress=False), activation_regions=0)
    assert len(features.vectors) == 4 and not features.skipped  # (wide: kite, sky), (tall: kite, beach)


def test_declared_sizes_spare_the_header_reads_and_are_checked(tmp_path, monkeypatch):
    import lavise.datasets.manifest as manifest

    root = write_files(tmp_path)
    lines = [
        {"image": "photos/wide.png", "concept": "kite", "box": [30, 5, 8, 10], "width": 40, "height": 20},
        {"image": "photos/tall.png", "concept": "kite", "box": [2, 30, 10, 6], "width": 40, "height": 80},  # wrong
    ]
    (root / "sized.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def no_header_reads(path):
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(manifest, "_image_size", no_header_reads)
    dataset = ManifestDataset(root / "sized.jsonl")
    assert _expected(dataset, 0)["kite"][5:15, 30:38].all()
    with pytest.raises(ValueError, match="image is 20x40 but its manifest width and height .* gave 40x80"):
        dataset.masks(1, (20, 40))
