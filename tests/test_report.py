"""The HTML report: thumbnails and regions, the page's data, reuse, safety, bad input, CLI.

The page itself is driven in a real browser in ``test_report_browser.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import lavise.report
from lavise.cli import main
from lavise.datasets import LaviseWarning, load_rgb
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.explainer import ExplainerHead
from lavise.models import Preprocessing, layer_reader, preprocess_image
from lavise.report import write_report
from lavise.report.thumbnails import (
    DIM,
    OUTLINE,
    crop_box,
    load_thumbnail,
    overlay_regions,
    region_masks,
    region_outlines,
)
from lavise.settings import ExplainSettings, ReportSettings, TrainSettings
from lavise.storage import save_tensors

# Small vocabularies leave some concept names out; that warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

TOP = 4


def read_data(report: Path) -> dict:
    """The page's data, as the browser gets it from data.js."""
    text = (report / "data.js").read_text(encoding="utf-8")
    prefix, suffix = "window.LAVISE_REPORT = JSON.parse(", ");\n"
    assert text.startswith(prefix) and text.endswith(suffix)
    return json.loads(json.loads(text[len(prefix) : -len(suffix)]))


@pytest.fixture
def explained(tmp_path, tiny_run, tiny_model, targets, compute) -> Path:
    settings = ExplainSettings(top_images=TOP, words_per_image=3, top_words=5, vocabulary_size=2000)
    explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    return tiny_run.path


WORDS = ["harbor", "lighthouse", "meadow", "violin", "castle", "glacier", "bakery", "comet"]


@pytest.fixture
def made_run(tmp_path, tiny_model, targets) -> Path:
    """A run directory written here in the format of 'lavise train' and 'explain'.

    Filter u is named WORDS[u] (then "red", "blue"), and shows 4 of the target images;
    its threshold is the median of its map over those, so regions are large.
    """
    run = tmp_path / "made-run"
    run.mkdir()
    head = ExplainerHead(8, 50, 0.1)
    save_tensors(run / "explainer.safetensors", head.state_dict())
    (run / "config.json").write_text(json.dumps({
        "lavise_version": "0.1.0", "model": tiny_model.description,
        "preprocessing": tiny_model.preprocessing.to_dict(), "layer": "features.3",
        "reference": {"description": f"CocoDataset(annotations='{tmp_path}/coco/annotations.json', "
                                     f"root='{tmp_path}/coco/images', images=24, concepts=4)", "identity": {}},
        "word_vectors": "glove-6b-50d", "word_dim": 50, "train": TrainSettings().to_dict(),
        "feature_shape": [8, 8, 8], "training_pairs": 40, "best_epoch": 1, "skipped": {},
    }))
    (run / "split.json").write_text(json.dumps({"seen": ["circle", "square"], "unseen": ["triangle"]}))
    names = sorted(p.name for p in targets.glob("*.png"))
    filters = []
    for u in range(8):
        chosen = [names[(u + k * 3) % len(names)] for k in range(TOP)]
        batch = torch.stack([preprocess_image(load_rgb(targets / n), tiny_model.preprocessing) for n in chosen])
        with layer_reader(tiny_model.module, "features.3") as read, torch.no_grad():
            threshold = float(read(batch)[:, u].median())
        filters.append({"filter": u, "words": [{"word": WORDS[u], "count": 4, "first": 3},
                                               {"word": "red", "count": 2, "first": 1},
                                               {"word": "blue", "count": 1, "first": 0}],
                        "top_images": chosen, "threshold": threshold, "active": True})
    (run / "explanations.json").write_text(json.dumps({
        "model": "tiny", "layer": "features.3", "method": "attention", "model_spec": tiny_model.description,
        "settings": ExplainSettings(top_images=TOP).to_dict(),
        "vocabulary": {"word_vectors": "glove-6b-50d", "words": 2000},
        "target": {"root": str(targets), "images": 12, "skipped": {}}, "filters": filters,
    }))
    return run


@pytest.fixture
def build(tmp_path, tiny_model, compute):
    def build(run: Path, **options) -> Path:
        options.setdefault("model", tiny_model)
        return write_report(run, cache_dir=tmp_path / "cache", compute=compute, **options)

    return build


