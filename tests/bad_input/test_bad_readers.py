"""Bad input: the manifest, Visual Genome, Broden and folder readers — paths that leave the
image folder (one rule for every reader, and the option that lifts it), and fields of the
wrong type."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise.cli import main
from lavise.datasets import (
    BrodenDataset, FolderDataset, ManifestDataset, VisualGenomeDataset, open_reference, read_groups,
)
from lavise.datasets.base import ImageRoot, resolve_inside
from lavise.errors import LaviseError
from lavise.settings import REFERENCE_FORMATS, ReferenceSettings

ALLOWED = ReferenceSettings(allow_outside_root=True)
OUTSIDE = r"names (\d+) image paths? outside the image folder '(.*?)' \(e\.g\. (.*)\); paths must lie inside it"


def _image(path: Path, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (140, 60, 30)).save(path)
    return path


def _secret(tmp_path: Path, exists: bool = True) -> Path:
    """An image outside every dataset folder."""
    path = tmp_path / "outside" / "secret.png"
    if exists:
        _image(path)
    return path


def _refusal(error: pytest.ExceptionInfo) -> tuple[int, str]:
    match = re.search(OUTSIDE, str(error.value))
    assert match, str(error.value)
    assert not re.search(r"exist|missing|not found", str(error.value))
    assert "--allow-outside-root" in str(error.value)
    return int(match[1]), match[3]


# --- the rule itself ------------------------------------------------------------------------


def test_resolve_inside(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    (root / "in").symlink_to(root / "a")
    assert resolve_inside(root, "a/../x.png") == (root / "x.png").resolve()
    assert resolve_inside(root, "in/x.png") == (root / "a" / "x.png").resolve()
    assert resolve_inside(root, str(root / "a" / "x.png")) is not None  # absolute, but inside
    for name in ("../x.png", "a/../../x.png", "/etc/passwd", str(tmp_path / "x.png"), "out/x.png", "out"):
        assert resolve_inside(root, name) is None, name
    assert resolve_inside(Path(str(root) + "-sibling"), "x.png") is not None  # no prefix confusion
    assert resolve_inside(root, "../data-sibling/x.png") is None


def test_image_root_counts_and_allows(tmp_path):
    strict = ImageRoot(tmp_path, source="'list'")
    lenient = ImageRoot(tmp_path, source="'list'", allow_outside=True)
    for rule in (strict, lenient):
        assert rule.admits("a.png") and not rule.admits("../b.png", "line 2") == (rule is strict)
        assert rule.admits("../c.png", "line 3") == (rule is lenient)
    lenient.check()
    with pytest.raises(LaviseError) as error:
        strict.check()
    assert _refusal(error) == (2, "../b.png (line 2), ../c.png (line 3)")


@pytest.mark.parametrize("format", REFERENCE_FORMATS)
def test_every_format_accepts_the_option(tmp_path, format):
    from lavise.datasets import _check_settings

    _check_settings(format, ALLOWED)  # no "does not apply to the ... format"


def test_the_option_is_on_the_command_line(capsys):
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--allow-outside-root" in text and "by default such a dataset is refused" in text


# --- manifests ------------------------------------------------------------------------------


def _manifest(root: Path, rows: list[dict], kind: str) -> Path:
    _image(root / "a.png")
    _image(root / "b.png")
    (root / "m.png").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(root / "m.png")
    if kind == "csv":
        path = root / "list.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "concept", "mask"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = root / "list.jsonl"
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("exists", [True, False])
def test_manifest_paths_outside_are_refused(tmp_path, kind, exists):
    secret = _secret(tmp_path, exists)
    rows = [
        {"image": "a.png", "concept": "cat"},
        {"image": "../../../../../../../../etc/passwd", "concept": "cat"},
        {"image": str(secret), "concept": "dog"},
        {"image": "b.png", "concept": "dog", "mask": "../outside/secret.png"},
    ]
    path = _manifest(tmp_path / "data", rows, kind)
    with pytest.raises(LaviseError, match=r"Manifest '.*list\." + kind + "'") as error:
        ManifestDataset(path)
    count, examples = _refusal(error)
    first = 2 if kind == "csv" else 1
    assert count == 3 and f"(line {first + 1})" in examples and f"{secret} (line {first + 2})" in examples


def test_manifest_paths_outside_are_read_when_allowed(tmp_path):
    _secret(tmp_path)
    rows = [{"image": "a.png", "concept": "cat"}, {"image": "../outside/secret.png", "concept": "dog", "mask": "m.png"}]
    path = _manifest(tmp_path / "data", rows, "csv")
    dataset = open_reference(path, settings=ALLOWED)
    assert len(dataset) == 2 and dataset.concepts == ["cat", "dog"]


@pytest.mark.parametrize("mask", [5, 0, False, ["m.png"], {"file": "m.png"}])
def test_a_jsonl_mask_that_is_not_a_file_name_is_skipped(tmp_path, mask):
    root = tmp_path / "data"
    path = _manifest(root, [{"image": "a.png", "concept": "cat"}], "jsonl")
    with open(path, "a") as handle:
        handle.write(json.dumps({"image": "b.png", "concept": "dog", "mask": mask}) + "\n")
    dataset = ManifestDataset(path)
    assert dataset.skipped.counts == {"rows whose mask is not a file name": 1}
    assert dataset.concepts == ["cat"]  # not a whole-image 'dog'


# --- Visual Genome --------------------------------------------------------------------------


def _genome(root: Path, urls: dict[int, str], objects: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, url in urls.items():
        _image(root / "VG_100K" / f"{image_id}.jpg")
        entries.append({"image_id": image_id, "url": url, "width": 32, "height": 24})
    if objects is None:
        objects = [{"image_id": i, "objects": [{"x": 1, "y": 1, "w": 8, "h": 8, "synsets": ["dog.n.01"], "names": ["dog"]}]}
                   for i in urls]
    (root / "image_data.json").write_text(json.dumps(entries))
    (root / "objects.json").write_text(json.dumps(objects))
    return root


@pytest.mark.parametrize("exists", [True, False])
def test_visual_genome_urls_leading_outside_are_refused(tmp_path, exists):
    if exists:
        _image(tmp_path / "secret.png")  # what the url's last two parts name from the image folder
    root = _genome(tmp_path / "vg", {1: "https://x/VG_100K/1.jpg", 2: "https://x/../secret.png"})
    with pytest.raises(LaviseError, match=r"image_data\.json'") as error:
        VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    assert _refusal(error) == (1, "../secret.png (image_id=2)")


def test_visual_genome_link_leading_outside_is_refused_unless_allowed(tmp_path):
    secret = _secret(tmp_path)
    root = _genome(tmp_path / "vg", {1: "https://x/VG_100K/1.jpg", 2: "https://x/VG_100K/2.jpg"})
    (root / "VG_100K" / "2.jpg").unlink()
    (root / "VG_100K" / "2.jpg").symlink_to(secret)
    with pytest.raises(LaviseError) as error:
        VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    assert _refusal(error) == (1, "VG_100K/2.jpg (image_id=2)")
    dataset = open_reference(root, settings=ReferenceSettings(min_images=1, allow_outside_root=True), cache_dir=tmp_path / "cache")
    assert len(dataset) == 2


@pytest.mark.parametrize(
    ("objects", "reason"),
    [
        ([{"image_id": True, "objects": []}], "objects.json entries of images not in image_data.json"),
        ([{"image_id": 1, "objects": 5}], "objects.json entries whose objects is not a list"),
        ([{"image_id": 1, "objects": {"x": 1}}], "objects.json entries whose objects is not a list"),
        ([{"image_id": 1, "objects": [{"x": 1, "y": 1, "w": 8, "h": 8, "synsets": "dog.n.01"}]}], "objects without a synset or name"),
        ([{"image_id": 1, "objects": [{"x": 1, "y": 1, "w": 8, "h": 8, "names": "dog"}]}], "objects without a synset or name"),
    ],
)
def test_visual_genome_fields_of_the_wrong_type_are_counted(tmp_path, objects, reason):
    good = {"image_id": 2, "objects": [{"x": 1, "y": 1, "w": 8, "h": 8, "synsets": ["cat.n.01"]}]}
    root = _genome(tmp_path / "vg", {1: "https://x/VG_100K/1.jpg", 2: "https://x/VG_100K/2.jpg"}, [*objects, good])
    dataset = VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    assert dataset.skipped.counts[reason] == 1
    assert dataset.concepts == ["cat"]  # a string synset is not its first letter's concept 'd'


def test_visual_genome_boolean_image_ids_are_not_ids(tmp_path):
    root = _genome(tmp_path / "vg", {2: "https://x/VG_100K/2.jpg"})
    data = json.loads((root / "image_data.json").read_text())
    data.append({"image_id": True, "url": "https://x/VG_100K/1.jpg", "width": 32, "height": 24})
    (root / "image_data.json").write_text(json.dumps(data))
    dataset = VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    assert dataset.skipped.counts["image_data.json entries without an image_id, width and height"] == 1


# --- Broden ---------------------------------------------------------------------------------


def _broden(root: Path, rows: list[list[object]]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    _image(root / "images" / "a.jpg")
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "ih", "iw", "sh", "sw", "object", "scene"])
        writer.writerows(rows)
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category"])
        writer.writerows([[1, "dog", "object(1)"], [2, "street-s", "scene(1)"]])
    return root


@pytest.mark.parametrize("exists", [True, False])
def test_broden_images_and_label_maps_outside_are_refused(tmp_path, exists):
    secret = _secret(tmp_path, exists)
    root = _broden(tmp_path / "broden", [
        ["a.jpg", "train", 24, 32, 24, 32, "", "2"],
        ["../../outside/secret.png", "train", 24, 32, 24, 32, "", "2"],
        ["a.jpg", "val", 24, 32, 24, 32, str(secret), ""],  # listed twice: skipped before the rule
        [str(secret), "val", 24, 32, 24, 32, "../../outside/secret.png", ""],
    ])
    with pytest.raises(LaviseError, match=r"index\.csv'") as error:
        BrodenDataset(root)
    count, examples = _refusal(error)
    assert count == 3 and "../../outside/secret.png (line 3)" in examples and f"{secret} (line 5)" in examples


def test_broden_paths_outside_are_read_when_allowed(tmp_path):
    _secret(tmp_path)
    root = _broden(tmp_path / "broden", [["a.jpg", "train", 24, 32, 24, 32, "", "2"],
                                         ["../../outside/secret.png", "train", 24, 32, 24, 32, "", "2"]])
    assert len(open_reference(root, settings=ALLOWED)) == 2


@pytest.mark.parametrize("size", [(0, 32, 24, 32), (24, -32, 24, 32), (24, 32, "x", 32), (24, 32, 24, "")])
def test_broden_sizes_that_are_not_positive_whole_numbers_are_counted(tmp_path, size):
    _image(tmp_path / "broden" / "images" / "b.jpg")
    root = _broden(tmp_path / "broden", [["a.jpg", "train", 24, 32, 24, 32, "", "2"], ["b.jpg", "train", *size, "", "2"]])
    dataset = BrodenDataset(root)
    assert dataset.skipped.counts == {"index.csv rows whose ih, iw, sh or sw is not a positive whole number": 1}
    assert len(dataset) == 1


# --- folders --------------------------------------------------------------------------------


def test_folder_links_leading_outside_are_refused_unless_allowed(tmp_path):
    secret = _secret(tmp_path)
    _image(tmp_path / "elsewhere" / "cat" / "1.png")
    root = tmp_path / "ref"
    _image(root / "dog" / "1.png")
    (root / "dog" / "2.png").symlink_to(secret)
    (root / "dog" / "3.png").symlink_to(root / "dog" / "1.png")  # inside: fine
    (root / "cat").symlink_to(tmp_path / "elsewhere" / "cat")
    with pytest.raises(LaviseError, match=r"Reference folder '.*ref' \(through symbolic links\)") as error:
        FolderDataset(root)
    assert _refusal(error) == (2, "cat (a class folder), dog/2.png (a symbolic link)")
    dataset = open_reference(root, format="folder", settings=ALLOWED)
    assert dataset.concepts == ["cat", "dog"] and len(dataset) == 4


def test_group_lists_follow_the_same_rule(tmp_path):
    secret = _secret(tmp_path)
    root = tmp_path / "t"
    for group in ("x", "y"):
        _image(root / group / "1.png")
    (root / "x" / "2.png").symlink_to(secret)
    with pytest.raises(LaviseError, match=r"lists 2 images outside the target folder .*Nothing was read"):
        read_groups(root, {"x": ["x/1.png", "x/2.png"], "y": ["y/1.png", "../outside/secret.png"]})


@pytest.mark.parametrize(("width", "height"), [("abc", "24"), ("0", "24"), ("32", "-24"), ("32", ""), ("32.5", "24"), ("nan", "24")])
def test_a_manifest_size_that_is_not_whole_and_positive_is_counted(tmp_path, width, height):
    root = tmp_path / "data"
    _image(root / "a.png")
    path = root / "list.csv"
    path.write_text(f"image,concept,box,width,height\na.png,cat,1 1 8 8,{width},{height}\na.png,dog,2 2 8 8,,\n")
    dataset = ManifestDataset(path)
    assert dataset.skipped.counts == {"declared sizes that are not a positive whole width and height (the file's was used)": 1}
    concepts, masks = dataset.masks(0, (32, 24))  # the file's size was used
    assert concepts == [0, 1] and masks.shape == (2, 24, 32)


def test_a_manifest_size_given_right_is_used(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png")
    path = root / "list.jsonl"
    path.write_text(json.dumps({"image": "a.png", "concept": "cat", "box": [1, 1, 8, 8], "width": 32.0, "height": 24}) + "\n")
    dataset = ManifestDataset(path)
    assert not dataset.skipped and dataset.masks(0, (32, 24))[1].sum() == 64


@pytest.mark.parametrize("value", [True, "12", None, [1]])
def test_visual_genome_coordinates_that_are_not_numbers_are_counted(tmp_path, value):
    objects = [{"image_id": 1, "objects": [{"x": value, "y": 1, "w": 8, "h": 8, "synsets": ["dog.n.01"]},
                                           {"x": 1, "y": 1, "w": 8, "h": 8, "synsets": ["cat.n.01"]}]}]
    root = _genome(tmp_path / "vg", {1: "https://x/VG_100K/1.jpg"}, objects)
    dataset = VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    assert dataset.skipped.counts["objects without a numeric x, y, w, h"] == 1 and dataset.concepts == ["cat"]


def test_broden_label_numbers_a_map_cannot_hold_are_refused(tmp_path):
    root = _broden(tmp_path / "broden", [["a.jpg", "train", 24, 32, 24, 32, "", "2"]])
    with open(root / "label.csv", "a", newline="") as handle:
        csv.writer(handle).writerow([10**12, "huge", "object(1)"])
    with pytest.raises(LaviseError, match=r"label\.csv' line 4: label number 1000000000000 is over 65535"):
        BrodenDataset(root)


def test_broden_sizes_too_large_to_hold_are_counted(tmp_path):
    _image(tmp_path / "broden" / "images" / "b.jpg")
    root = _broden(tmp_path / "broden", [["a.jpg", "train", 24, 32, 24, 32, "", "2"],
                                         ["b.jpg", "train", 10**30, 32, 24, 32, "", "2"]])
    assert BrodenDataset(root).skipped.counts == {"index.csv rows whose ih, iw, sh or sw is not a positive whole number": 1}


@pytest.mark.parametrize("huge", [2**31, 10**30, 1e308])
def test_sizes_too_large_to_hold_are_not_a_crash(tmp_path, huge):
    root = _genome(tmp_path / "vg", {1: "https://x/VG_100K/1.jpg", 2: "https://x/VG_100K/2.jpg"})
    data = json.loads((root / "image_data.json").read_text())
    data[0]["width"] = huge
    (root / "image_data.json").write_text(json.dumps(data))
    try:
        dataset = VisualGenomeDataset(root, min_images=1, cache_dir=tmp_path / "cache")
    except LaviseError as error:  # ijson's C parser stops at an integer over 64 bits, naming the file
        assert huge == 10**30 and "image_data.json' is not a valid JSON list of entries" in str(error)
    else:
        assert dataset.skipped.counts["image_data.json entries without an image_id, width and height"] == 1
    path = tmp_path / "data" / "list.jsonl"
    _image(path.parent / "a.png")
    path.write_text(json.dumps({"image": "a.png", "concept": "cat", "box": [1, 1, 4, 4], "width": huge, "height": 24}) + "\n")
    assert ManifestDataset(path).skipped.counts == {
        "declared sizes that are not a positive whole width and height (the file's was used)": 1}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": 5, "concept": "dog"}, "rows without an image or a concept"),
        ({"image": ["b.png"], "concept": "dog"}, "rows without an image or a concept"),
        ({"image": "b.png", "concept": 7}, "rows without an image or a concept"),
        ({"image": "b.png", "concept": None}, "rows without an image or a concept"),
        ({"image": "b.png", "concept": "   "}, "rows without an image or a concept"),
        ({"concept": "dog"}, "rows without an image or a concept"),
        ({"image": "b.png", "concept": "dog", "box": [1, 2, None, 4]}, "rows whose box is not four numbers x, y, w, h"),
        ({"image": "b.png", "concept": "dog", "box": [1, 2, True, 4]}, "rows whose box is not four numbers x, y, w, h"),
        ({"image": "b.png", "concept": "dog", "box": {"x": 1}}, "rows whose box is not four numbers x, y, w, h"),
        ({"image": "b.png", "concept": "dog", "box": "1 2 3"}, "rows whose box is not four numbers x, y, w, h"),
        ({"image": "b.png", "concept": "dog", "box": [1, 2, 3, 4], "mask": "m.png"}, "rows with both a box and a mask"),
        ({"image": "c.png", "concept": "dog"}, "rows whose image file is missing"),
        ({"image": "b.png", "concept": "dog", "mask": "absent.png"}, "rows whose mask file is missing"),
        ([1, 2], "lines that are not a JSON object"),
        ("{not json", "lines that are not valid JSON"),
    ],
)
def test_every_manifest_field_of_the_wrong_type_is_counted(tmp_path, row, reason):
    path = _manifest(tmp_path / "data", [{"image": "a.png", "concept": "cat"}], "jsonl")
    with open(path, "a") as handle:
        handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    dataset = ManifestDataset(path)
    assert dataset.skipped.counts == {reason: 1} and dataset.concepts == ["cat"]
