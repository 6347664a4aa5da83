"""Peak memory of each reference reader over 2,000 and 20,000 small images.

Writes every format in its native layout (COCO, Visual Genome, Broden, class folders,
a CSV manifest) with N tiny images each (hard links to one file, so writing is quick),
then, in a fresh subprocess per format and size so that peaks do not mix, opens the
dataset and draws the masks of every image, as feature extraction does. Prints the
Python allocations' peak (tracemalloc) and the process's peak resident memory minus
its resident memory after the imports (/proc: VmHWM, reset after the imports, minus
VmRSS), and the time. Visual Genome is run
twice: the first run parses the JSON into the cached index, the second reads the cache.
Also prints the peak of parsing Visual Genome's objects.json with json.loads, for
comparison with the streamed index build.

    python benchmarks/dataset_memory.py [--sizes 2000 20000] [--out /tmp/lavise-dataset-memory]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 48, 32
CLASSES = ["dog", "cat", "tree", "car", "kite", "sky", "road", "boat", "bird", "lamp"]


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_all(root: Path, count: int) -> dict[str, Path]:
    """Every format with ``count`` images, in its native layout; returns format -> path."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg, png = root / "image.jpg", root / "image.png"
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(jpeg)
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(png)
    label_map = np.zeros((HEIGHT // 2, WIDTH // 2), np.uint8)
    label_map[2:10, 3:15] = 1
    label_map[10:16, :] = 2
    Image.fromarray(np.dstack([label_map, np.zeros_like(label_map), np.zeros_like(label_map)])).save(root / "label.png")
    rng = np.random.default_rng(0)
    boxes = [(int(rng.integers(0, 30)), int(rng.integers(0, 20)), 14, 10) for _ in range(count * 3)]
    paths = {}

    coco = root / "coco"
    for i in range(count):
        _link(png, coco / "images" / f"{i}.png")
    annotations = [
        {"id": 3 * i + k + 1, "image_id": i + 1, "category_id": (i + k) % len(CLASSES) + 1, "bbox": list(boxes[3 * i + k]),
         "segmentation": [], "area": 140.0, "iscrowd": 0}
        for i in range(count) for k in range(3)
    ]
    (coco / "annotations.json").write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in range(count)],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)],
    }))
    paths["coco"] = coco / "annotations.json"

    genome = root / "visual_genome"
    for i in range(count):
        _link(jpeg, genome / "VG_100K" / f"{i + 1}.jpg")
    (genome / "image_data.json").write_text(json.dumps([
        {"image_id": i + 1, "url": f"https://example/VG_100K/{i + 1}.jpg", "width": WIDTH, "height": HEIGHT,
         "coco_id": None, "flickr_id": None}
        for i in range(count)
    ]))
    (genome / "objects.json").write_text(json.dumps([
        {"image_id": i + 1, "objects": [
            {"object_id": 3 * i + k, "x": x, "y": y, "w": w, "h": h, "names": [CLASSES[(i + k) % 10]],
             "synsets": [f"{CLASSES[(i + k) % 10]}.n.01"], "merged_object_ids": []}
            for k, (x, y, w, h) in enumerate(boxes[3 * i: 3 * i + 3])
        ]}
        for i in range(count)
    ]))
    paths["visual_genome"] = genome

    broden = root / "broden"
    rows = []
    for i in range(count):
        _link(jpeg, broden / "images" / "ade20k" / f"{i}.jpg")
        _link(root / "label.png", broden / "images" / "ade20k" / f"{i}_object.png")
        rows.append([f"ade20k/{i}.jpg", "train", HEIGHT, WIDTH, HEIGHT // 2, WIDTH // 2, f"ade20k/{i}_object.png", "3"])
    _csv(broden / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", "object", "scene"], rows)
    _csv(broden / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
         [[1, "dog", "object(1)", 1, 1, ""], [2, "road", "object(1)", 1, 1, ""], [3, "street-s", "scene(1)", 1, 1, ""]])
    _csv(broden / "category.csv", ["name", "first", "last", "count", "frequency"], [["object", 1, 2, 2, count], ["scene", 3, 3, 1, count]])
    _csv(broden / "c_object.csv", ["code", "number", "name", "frequency", "coverage"], [[1, 1, "dog", 1, 1], [2, 2, "road", 1, 1]])
    _csv(broden / "c_scene.csv", ["code", "number", "name", "frequency", "coverage"], [[1, 3, "street-s", 1, 1]])
    paths["broden"] = broden

    folder = root / "folder"
    for i in range(count):
        _link(jpeg, folder / CLASSES[i % 10] / f"{i}.jpg")
    paths["folder"] = folder

    manifest = root / "manifest"
    for i in range(count):
        _link(png, manifest / "images" / f"{i}.png")
    _csv(manifest / "manifest.csv", ["image", "concept", "box", "mask"], [
        row for i in range(count) for row in (
            [f"images/{i}.png", CLASSES[i % 10], " ".join(map(str, boxes[3 * i])), ""],
            [f"images/{i}.png", CLASSES[(i + 1) % 10], "", ""],
        )
    ])
    paths["manifest"] = manifest / "manifest.csv"
    return paths


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark, so the peak is of what follows, not of the imports."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(format: str, path: Path, cache: Path) -> dict:
    """Open the dataset and draw every image's masks; peaks of this process."""
    import warnings

    from lavise.datasets import open_reference
    from lavise.errors import LaviseWarning

    warnings.simplefilter("ignore", LaviseWarning)
    if not _reset_peak_rss():  # without it the peak would include the imports (torch)
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux 4.0 or later needed")
    rss_before = _status_mb("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    dataset = open_reference(path, format=format, cache_dir=cache)
    opened = time.perf_counter() - start
    masks = 0
    for i in range(len(dataset)):
        with Image.open(dataset.image_path(i)) as image:  # the header only, as the size
            size = image.size
        concepts, arrays = dataset.masks(i, size)
        masks += len(concepts)
    total = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"images": len(dataset), "masks": masks, "open_s": opened, "total_s": total,
            "traced_peak_mb": traced_peak / 1e6, "rss_growth_mb": _status_mb("VmHWM") - rss_before}


def json_loads_peak(path: Path) -> float:
    tracemalloc.start()
    data = json.loads(path.read_bytes())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del data
    return peak / 1e6


def parse_rates(root: Path) -> str:
    """Seconds to stream objects.json into the index, and to json.loads it, without tracemalloc."""
    from lavise.datasets.visual_genome import build_index

    start = time.perf_counter()
    index = build_index(root / "objects.json", root / "image_data.json")
    streamed = time.perf_counter() - start
    start = time.perf_counter()
    json.loads((root / "objects.json").read_bytes())
    whole = time.perf_counter() - start
    boxes = len(index["corners"])
    return (f"index build {streamed:.2f} s ({boxes / streamed / 1e3:.0f}k objects/s), "
            f"json.loads alone {whole:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lavise-dataset-memory"))
    parser.add_argument("--measure", nargs=3, metavar=("FORMAT", "PATH", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), Path(args.measure[2]))))
        return

    print(f"{'format':22s} {'images':>7s} {'masks':>7s} {'open s':>7s} {'total s':>8s} "
          f"{'traced peak MB':>15s} {'RSS growth MB':>14s}")
    for count in args.sizes:
        root = args.out / str(count)
        shutil.rmtree(root, ignore_errors=True)
        paths = write_all(root, count)
        cache = root / "cache"
        runs = [(f, f, p) for f, p in paths.items()]
        runs.insert(2, ("visual_genome (cached)", "visual_genome", paths["visual_genome"]))
        for label, format, path in runs:
            result = subprocess.run(
                [sys.executable, __file__, "--measure", format, str(path), str(cache)], capture_output=True, text=True,
            )
            if result.returncode:
                sys.exit(f"{label} failed:\n{result.stderr}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{label:22s} {r['images']:7d} {r['masks']:7d} {r['open_s']:7.2f} {r['total_s']:8.2f} "
                  f"{r['traced_peak_mb']:15.1f} {r['rss_growth_mb']:14.1f}", flush=True)
        objects = paths["visual_genome"] / "objects.json"
        print(f"{'':22s} objects.json {objects.stat().st_size / 1e6:.1f} MB: json.loads of it alone peaks at "
              f"{json_loads_peak(objects):.1f} MB; {parse_rates(paths['visual_genome'])}", flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