def jpeg_difference(path: Path, expected: np.ndarray) -> float:
    """Mean difference of 8x8 block means between a JPEG and the picture it should hold.

    Block means are what JPEG keeps; the target images' pixel noise it does not.
    """
    got = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    size = got.shape[0]

    def blocks(a):
        return np.asarray(a, dtype=float).reshape(size // 8, 8, size // 8, 8, 3).mean(axis=(1, 3))

    return float(np.abs(blocks(got) - blocks(expected)).mean())


def thumbnail_times(report: Path) -> dict[str, int]:
    return {str(p.relative_to(report)): p.stat().st_mtime_ns for p in (report / "thumbs").rglob("*.jpg")}


# --- the pure parts ------------------------------------------------------------------------


def test_thumbnail_is_the_crop_the_network_sees(tmp_path):
    # Smooth gradients: red follows x, green follows y, so a misplaced crop shows.
    yy, xx = np.mgrid[0:80, 0:120]
    pixels = np.stack([xx * 2, yy * 3, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    preprocessing = Preprocessing(resize_size=40, crop_size=32)
    got = load_thumbnail(path, preprocessing, 32).astype(float)
    seen = TF.center_crop(TF.resize(TF.pil_to_tensor(load_rgb(path)), [40], antialias=True), [32])
    expected = seen.permute(1, 2, 0).numpy().astype(float)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - expected).mean() < 2.0
    # 80 px resized to 40 and 32 cut from the middle: the middle 64x64 square of the original
    assert crop_box(120, 80, preprocessing) == (28.0, 8.0, 92.0, 72.0)
    assert 55 <= got[:, 0, 0].mean() <= 61 and 179 <= got[:, -1, 0].mean() <= 185  # red = 2x


def test_region_outlines_by_hand():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 1:5, 1:5] = True
    ring = mask.clone()
    ring[0, 2:4, 2:4] = False  # the 2x2 inside touches no outside pixel
    assert torch.equal(region_outlines(mask), ring)
    full = torch.ones(2, 4, 4, dtype=torch.bool)  # the picture's edge is no region edge
    assert not region_outlines(full).any()
    corner = torch.zeros(1, 4, 4, dtype=torch.bool)
    corner[0, 0, 0] = True  # a single pixel is all outline; diagonal neighbours count
    assert torch.equal(region_outlines(corner), corner)


def test_overlay_by_hand():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (1, 2, 2): only the top-left cell fires
    images = torch.full((1, 8, 8, 3), 200, dtype=torch.uint8)
    out = overlay_regions(images, maps, torch.tensor([0.5]))
    mask = region_masks(maps, torch.tensor([0.5]), 8)[0]
    assert mask[0, 0] and mask[:4, :4].sum() >= 4
    assert not mask[4:].any() and not mask[:, 4:].any()
    dimmed = round(200 * DIM)
    assert (out[0][~mask] == dimmed).all()
    inner = mask & ~region_outlines(mask[None])[0]
    assert (out[0][inner] == 200).all()
    assert (out[0][region_outlines(mask[None])[0]] == torch.tensor(OUTLINE, dtype=torch.uint8)).all()


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample one (h, w) map to (size, size), pixel centres aligned, edges clamped."""
    h, w = grid.shape
    out = np.zeros((size, size), np.float32)
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * h / size - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / size - 0.5, 0), w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0, x1] * (1 - fy) * fx
                + grid[y1, x0] * fy * (1 - fx) + grid[y1, x1] * fy * fx
            )
    return out


def _overlay_one(image: np.ndarray, grid: np.ndarray, threshold: float) -> np.ndarray:
    """The region drawing for one image, pixel by pixel."""
    size = image.shape[0]
    mask = _bilinear(grid, size) > threshold
    out = image.copy()
    for i in range(size):
        for j in range(size):
            if not mask[i, j]:
                out[i, j] = np.round(image[i, j].astype(np.float32) * np.float32(DIM))
                continue
            neighbours = [
                mask[a, b]
                for a in range(max(i - 1, 0), min(i + 2, size))
                for b in range(max(j - 1, 0), min(j + 2, size))
            ]
            if not all(neighbours):
                out[i, j] = OUTLINE
    return out


def test_overlay_batched_equals_one_at_a_time():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(6, 3, 5, generator=generator)  # non-square grids
    images = torch.randint(0, 256, (6, 12, 12, 3), generator=generator, dtype=torch.uint8)
    thresholds = torch.quantile(maps.flatten(1), 0.7, dim=1)
    got = overlay_regions(images, maps, thresholds)
    for p in range(6):
        expected = _overlay_one(images[p].numpy(), maps[p].numpy(), float(thresholds[p]))
        np.testing.assert_array_equal(got[p].numpy(), expected)
    assert (got != images).any()


# --- the report, end to end -------------------------------------------------------------


def test_report_end_to_end(explained, build, tiny_model, targets):
    index = build(explained)
    report = explained / "report"
    assert index == report / "index.html"
    for name in ("index.html", "data.js", "report.js", "report.css", "thumbs/manifest.json"):
        assert (report / name).is_file(), name
    page = index.read_text()
    assert "<title>tiny features.3 — lavise report</title>" in page
    assert '<script src="data.js"></script>' in page and "Content-Security-Policy" in page

    explanations = json.loads((explained / "explanations.json").read_text())
    data = read_data(report)
    assert (data["model"], data["layer"], data["method"]) == ("tiny", "features.3", "activation")
    assert data["evaluation"] is None and data["groups"] is None and data["score_name"] is None
    about = dict(data["about"])
    assert about["Model"] == "tiny (custom module)" and about["Layer"] == "features.3: 8 filters, grid 8×8"
    assert about["Target data"] == "images: 12 images"
    assert [f["filter"] for f in data["filters"]] == list(range(8))
    assert all(f["label_iou"] is not None for f in data["filters"])  # the run has a survey

    # maps of the target images, computed here without the report's code
    paths = sorted(targets.glob("*.png"))
    batch = torch.stack([preprocess_image(load_rgb(p), tiny_model.preprocessing) for p in paths])
    with layer_reader(tiny_model.module, "features.3") as read, torch.no_grad():
        maps = read(batch)
    names = [p.name for p in paths]
    for shown, source in zip(data["filters"], explanations["filters"], strict=True):
        assert shown["words"] == source["words"] and shown["threshold"] == pytest.approx(source["threshold"])
        assert [i["name"] for i in shown["images"]] == source["top_images"]
        assert len(shown["images"]) == TOP
        assert (shown["label"], shown["label_iou"]) == (source["label"], source["label_iou"])  # the run's survey's
        for rank, entry in enumerate(shown["images"]):
            assert entry["src"] == f"thumbs/{shown['filter']:04d}/{rank:02d}.jpg"
            with Image.open(report / entry["src"]) as thumb:
                assert (thumb.format, thumb.size) == ("JPEG", (128, 128))
        # the first thumbnail is that image with this filter's region over T_u drawn in
        u, row = shown["filter"], names.index(shown["images"][0]["name"])
        plain = torch.from_numpy(load_thumbnail(targets / names[row], tiny_model.preprocessing, 128))
        expected = overlay_regions(plain[None], maps[row, u][None], torch.tensor([source["threshold"]]))[0]
        assert jpeg_difference(report / shown["images"][0]["src"], expected.numpy()) < 2.0
        assert jpeg_difference(report / shown["images"][0]["src"], plain.numpy()) > 20.0  # mostly dimmed


def test_thumbnails_are_made_once(made_run, build, targets, monkeypatch):
    build(made_run)
    report = made_run / "report"
    before = thumbnail_times(report)
    assert len(before) == 8 * TOP

    def no_maps(*args, **kwargs):
        raise AssertionError("the target features were read although every thumbnail was up to date")

    with monkeypatch.context() as patch:
        patch.setattr(lavise.report, "_target_maps", no_maps)
        build(made_run)
    assert thumbnail_times(report) == before

    # a changed image: only the thumbnails of the filters that show it are made again
    data = read_data(report)
    changed = data["filters"][0]["images"][0]["name"]
    Image.new("RGB", (64, 64), (250, 250, 250)).save(targets / changed)
    build(made_run)
    after = thumbnail_times(report)
    remade = {name for name in after if after[name] != before[name]}
    showing = {f["filter"] for f in data["filters"] if changed in [i["name"] for i in f["images"]]}
    assert remade == {f"thumbs/{u:04d}/{r:02d}.jpg" for u in showing for r in range(TOP)}
    assert len(showing) < 8

    # other settings make them all again
    build(made_run, settings=ReportSettings(thumbnail_size=64))
    with Image.open(report / "thumbs/0003/00.jpg") as thumb:
        assert thumb.size == (64, 64)
    # a filter explained again with fewer top images leaves no thumbnail of a lost rank
    explanations = json.loads((made_run / "explanations.json").read_text())
    explanations["filters"][3]["top_images"] = explanations["filters"][3]["top_images"][:2]
    (made_run / "explanations.json").write_text(json.dumps(explanations))
    build(made_run)
    assert sorted(p.name for p in (report / "thumbs/0003").iterdir()) == ["00.jpg", "01.jpg"]


def test_without_overlays_no_model_is_needed(made_run, build, targets):
    with pytest.raises(LaviseError, match=r"custom module.*overlays=False \(--no-overlays\)"):
        build(made_run, model=None)
    build(made_run, model=None, settings=ReportSettings(overlays=False, thumbnail_size=64))
    data = read_data(made_run / "report")
    entry = data["filters"][2]["images"][1]
    plain = load_thumbnail(targets / entry["name"], Preprocessing(64, 64), 64)
    assert jpeg_difference(made_run / "report" / entry["src"], plain) < 2.0


def test_explanations_before_first_choice_counts_still_show(made_run, build):
    # lavise before 0.3 wrote no "first" count; such runs still make a report
    explanations = json.loads((made_run / "explanations.json").read_text())
    for f in explanations["filters"]:
        for w in f["words"]:
            w.pop("first", None)
    (made_run / "explanations.json").write_text(json.dumps(explanations))
    build(made_run, model=None, settings=ReportSettings(overlays=False, thumbnail_size=64))
    words = read_data(made_run / "report")["filters"][0]["words"]
    assert words == [{"word": w["word"], "count": w["count"], "first": None} for w in explanations["filters"][0]["words"]]


def test_no_absolute_paths_unless_asked(made_run, build, tmp_path, targets):
    build(made_run)
    report = made_run / "report"
    texts = [p for p in report.rglob("*") if p.is_file() and p.suffix != ".jpg"]
    assert {p.name for p in texts} >= {"index.html", "data.js", "manifest.json"}
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for secret in (str(tmp_path), str(tmp_path.resolve()), str(Path.home())):
            assert secret not in text, f"{secret} in {path}"
    build(made_run, settings=ReportSettings(absolute_paths=True))
    data = read_data(report)
    assert dict(data["about"])["Target data"] == f"{targets}: 12 images"


def test_missing_target_folder_gives_a_report_without_images(made_run, build, targets, tmp_path):
    build(made_run)
    report = made_run / "report"
    before = thumbnail_times(report)
    moved = tmp_path / "moved-targets"
    shutil.move(targets, moved)
    with pytest.warns(LaviseWarning, match=r"Target folder '.*' named in '.*explanations.json' does not exist any more: "
                      r"the report shows no images for its 8 filters; pass target= \(--target\)"):
        build(made_run)
    data = read_data(report)
    assert all(entry["src"] is None and entry["name"] for f in data["filters"] for entry in f["images"])
    build(made_run, target=moved)  # the images, moved with their times: nothing is redrawn
    data = read_data(report)
    assert all(entry["src"] for f in data["filters"] for entry in f["images"])
    assert thumbnail_times(report) == before
    with pytest.raises(LaviseError, match="Target folder '.*nowhere' \\(given as target\\) does not exist"):
        build(made_run, target=tmp_path / "nowhere")


def test_unusable_top_image_is_counted_and_left_out(made_run, build, targets):
    data_before = json.loads((made_run / "explanations.json").read_text())
    broken = data_before["filters"][0]["top_images"][0]
    (targets / broken).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(LaviseWarning, match=r"skipped 1 top images without target features .* \(e\.g\. " + broken):
        build(made_run)
    data = read_data(made_run / "report")
    slots = [entry for f in data["filters"] for entry in f["images"] if entry["name"] == broken]
    assert slots and all(entry["src"] is None for entry in slots)
    assert all(entry["src"] for f in data["filters"] for entry in f["images"] if entry["name"] != broken)


# --- evaluation and group comparison -----------------------------------------------------


def _evaluation(methods=("original", "attention")) -> dict:
    def result(value):
        return {"recall@5": value, "recall@10": value, "recall@20": value, "precision@1": value, "filters": 8,
                "seen": {"recall@5": value, "precision@1": value / 2}, "unseen": None, "lenient": {"recall@5": value},
                "unseen_only": {"filters": 2, "share": 0.25, "precision@1": 0.0}}

    filters = []
    for u in range(8):
        filters.append({
            "filter": u,
            "ground_truth": [{"concept": "circle", "iou": 0.3}, {"concept": "square", "iou": 0.1}] if u % 2 else [],
            "netdissect": {"concept": "circle", "iou": 0.3} if u % 2 else None,
            "methods": {m: {"words": ["circle", "red"], "recall@5": None if u == 3 else (u + i) / 10,
                            "recall@10": 0.5, "recall@20": 0.5, "precision@1": 0.0}
                        for i, m in enumerate(methods)},
        })
    return {"model": "tiny", "layer": "features.3", "dataset": {"root": "/private/data/eval", "description": "CocoDataset(root='/private/data/images', images=3)", "images": 3}, "settings": {},
            "methods": {m: result(0.25 + i / 10) for i, m in enumerate(methods)}, "filters": filters}


def _groups(names: list[str]) -> dict:
    ranking = [5, 2, 0, 1, 3, 4, 6, 7]
    return {
        "run": "run", "target": {}, "settings": {},
        "groups": [{"name": "indoor", "images": 6}, {"name": "outdoor", "images": 6}],
        "filters": [
            {"filter": u, "words": ["fed"], "qualified": {"indoor": 4 - r % 3, "outdoor": 1},
             "share": {"indoor": 0.6, "outdoor": 0.1}, "difference": 0.5 - r / 20, "ci": [0.1, 0.9],
             "p_value": 0.01 * (r + 1), "q_value": 0.02 * (r + 1),
             "examples": {"indoor": names[:3], "outdoor": names[3:5]}}
            for r, u in enumerate(ranking)
        ],
        "concepts": [{"word": "fed", "filters": [5, 2], "score": 1.5, "direction": "indoor"}],
        "chart": "groups.png",
    }


def test_evaluation_and_groups_are_shown(made_run, build, targets, tmp_path):
    names = sorted(p.name for p in targets.glob("*.png"))
    (made_run / "evaluation.json").write_text(json.dumps(_evaluation()))
    Image.new("RGB", (40, 30), (10, 200, 10)).save(made_run / "evaluation.png")
    (made_run / "groups.json").write_text(json.dumps(_groups(names)))
    Image.new("RGB", (40, 30), (200, 10, 10)).save(made_run / "groups.png")
    build(made_run, settings=ReportSettings(examples_per_group=2))
    report = made_run / "report"
    data = read_data(report)

    assert data["score_name"] == "recall@5 (attention)"  # the run's own method
    scores = [f["score"] for f in data["filters"]]
    assert scores[:3] == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)] and scores[3] is None
    one = data["filters"][1]["evaluation"]
    assert one["netdissect"] == {"concept": "circle", "iou": 0.3}
    assert [g["concept"] for g in one["ground_truth"]] == ["circle", "square"]
    assert [m["method"] for m in one["methods"]] == ["original", "attention"]
    page = data["evaluation"]
    assert [m["method"] for m in page["methods"]] == ["original", "attention"]
    assert page["methods"][1]["recall@5"] == pytest.approx(0.35) and page["methods"][1]["unseen recall@5"] is None
    assert page["methods"][1]["seen precision@1"] == pytest.approx(0.35 / 2) and page["methods"][1]["unseen only"] == 0.25
    assert page["dataset"] == [["root", "eval"], ["description", "CocoDataset(root='images', images=3)"], ["images", "3"]]
    assert (report / page["plot"]).read_bytes() == (made_run / "evaluation.png").read_bytes()

    groups = data["groups"]
    assert groups["ranking"] == [5, 2, 0, 1, 3, 4, 6, 7]
    assert [g["name"] for g in groups["groups"]] == ["indoor", "outdoor"]
    assert (report / groups["plot"]).read_bytes() == (made_run / "groups.png").read_bytes()
    five = data["filters"][5]["groups"]
    assert five["rank"] == 1 and five["ci"] == [0.1, 0.9] and five["q_value"] == pytest.approx(0.02)
    indoor = five["groups"][0]
    assert (indoor["group"], indoor["qualified"], indoor["share"]) == ("indoor", 4, 0.6)
    assert [e["name"] for e in indoor["examples"]] == names[:2]  # two per group, as asked
    for entry in indoor["examples"]:
        with Image.open(report / entry["src"]) as thumb:
            assert thumb.size == (128, 128)

    # examples come from the folder compare-groups recorded; gone, they are named only
    moved = _groups(names)
    moved["target"] = {"root": str(tmp_path / "gone")}
    (made_run / "groups.json").write_text(json.dumps(moved))
    with pytest.warns(LaviseWarning, match=r"target folder '.*gone' does not exist: its example images are shown by name only"):
        build(made_run)
    examples = read_data(report)["filters"][5]["groups"]["groups"][0]["examples"]
    assert [e["name"] for e in examples] == names[:3] and all(e["src"] is None for e in examples)

    # an evaluation without the run's method scores by its first method
    (made_run / "groups.json").unlink()
    (made_run / "evaluation.json").write_text(json.dumps(_evaluation(methods=("activation", "original"))))
    build(made_run)
    assert read_data(report)["score_name"] == "recall@5 (activation)"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not readable JSON"),
        ("[1, 2]", "holds list, not the JSON object of an evaluation"),
        ('{"filters": []}', "has no 'methods' table: is it from 'lavise evaluate'"),
        ('{"methods": {"attention": {}}, "filters": [{"filter": "one"}]}', r"filters\[0\] has no integer 'filter'"),
        ('{"layer": "features.1", "methods": {"attention": {}}, "filters": []}',
         "evaluates layer 'features.1' but the run explains 'features.3'"),
    ],
)
def test_bad_evaluation_file_is_named(made_run, build, content, message):
    (made_run / "evaluation.json").write_text(content)
    with pytest.raises(LaviseError, match=f"evaluation.json'.*{message}"):
        build(made_run)


def test_bad_input_is_named(made_run, build, tmp_path):
    with pytest.raises(LaviseError, match=r"'.*nowhere/config.json' does not exist: create the run with 'lavise train'"):
        build(tmp_path / "nowhere")
    with pytest.raises(LaviseError, match=r"groups.json' does not exist: run 'lavise compare-groups"):
        build(made_run, groups=tmp_path / "groups.json")
    (tmp_path / "groups.json").write_text('{"groups": [{"images": 3}], "filters": []}')
    with pytest.raises(LaviseError, match=r"has no 'groups' list of \{'name', 'images'\}"):
        build(made_run, groups=tmp_path / "groups.json")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LaviseError, match="Report folder '.*a-file' exists and is not a folder"):
        build(made_run, out=tmp_path / "a-file")
    for changes, message in [  # refused when the settings are built, before any work
        ({"thumbnail_size": 8}, "thumbnail_size must be between 16 and 1024, got 8"),
        ({"jpeg_quality": 100}, "jpeg_quality must be between 1 and 95, got 100"),
        ({"examples_per_group": -1}, "examples_per_group must be at least 0, got -1"),
    ]:
        with pytest.raises(LaviseError, match=message):
            build(made_run, settings=ReportSettings(**changes))
    data = json.loads((made_run / "explanations.json").read_text())
    data["filters"][2]["top_images"] = "0001.png"
    (made_run / "explanations.json").write_text(json.dumps(data))
    with pytest.raises(LaviseError, match=r"filters\[2\] \('filter' 2\) has malformed 'words' or 'top_images'"):
        build(made_run)
    (made_run / "explanations.json").unlink()
    with pytest.raises(LaviseError, match=r"explanations.json' does not exist: name the filters first with 'lavise explain"):
        build(made_run)


# --- command line ------------------------------------------------------------------------


def test_cli_report(made_run, tmp_path, capsys, monkeypatch):
    import warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = capsys.readouterr().out
    for option in ("RUN_DIR", "--out", "--target", "--evaluation", "--groups", "--thumbnail-size",
                   "(default: 128)", "--no-overlays", "--absolute-paths", "--cache-dir"):
        assert option in help_text, option

    assert main(["report", str(made_run), "--no-progress"]) == 2  # custom module: no overlays without it
    assert "--no-overlays" in capsys.readouterr().err
    out = tmp_path / "site"
    assert main(["report", str(made_run), "--out", str(out), "--no-overlays", "--thumbnail-size", "48", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed
    with Image.open(out / read_data(out)["filters"][0]["images"][0]["src"]) as thumb:
        assert thumb.size == (48, 48)
