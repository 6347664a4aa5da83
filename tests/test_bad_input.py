"""Bad input: odd and broken images, broken annotations, missing things, interrupted writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lavise.storage
from lavise.datasets import BadImage, CocoDataset, ImageFiles, LaviseWarning, load_rgb, open_reference
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.runs import load_run, train
from lavise.settings import ExplainSettings, TrainSettings
from lavise.storage import save_tensors, write_csv, write_json

ONE_EPOCH = TrainSettings(epochs=1, survey_images=0)  # the reference data's own warnings, no survey's


def _noise(size=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- load_rgb ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("CMYK", ".jpg"), ("P", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("I;16", ".png"), ("1", ".png"), ("RGB", ".webp")],
)
def test_odd_modes_load_as_rgb(tmp_path, mode, suffix):
    base = Image.fromarray(_noise((20, 10)))
    if mode == "I;16":
        image = Image.fromarray((np.arange(200, dtype=np.uint16).reshape(10, 20) * 300))
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith(mode[0])  # really saved in that mode
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    if mode == "I;16":  # 16-bit is stretched to the full 8-bit range
        pixels = np.asarray(loaded)
        assert pixels.min() == 0 and pixels.max() == 255


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # transparent
    rgba[1, 1, 3] = 255  # opaque red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[1, 1]) == (200, 0, 0)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((2, 2), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_rgb(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[2, 2]) == (200, 100, 50)


@pytest.mark.parametrize("kind", ["truncated png", "truncated jpeg", "text", "empty", "missing"])
def test_unusable_files_raise_bad_image(tmp_path, kind):
    path = tmp_path / ("x.jpg" if "jpeg" in kind else "x.png")
    if kind.startswith("truncated"):
        Image.fromarray(_noise()).save(path)
        _truncate(path)
    elif kind == "text":
        path.write_text("this is not a picture")
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(BadImage, match={"missing": "file not found", "text": "not an image file", "empty": "not an image file"}.get(kind, "unreadable")):
        load_rgb(path)


# --- a COCO reference with every kind of problem -----------------------------------------


def _categories_of(data: dict, image_id: int) -> set[int]:
    return {a["category_id"] for a in data["annotations"] if a["image_id"] == image_id}


def _broken_coco(root: Path, coco_maker) -> Path:
    """12 images: 4 unusable, 4 in odd modes, 4 plain; plus annotations that must be skipped."""
    path = coco_maker(root, images=12)
    images = root / "images"
    data = json.loads(path.read_text())
    _truncate(images / "0000.png")
    (images / "0001.png").write_text("<html>not an image</html>")
    Image.open(images / "0002.png").convert("L").save(images / "0002.png")
    Image.open(images / "0003.png").convert("CMYK").save(images / "0003.jpg")
    (images / "0003.png").unlink()
    data["images"][3]["file_name"] = "0003.jpg"
    Image.open(images / "0004.png").convert("P").save(images / "0004.png", transparency=0)
    rgba = Image.open(images / "0005.png").convert("RGBA")
    rgba.putalpha(128)
    rgba.save(images / "0005.png")
    (images / "0006.png").unlink()
    Image.open(images / "0007.png").resize((80, 80)).save(images / "0007.png")  # JSON: 64x64

    def extra(image_id: int, **fields) -> None:
        free = min({1, 2, 3, 4} - _categories_of(data, image_id))  # a concept not yet there
        data["annotations"].append({
            "id": 1000 + len(data["annotations"]), "image_id": image_id, "category_id": free,
            "iscrowd": 0, "area": 0.0, "bbox": [0, 0, 0, 0], **fields,
        })

    extra(9, segmentation=[[10, 10, 10, 10, 10, 10]])  # a polygon of zero area
    extra(10, segmentation={"size": [64, 64], "counts": [64 * 64]})  # an RLE of zeros
    extra(11, segmentation=[[70, 70, 90, 70, 90, 90, 70, 90]])  # a polygon outside the image
    extra(12, segmentation=[], bbox=[100, 100, 10, 10])  # a box outside the image
    extra(9, segmentation=[[1, 2]], category_id=1)  # malformed: pycocotools cannot decode these
    extra(10, segmentation=[[]], category_id=1)
    extra(11, segmentation={"size": [32, 32], "counts": [1024]}, category_id=1)  # RLE of another size
    extra(9, segmentation=[[1, 1, 9, 1, 9, 9]], category_id=77)  # unknown category
    extra(9, segmentation=[[1, 1, 9, 1, 9, 9]], category_id=78)
    extra(99, segmentation=[[1, 1, 9, 1, 9, 9]], category_id=1)  # unknown image
    extra(9, segmentation=[], bbox=[], category_id=1)  # neither mask nor box
    path.write_text(json.dumps(data))
    return path


def _line(messages: list[str], pattern: str) -> str:
    found = [m for m in messages if re.search(pattern, m)]
    assert len(found) == 1, (pattern, "\n".join(messages))
    return found[0]


def test_reference_problems_are_skipped_and_counted(tmp_path, coco_maker, tiny_model, compute):
    path = _broken_coco(tmp_path / "ref", coco_maker)
    with pytest.warns(LaviseWarning) as record:
        reference = open_reference(path)
        run = train(tiny_model, "features.3", reference, tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in record if issubclass(w.category, LaviseWarning)]
    assert all(m.startswith(f"reference {reference.root}: skipped ") for m in messages), messages

    unreadable = _line(messages, r"skipped 2 unreadable images")  # one count per reason
    assert "0000.png (unreadable (image file is truncated" in unreadable
    assert "0001.png (not an image file Pillow can read)" in unreadable
    assert "0006.png" in _line(messages, r"skipped 1 annotated images whose file is missing")
    assert "0007.png (image is 80x80 but the annotations say 64x64)" in _line(messages, r"skipped 1 images whose annotations do not fit")
    zero = _line(messages, r"skipped 4 concept masks of zero area after resize and crop")
    assert all(f"{n:04d}.png" in zero for n in (8, 9, 10, 11))  # image ids 9..12
    assert "category_id=77" in _line(messages, r"skipped 2 annotations of unknown categories")
    assert "image_id=99" in _line(messages, r"skipped 1 annotations of unknown images")
    _line(messages, r"skipped 2 annotations with a malformed segmentation")
    _line(messages, r"skipped 1 annotations whose RLE size differs from their image's height and width")
    _line(messages, r"skipped 1 annotations without a mask or box")
    assert len(messages) == 9  # two kinds of unreadable file share one line

    # the odd modes (grey, CMYK JPEG, palette with transparency, RGBA) were used
    skipped_text = json.dumps(run.config["skipped"])
    assert not any(name in skipped_text for name in ("0002", "0003", "0004", "0005"))
    assert run.config["training_pairs"] == 8 * 2  # 12 images, 4 unusable, 2 concepts each
    assert run.config["skipped"]["annotations of unknown categories"]["count"] == 2


def test_the_skip_report_survives_the_cache(tmp_path, coco_maker, tiny_model, compute):
    path = _broken_coco(tmp_path / "ref", coco_maker)
    runs, reports = [], []
    for name in ("a", "b"):
        with pytest.warns(LaviseWarning) as record:
            runs.append(train(tiny_model, "features.3", open_reference(path), tmp_path / name, settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache"))
        reports.append(sorted(str(w.message) for w in record if issubclass(w.category, LaviseWarning)))
    assert len(reports[0]) == 9 and reports[1] == reports[0]  # the second run read the cache
    assert runs[0].config["skipped"] == runs[1].config["skipped"]


def test_reference_without_usable_images(tmp_path, coco_maker, tiny_model, compute):
    path = coco_maker(tmp_path / "ref", images=3)
    for image in (tmp_path / "ref" / "images").glob("*.png"):
        image.write_text("nope")
    with pytest.raises(LaviseError, match=r"No usable reference image in .*skipped 3 unreadable images .*not an image file"):
        train(tiny_model, "features.3", open_reference(path), tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run").exists()


def test_coco_files_that_are_not_coco(tmp_path, coco):
    images = coco.parent / "images"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LaviseError, match="is not valid JSON"):
        CocoDataset(bad, images)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(LaviseError, match="not a COCO instances file: no annotations, categories"):
        CocoDataset(bad, images)
    with pytest.raises(LaviseError, match="does not exist"):
        CocoDataset(tmp_path / "missing.json", images)
    with pytest.raises(LaviseError, match="image folder .* does not exist"):
        CocoDataset(coco, tmp_path / "no-images")
    empty = tmp_path / "empty-images"
    empty.mkdir()
    with pytest.raises(LaviseError, match="No annotated image of"):
        CocoDataset(coco, empty)


def test_unknown_layer_is_a_lavise_error(tmp_path, coco, tiny_model, compute):
    with pytest.raises(LaviseError, match=r"Layer 'features\.9' not found.*features\.3"):
        train(tiny_model, "features.9", open_reference(coco), tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")


def test_non_convolutional_layer_in_training(tmp_path, coco, tiny_model, compute):
    with pytest.raises(LaviseError, match=r"'head.2' outputs \(1, 3\)"):
        train(tiny_model, "head.2", open_reference(coco), tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")
    assert not tiny_model.module.head[2]._forward_hooks


# --- targets -----------------------------------------------------------------------------


def test_empty_target_folder_is_a_lavise_error_naming_it(tmp_path, tiny_run, tiny_model, compute):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(LaviseError, match=re.escape(f"Target folder '{empty}' holds no image files")):
        explain(tiny_run, empty, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    with pytest.raises(LaviseError, match=re.escape(f"Target folder '{tmp_path / 'nope'}' does not exist")):
        ImageFiles(tmp_path / "nope")


def test_broken_target_images_are_skipped(tmp_path, tiny_run, tiny_model, targets, compute):
    _truncate(targets / "0004.png")
    (targets / "0005.png").write_text("not an image")
    Image.open(targets / "0006.png").convert("CMYK").save(targets / "0006.jpg")
    settings = ExplainSettings(top_images=10, vocabulary_size=1000)
    with pytest.warns(LaviseWarning) as record:
        result = explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in record]
    unreadable = _line(messages, rf"^target {re.escape(str(targets))}: skipped 2 unreadable images")
    assert "0004.png (unreadable" in unreadable and "0005.png (not an image file" in unreadable
    used = {name for f in result.filters for name in f.top_images}
    assert "0006.jpg" in used and not {"0004.png", "0005.png"} & used
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    assert data["target"]["images"] == 11  # 13 files, 2 unusable


def test_target_folder_without_usable_images(tmp_path, tiny_run, tiny_model, compute):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_text("no")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(LaviseError, match=rf"No usable target image in '{re.escape(str(folder))}'"):
        explain(tiny_run, folder, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")


# --- interrupted writes ------------------------------------------------------------------


def test_a_failed_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "result.json"
    write_json(path, {"version": 1})

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lavise.storage.json, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_json(path, {"version": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_a_failed_csv_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, ["a"], [[1], [2]])

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format")

    rows = [[i] for i in range(5000)] + [[Unprintable()]]  # fails after writing a lot
    with pytest.raises(RuntimeError, match="cannot format"):
        write_csv(path, ["a"], rows)
    assert path.read_text().splitlines() == ["a", "1", "2"]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_failed_tensor_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.ones(3)})

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("interrupted")

    monkeypatch.setattr(lavise.storage, "save_file", half_then_fail)
    with pytest.raises(OSError, match="interrupted"):
        save_tensors(path, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(lavise.storage.load_tensors(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_a_run_interrupted_while_writing_keeps_the_previous_run(tmp_path, coco, tiny_model, compute, monkeypatch):
    run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    real = lavise.storage.json.dumps

    def fail_on_config(data, *args, **kwargs):
        if isinstance(data, dict) and "feature_shape" in data:
            raise RuntimeError("killed")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(lavise.storage.json, "dumps", fail_on_config)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_model, "features.3", open_reference(coco), run.path, settings=TrainSettings(epochs=2), compute=compute, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    # the new files were staged and thrown away: the old run is there, byte for byte
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before
    assert load_run(run.path).config["train"]["epochs"] == 1
