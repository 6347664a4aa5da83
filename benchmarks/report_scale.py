"""Build the HTML report of a 2,048-filter layer with 25 top images each, and load it.

A synthetic run: random 96 px pictures as target images, a one-convolution model with
2,048 filters (random weights, seeded) whose real feature maps give the thresholds, top
images and regions, and words drawn from the GloVe vocabulary. No explainer is trained:
the report reads the run's files, not the explainer.

Prints the report's build time (cold: every overlay thumbnail made; warm: all reused),
its size on disk, and in headless Chromium (Debian's, via Playwright) the time to
DOMContentLoaded, to the first cards drawn and to the load event, the search latency
and the time to open one filter's view.

    python benchmarks/report_scale.py [--filters 2048] [--top 25] [--images 500] [--out /tmp/lavise-report-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lavise.datasets import ImageFiles
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseWarning
from lavise.regions import top_images
from lavise.explainer import ExplainerHead
from lavise.features import target_features
from lavise.models import Preprocessing, TargetModel
from lavise.regions import quantile_thresholds
from lavise.report import write_report
from lavise.settings import ComputeSettings, ExplainSettings, TrainSettings
from lavise.storage import save_tensors, write_json

CHROMIUM = "/usr/bin/chromium"


def make_images(folder: Path, count: int, seed: int) -> None:
    """Random rectangles and discs on noisy backgrounds, 96x96 JPEG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:96, 0:96]
    for i in range(count):
        canvas = rng.integers(0, 60, (96, 96, 3)).astype(np.uint8) + rng.integers(0, 120, 3).astype(np.uint8)
        for _ in range(3):
            cx, cy, r = rng.integers(10, 86, 2).tolist() + [int(rng.integers(6, 24))]
            shape = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r if rng.random() < 0.5 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
            canvas[shape] = rng.integers(0, 256, 3)
        Image.fromarray(canvas).save(folder / f"img_{i:05d}.jpg", quality=90)


def make_run(out: Path, model: TargetModel, targets: Path, filters: int, top: int, cache: Path) -> Path:
    """A run directory in the format of 'lavise train' + 'explain', from real feature maps."""
    images = ImageFiles(targets)
    compute = ComputeSettings(device="cpu", batch_size=64, num_workers=0, progress=False)
    features = target_features(model, "0", images, cache_dir=cache, compute=compute)
    maps = features.maps  # (N, d, 8, 8)
    thresholds = quantile_thresholds(maps, 0.005)
    chosen = top_images(maps, top)
    words = load_word_vectors().vocabulary(size=20_000).words
    rng = np.random.default_rng(0)
    names = [str(Path(p).relative_to(targets)) for p in features.paths]
    entries = []
    for u in range(filters):
        picked = rng.choice(len(words), 10, replace=False)
        counts = sorted(rng.integers(1, top + 1, 10).tolist(), reverse=True)
        entries.append({
            "filter": u, "words": [{"word": words[w], "count": c} for w, c in zip(picked, counts, strict=True)],
            "top_images": [names[i] for i in chosen[u].tolist()], "threshold": float(thresholds[u]), "active": True,
        })
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    save_tensors(run / "explainer.safetensors", ExplainerHead(filters, 50).state_dict())
    write_json(run / "split.json", {"seen": [], "unseen": []})
    write_json(run / "config.json", {
        "model": model.description, "preprocessing": model.preprocessing.to_dict(), "layer": "0",
        "reference": {"description": "none (benchmark)"}, "word_vectors": "glove-6b-50d", "word_dim": 50,
        "train": TrainSettings().to_dict(), "feature_shape": [filters, 8, 8],
    })
    write_json(run / "explanations.json", {
        "model": model.description["name"], "layer": "0", "method": "attention",
        "settings": ExplainSettings(top_images=top).to_dict(), "vocabulary": {"words": len(words)},
        "target": {"root": str(targets), "images": len(names), "skipped": {}}, "filters": entries,
    })
    return run


