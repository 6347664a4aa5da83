"""Visual Genome reader: synset merging, the image threshold, box geometry, the cached index."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lavise.datasets.visual_genome as vg
from lavise.datasets import VisualGenomeDataset, load_rgb, open_reference
from lavise.datasets.masks import BOX_CLIPPED, BOX_EMPTY, BOX_INSIDE, BOX_MALFORMED, BOX_OUTSIDE, box_masks, clip_boxes
from lavise.errors import LaviseError
from lavise.settings import ReferenceSettings


def write_visual_genome(root: Path, images: dict[int, tuple[int, int]], objects: list[dict], *, folder_of=None) -> Path:
    """Write ``image_data.json``, ``objects.json`` and the JPEGs as Visual Genome ships them.

    ``images`` maps image_id -> (width, height); ``objects`` is the objects.json list.
    """
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, (width, height) in images.items():
        folder = (folder_of or (lambda i: "VG_100K" if i % 2 else "VG_100K_2"))(image_id)
        (root / folder).mkdir(exist_ok=True)
        Image.new("RGB", (width, height), (image_id * 40 % 255, 90, 120)).save(root / folder / f"{image_id}.jpg")
        entries.append({
            "image_id": image_id, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
            "width": width, "height": height, "coco_id": None, "flickr_id": None,
        })
    (root / "image_data.json").write_text(json.dumps(entries))
    (root / "objects.json").write_text(json.dumps(objects))
    return root


def _obj(x, y, w, h, *, synsets=(), names=("thing",), old=False) -> dict:
    entry = {"object_id": 0, "x": x, "y": y, "w": w, "h": h, "synsets": list(synsets)}
    if old:
        entry["name"] = names[0]
    else:
        entry["names"] = list(names)
    return entry


def _open(root: Path, tmp_path: Path, **options) -> VisualGenomeDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opening never warns; skips are counted for later
        return VisualGenomeDataset(root, cache_dir=tmp_path / "cache", **options)


def _loop_box_masks(corners, groups, count, size):
    width, height = size
    out = np.zeros((count, height, width), np.uint8)
    for (x0, y0, x1, y1), g in zip(corners, groups):
        out[g, y0:y1, x0:x1] = 1
    return out


def test_boxes_land_on_the_right_pixels_of_wide_and_tall_images(tmp_path):
    root = write_visual_genome(
        tmp_path / "vg", {1: (40, 20), 2: (20, 40)},
        [
            {"image_id": 1, "objects": [_obj(30, 5, 8, 10, synsets=["dog.n.01"], names=["dog"])]},
            {"image_id": 2, "objects": [_obj(2, 30, 10, 6, synsets=["dog.n.01"], names=["puppy"])]},
        ],
    )
    dataset = _open(root, tmp_path, min_images=1)
    assert dataset.concepts == ["dog"]
    assert [dataset.image_path(i).relative_to(root).as_posix() for i in range(2)] == ["VG_100K/1.jpg", "VG_100K_2/2.jpg"]
    wide = load_rgb(dataset.image_path(0))
    concepts, masks = dataset.masks(0, wide.size)
    assert wide.size == (40, 20) and masks.shape == (1, 20, 40) and masks.dtype == np.uint8
    expected = np.zeros((20, 40), np.uint8)
    expected[5:15, 30:38] = 1  # rows are y (height), columns are x (width)
    np.testing.assert_array_equal(masks[0], expected)
    tall = load_rgb(dataset.image_path(1))
    concepts, masks = dataset.masks(1, tall.size)
    expected = np.zeros((40, 20), np.uint8)
    expected[30:36, 2:12] = 1
    assert concepts == [0] and masks.shape == (1, 40, 20)
    np.testing.assert_array_equal(masks[0], expected)


def test_categories_merge_by_synset_fall_back_to_names_and_boxes_merge_per_image(tmp_path):
    objects = [
        {"image_id": 1, "objects": [
            _obj(0, 0, 4, 4, synsets=["dog.n.01"], names=["dog"]),
            _obj(6, 6, 4, 4, synsets=["dog.n.01"], names=["puppy"]),  # same synset, other name
            _obj(2, 8, 5, 2, names=["Street  Lamp"]),  # no synset: the name
            _obj(1, 1, 2, 2, synsets=["hot_dog.n.01"], names=["hotdog"], old=True),  # older "name"
        ]},
    ]
    dataset = _open(write_visual_genome(tmp_path / "vg", {1: (12, 12)}, objects), tmp_path, min_images=1)
    assert dataset.concepts == ["dog", "hot dog", "street lamp"]
    concepts, masks = dataset.masks(0, (12, 12))
    assert concepts == [0, 1, 2]
    dog = np.zeros((12, 12), np.uint8)
    dog[0:4, 0:4] = 1
    dog[6:10, 6:10] = 1  # two boxes, one mask
    np.testing.assert_array_equal(masks[0], dog)
    assert masks[1].sum() == 4 and masks[2][8:10, 2:7].all() and masks[2].sum() == 10


def test_threshold_counts_images_not_boxes(tmp_path):
    many_boxes = [_obj(i, 0, 1, 1, synsets=["kite.n.03"]) for i in range(5)]  # 5 boxes, 1 image
    objects = [
        {"image_id": 1, "objects": many_boxes + [_obj(0, 2, 3, 3, synsets=["tree.n.01"])]},
        {"image_id": 2, "objects": [_obj(0, 0, 3, 3, synsets=["tree.n.01"])]},
        {"image_id": 3, "objects": [_obj(0, 0, 3, 3, synsets=["kite.n.03"])]},
        {"image_id": 4, "objects": [_obj(0, 0, 3, 3, synsets=["car.n.01"])]},
    ]
    root = write_visual_genome(tmp_path / "vg", {i: (8, 8) for i in range(1, 5)}, objects)
    dataset = _open(root, tmp_path, min_images=2)
    assert dataset.concepts == ["kite", "tree"]  # kite: 2 images (6 boxes); car: 1 image -> dropped
    assert len(dataset) == 3  # image 4 held only the dropped car
    assert dataset.skipped.counts["categories in fewer than 2 images"] == 1
    assert dataset.skipped.examples["categories in fewer than 2 images"] == ["car.n.01"]
    assert dataset.skipped.counts["images left without a kept category"] == 1
    with pytest.raises(LaviseError, match=r"in at least 3 images \(the most frequent, 'kite.n.03', is in 2\); lower the threshold"):
        _open(root, tmp_path, min_images=3)


def test_a_shared_lemma_keeps_the_senses_apart(tmp_path):
    objects = [
        {"image_id": i, "objects": [_obj(0, 0, 2, 2, synsets=["bank.n.01"] if i <= 3 else ["bank.n.09"])]}
        for i in range(1, 6)
    ]
    dataset = _open(write_visual_genome(tmp_path / "vg", {i: (6, 6) for i in range(1, 6)}, objects), tmp_path, min_images=1)
    assert dataset.concepts == ["bank", "bank (n.09)"]  # the sense in more images keeps the plain name
    assert dataset.masks(0, (6, 6))[0] == [0] and dataset.masks(4, (6, 6))[0] == [1]


def test_bad_boxes_and_entries_are_counted(tmp_path):
    objects = [
        {"image_id": 1, "objects": [
            _obj(2, 2, 3, 3, synsets=["cat.n.01"]),
            _obj(4, 4, 0, 3, synsets=["cat.n.01"]),  # zero area
            _obj(50, 1, 3, 3, synsets=["cat.n.01"]),  # entirely outside (image is 10 wide)
            _obj(-2, 7, 5, 6, synsets=["cup.n.01"]),  # partly outside: clipped
            {"object_id": 9, "x": 1, "y": 1, "w": 1, "h": 1, "synsets": [], "names": []},  # nameless
        ]},
        {"image_id": 1, "objects": [_obj(0, 0, 9, 9, synsets=["cat.n.01"])]},  # listed twice
        {"image_id": 7, "objects": [_obj(0, 0, 2, 2, synsets=["cat.n.01"])]},  # not in image_data
        {"image_id": 3, "objects": [_obj(0, 0, 2, 2, synsets=["cat.n.01"])]},  # file deleted below
    ]
    root = write_visual_genome(tmp_path / "vg", {1: (10, 10), 3: (10, 10)}, objects)
    data = json.loads((root / "image_data.json").read_text())
    (root / "image_data.json").write_text(json.dumps(data + [data[0]]))  # image 1 listed twice
    (root / "VG_100K" / "3.jpg").unlink()
    dataset = _open(root, tmp_path, min_images=1)
    counts = dict(dataset.skipped.counts)
    assert counts == {
        "boxes of zero area": 1,
        "boxes entirely outside their image": 1,
        "box parts outside their image (the boxes were clipped)": 1,
        "objects without a synset or name": 1,
        "images listed twice in objects.json (first kept)": 1,
        "images listed twice in image_data.json (first kept)": 1,
        "objects.json entries of images not in image_data.json": 1,
        "images whose file is missing": 1,
    }
    assert len(dataset) == 1 and dataset.concepts == ["cat", "cup"]
    concepts, masks = dataset.masks(0, (10, 10))
    cat, cup = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    cat[2:5, 2:5] = 1
    cup[7:10, 0:3] = 1  # x from -2 to 3, y from 7 to 13: clipped to the image
    np.testing.assert_array_equal(masks, np.stack([cat, cup]))
    assert any("skipped 1 boxes of zero area" in line for line in dataset.skipped.lines())


def test_a_rescaled_file_gets_rescaled_boxes_and_another_aspect_is_refused(tmp_path):
    objects = [{"image_id": 1, "objects": [_obj(10, 4, 10, 6, synsets=["sun.n.01"])]}]
    root = write_visual_genome(tmp_path / "vg", {1: (40, 20)}, objects)
    Image.new("RGB", (80, 40)).save(root / "VG_100K" / "1.jpg")  # the user resized the images
    dataset = _open(root, tmp_path, min_images=1)
    _, masks = dataset.masks(0, load_rgb(dataset.image_path(0)).size)
    expected = np.zeros((40, 80), np.uint8)
    expected[8:20, 20:40] = 1
    np.testing.assert_array_equal(masks[0], expected)
    with pytest.raises(ValueError, match="image is 40x40 but image_data.json says 40x20"):
        dataset.masks(0, (40, 40))


def test_the_index_is_cached_and_rebuilt_when_the_files_change(tmp_path, monkeypatch):
    objects = [{"image_id": i, "objects": [_obj(0, 0, 3, 3, synsets=["cat.n.01"])]} for i in (1, 2)]
    root = write_visual_genome(tmp_path / "vg", {1: (8, 8), 2: (8, 8)}, objects)
    first = _open(root, tmp_path, min_images=1)
    assert len(list((tmp_path / "cache").glob("visual-genome-*.npz"))) == 1

    def no_parsing(*args):
        raise AssertionError("objects.json parsed again")

    monkeypatch.setattr(vg, "build_index", no_parsing)
    again = _open(root, tmp_path, min_images=1)
    assert again.identity() == first.identity() and again.concepts == first.concepts
    np.testing.assert_array_equal(again.masks(1, (8, 8))[1], first.masks(1, (8, 8))[1])
    other_threshold = _open(root, tmp_path, min_images=2)  # the threshold is applied after loading
    assert other_threshold.identity() != first.identity()
    monkeypatch.undo()

    objects[1]["objects"].append(_obj(4, 4, 2, 2, synsets=["cup.n.01"]))
    (root / "objects.json").write_text(json.dumps(objects))
    changed = _open(root, tmp_path, min_images=1)
    assert changed.concepts == ["cat", "cup"] and changed.identity()["objects"] != first.identity()["objects"]
    for cached in (tmp_path / "cache").glob("visual-genome-*.npz"):
        cached.write_bytes(b"damaged")
    assert _open(root, tmp_path, min_images=1).concepts == ["cat", "cup"]  # a damaged cache is rebuilt


def test_building_the_index_holds_far_less_than_the_json(tmp_path, monkeypatch):
    """objects.json is streamed into compact arrays; json.loads would hold the whole document."""
    monkeypatch.setattr(vg, "_CLIP_CHUNK", 1024)  # as for millions of boxes: clipping in bounded chunks
    rng = np.random.default_rng(0)
    images = {i: (64, 48) for i in range(1, 401)}
    objects = [
        {"image_id": i, "objects": [
            {"object_id": i * 100 + k, "x": int(rng.integers(0, 50)), "y": int(rng.integers(0, 40)),
             "w": int(rng.integers(1, 14)), "h": int(rng.integers(1, 8)),
             "names": ["object number %d" % (k % 7)], "synsets": ["thing_%d.n.01" % (k % 7)],
             "merged_object_ids": [], "attributes": ["red", "small"]}
            for k in range(25)
        ]}
        for i in images
    ]
    root = tmp_path / "vg"
    root.mkdir()
    (root / "image_data.json").write_text(json.dumps([
        {"image_id": i, "url": f"http://x/VG_100K/{i}.jpg", "width": w, "height": h} for i, (w, h) in images.items()
    ]))
    (root / "objects.json").write_text(json.dumps(objects))
    del objects

    def peak_of(function):
        tracemalloc.start()
        result = function()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, result

    whole, _ = peak_of(lambda: json.loads((root / "objects.json").read_bytes()))
    streamed, index = peak_of(lambda: vg.build_index(root / "objects.json", root / "image_data.json"))
    assert len(index["corners"]) == 400 * 25
    assert streamed < whole / 5, f"index build peaked at {streamed / 1e6:.1f} MB, json.loads at {whole / 1e6:.1f} MB"


def test_box_masks_match_a_loop_over_boxes():
    rng = np.random.default_rng(1)
    size = (37, 23)
    raw = np.column_stack([rng.uniform(-10, 40, 60), rng.uniform(-10, 30, 60), rng.uniform(0, 20, 60), rng.uniform(0, 15, 60)])
    corners, status = clip_boxes(raw, np.tile(size, (60, 1)))
    usable = status <= BOX_CLIPPED
    groups = rng.integers(0, 5, 60)[usable]
    np.testing.assert_array_equal(
        box_masks(corners[usable], groups, 5, size), _loop_box_masks(corners[usable], groups, 5, size)
    )
    for (x, y, w, h), (x0, y0, x1, y1), code in zip(raw, corners, status):
        if w <= 0 or h <= 0:
            assert code == BOX_EMPTY
            continue
        lo_x, lo_y, hi_x, hi_y = np.floor(x), np.floor(y), np.ceil(x + w), np.ceil(y + h)
        inside = lo_x >= 0 and lo_y >= 0 and hi_x <= size[0] and hi_y <= size[1]
        if min(hi_x, size[0]) <= max(lo_x, 0) or min(hi_y, size[1]) <= max(lo_y, 0):
            assert code == BOX_OUTSIDE
        else:
            assert code == (BOX_INSIDE if inside else BOX_CLIPPED)
            assert (x0, y0, x1, y1) == (max(lo_x, 0), max(lo_y, 0), min(hi_x, size[0]), min(hi_y, size[1]))
    assert clip_boxes(np.array([[np.nan, 0, 1, 1]]), np.array([[4, 4]]))[1].tolist() == [BOX_MALFORMED]


def test_open_reference_finds_visual_genome_and_trains_on_it(tmp_path, tiny_model, compute):
    from lavise.runs import train
    from lavise.settings import TrainSettings

    rng = np.random.default_rng(2)
    names = ["dog.n.01", "tree.n.01", "car.n.01", "kite.n.03"]
    objects = [
        {"image_id": i, "objects": [
            _obj(int(rng.integers(0, 26)), int(rng.integers(0, 20)), 30, 25, synsets=[names[(i + k) % 4]]) for k in range(2)
        ]}
        for i in range(1, 17)
    ]
    root = write_visual_genome(tmp_path / "vg", {i: (80, 56) if i % 3 else (56, 80) for i in range(1, 17)}, objects)
    settings = ReferenceSettings(min_images=2)
    by_folder = open_reference(root, settings=settings, cache_dir=tmp_path / "cache")
    by_file = open_reference(root / "objects.json", settings=settings, cache_dir=tmp_path / "cache")
    assert isinstance(by_folder, VisualGenomeDataset) and by_folder.identity() == by_file.identity()
    with pytest.raises(LaviseError, match="--categories does not apply to the visual_genome format"):
        open_reference(root, settings=ReferenceSettings(categories="object"))
    run = train(tiny_model, "features.3", by_folder, tmp_path / "run", settings=TrainSettings(epochs=1),
                compute=compute, cache_dir=tmp_path / "cache")
    assert sorted(run.split["seen"]) == ["car", "dog", "kite", "tree"]
    assert run.config["reference"]["identity"]["min_images"] == 2
    assert run.config["training_pairs"] == 32


def test_an_image_in_the_other_vg_folder_is_found(tmp_path):
    objects = [{"image_id": i, "objects": [_obj(0, 0, 3, 3, synsets=["cat.n.01"])]} for i in (1, 3)]
    root = write_visual_genome(tmp_path / "vg", {1: (8, 8), 3: (8, 8)}, objects, folder_of=lambda i: "VG_100K")
    (root / "VG_100K_2").mkdir()
    (root / "VG_100K" / "3.jpg").rename(root / "VG_100K_2" / "3.jpg")  # the url still says VG_100K
    dataset = _open(root, tmp_path, min_images=1)
    assert [dataset.image_path(i).relative_to(root).as_posix() for i in range(2)] == ["VG_100K/1.jpg", "VG_100K_2/3.jpg"]
    assert not dataset.skipped