def disk_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def browser_figures(index: Path, repeats: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    figures: dict[str, list[float]] = {
        "domcontentloaded": [], "first cards": [], "cards painted": [], "load": [], "search": [], "open filter": [],
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"])
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(index.as_uri(), wait_until="load")
            page.wait_for_function("performance.getEntriesByName('lavise-painted').length > 0")
            timing = page.evaluate(
                "() => { const n = performance.getEntriesByType('navigation')[0];"
                " const mark = name => performance.getEntriesByName(name)[0].startTime;"
                " return [n.domContentLoadedEventEnd, mark('lavise-first-cards'), mark('lavise-painted'),"
                " n.loadEventEnd]; }"
            )
            for name, value in zip(("domcontentloaded", "first cards", "cards painted", "load"), timing, strict=True):
                figures[name].append(value)
            for query in ("ca", "water", "zz", ""):
                figures["search"].append(page.evaluate(
                    "(q) => { const s = document.getElementById('search'); const t = performance.now();"
                    " s.value = q; s.dispatchEvent(new Event('input'));"
                    " document.body.offsetHeight; return performance.now() - t; }", query))
            figures["open filter"].append(page.evaluate(
                "() => { const t = performance.now(); location.hash = '#filter-1500';"
                " window.dispatchEvent(new HashChangeEvent('hashchange'));"
                " document.body.offsetHeight; return performance.now() - t; }"))
            page.close()
        browser.close()
    return {name: statistics.median(values) for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=2048)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="browser loads measured (the median is printed)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lavise-report-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the run and report after measuring")
    args = parser.parse_args()
    warnings.simplefilter("ignore", LaviseWarning)
    torch.manual_seed(0)
    shutil.rmtree(args.out, ignore_errors=True)

    start = time.perf_counter()
    make_images(args.out / "targets", args.images, seed=0)
    net = nn.Sequential(nn.Conv2d(3, args.filters, kernel_size=8, stride=8), nn.ReLU())
    model = TargetModel.from_module(net, Preprocessing(resize_size=64, crop_size=64), name="conv-2048")
    cache = args.out / "cache"
    run = make_run(args.out, model, args.out / "targets", args.filters, args.top, cache)
    print(f"synthetic run: {args.filters} filters x {args.top} top images from {args.images} target images "
          f"({time.perf_counter() - start:.1f} s to make)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    compute = ComputeSettings(device="cpu", num_workers=0, progress=False)
    start = time.perf_counter()
    index = write_report(run, model=model, cache_dir=cache, compute=compute)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    write_report(run, model=model, cache_dir=cache, compute=compute)
    warm = time.perf_counter() - start
    files, size = disk_size(index.parent)
    thumbs, thumb_size = disk_size(index.parent / "thumbs")
    data_size = (index.parent / "data.js").stat().st_size
    print(f"report build: {cold:.1f} s cold ({args.filters * args.top} overlay thumbnails), {warm:.1f} s warm (all reused)")
    print(f"report size: {size / 2**20:.1f} MiB in {files} files; thumbnails {thumb_size / 2**20:.1f} MiB in "
          f"{thumbs} files ({thumb_size / max(thumbs, 1) / 1024:.1f} KiB each); data.js {data_size / 2**20:.2f} MiB")
    figures = browser_figures(index, args.repeats)
    print(f"Chromium (headless, file://), median of {args.repeats} loads: DOMContentLoaded {figures['domcontentloaded']:.0f} ms, "
          f"first cards in the page {figures['first cards']:.0f} ms and on screen {figures['cards painted']:.0f} ms, "
          f"load event {figures['load']:.0f} ms")
    print(f"search over {args.filters} filters (input to layout): {figures['search']:.1f} ms median; "
          f"opening one filter's view: {figures['open filter']:.1f} ms")
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    else:
        print(f"kept: {index}")
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
