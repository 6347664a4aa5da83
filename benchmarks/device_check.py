"""Run every stage on two devices (the CPU and a GPU) and check they agree; time both.

lavise's code is device-agnostic (``--device auto`` takes a GPU when there is one), but
the test suite runs on the CPU. This script builds its own data (shapes on noise, with
COCO polygon annotations, and a word-vector file of the concept names and random words,
so it needs no packaged data), a randomly initialised torchvision ResNet-18, and runs on
each device: reference features with activation regions, training, explaining, the
evaluation (feature methods, image masking, NetDissect) and a group comparison. Explain,
evaluate and compare-groups use one CPU-trained run on both devices, so their results
should agree up to float rounding; training is only checked to run and converge alike.

    python benchmarks/device_check.py --devices cpu cuda --out /tmp/lavise-device

Prints, per stage, each device's time and how far the results are apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lavise.datasets.coco import CocoDataset
from lavise.evaluate import evaluate
from lavise.explain import explain
from lavise.reference import reference_rows
from lavise.groups import compare_groups
from lavise.models import ModelSpec, load_target_model
from lavise.runs import load_run, train
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings, GroupSettings, TrainSettings

CONCEPTS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220), "star": (230, 200, 30),
            "cross": (200, 60, 200), "ring": (30, 200, 200)}
SIZE = 224


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[float]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "square":
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif kind == "triangle":
        points = [(cx, y0), (x1, y1), (x0, y1)]
    elif kind == "cross":
        a, b = r / 3, r
        points = [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a), (cx + a, cy + a),
                  (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a), (cx - b, cy - a), (cx - a, cy - a)]
    else:  # circle, star and ring as polygons around the centre
        steps = 10 if kind == "star" else 24
        radii = [r if (i % 2 == 0 or kind != "star") else r / 2 for i in range(steps)]
        points = [(cx + q * np.cos(2 * np.pi * i / steps), cy + q * np.sin(2 * np.pi * i / steps)) for i, q in enumerate(radii)]
    return [float(v) for point in points for v in point]


def make_scenes(root: Path, images: int, seed: int, bias: str | None = None) -> None:
    """``root/images/*.png`` and ``root/annotations.json``: two shapes per noisy scene."""
    rng = np.random.default_rng(seed)
    names = list(CONCEPTS)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for index in range(images):
        canvas = Image.fromarray(rng.integers(60, 190, (SIZE, SIZE, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        chosen = [int(c) for c in rng.choice(len(names), size=2, replace=False)]
        if bias is not None and rng.random() < 0.7:
            chosen[0] = names.index(bias)  # the planted difference of a group
            chosen[1] = chosen[1] if chosen[1] != chosen[0] else (chosen[0] + 1) % len(names)
        for slot, c in enumerate(chosen):
            side = int(rng.integers(60, 100))
            x0 = slot * (SIZE // 2) + int(rng.integers(0, SIZE // 2 - side))
            y0 = int(rng.integers(0, SIZE - side))
            polygon = _polygon(names[c], (x0, y0, x0 + side, y0 + side))
            draw.polygon(polygon, fill=CONCEPTS[names[c]])
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": c + 1, "iscrowd": 0,
                                "segmentation": [polygon], "area": float(side * side), "bbox": [x0, y0, side, side]})
        canvas.save(root / "images" / f"{index:05d}.png")
        entries.append({"id": index + 1, "file_name": f"{index:05d}.png", "width": SIZE, "height": SIZE})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    (root / "annotations.json").write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))


def make_word_vectors(path: Path, words: int, seed: int) -> None:
    """A GloVe-format file: the concept names and ``words`` random lower-case words, 50-d."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = list(CONCEPTS)
    while len(vocabulary) < words + len(CONCEPTS):
        word = "".join(rng.choice(letters, size=int(rng.integers(4, 10))))
        if word not in vocabulary:
            vocabulary.append(word)
    lines = [w + " " + " ".join(f"{v:.5f}" for v in rng.normal(size=50)) for w in vocabulary]
    path.write_text("\n".join(lines) + "\n")


def timed(stage: str, on: str, times: dict, function, /, *args, **kwargs):
    """``function(*args, **kwargs)``, its wall time kept in ``times[stage][on]``."""
    if on.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if on.startswith("cuda"):
        torch.cuda.synchronize()
    times.setdefault(stage, {})[on] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lavise-device"))
    parser.add_argument("--reference-images", type=int, default=600)
    parser.add_argument("--target-images", type=int, default=300, help="per group (two groups)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2,
                        help="then explain under torchrun on this many processes of the second device (0: skip)")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    make_scenes(args.out / "reference", args.reference_images, args.seed)
    make_scenes(args.out / "evaluation", args.target_images, args.seed + 1)
    for group, bias in (("a", "circle"), ("b", "square")):
        make_scenes(args.out / "groups-src" / group, args.target_images, args.seed + 2 + ord(group), bias)
        shutil.move(str(args.out / "groups-src" / group / "images"), str(args.out / "groups" / group))
    make_word_vectors(args.out / "vectors.txt", 3000, args.seed)
    reference = CocoDataset(args.out / "reference" / "annotations.json", args.out / "reference" / "images")
    evaluation = CocoDataset(args.out / "evaluation" / "annotations.json", args.out / "evaluation" / "images")
    torch.manual_seed(args.seed)
    model = load_target_model(ModelSpec("resnet18"))  # random weights, the same on both devices
    train_settings = TrainSettings(epochs=args.epochs, activation_regions=3, seed=args.seed)
    explain_settings = ExplainSettings(vocabulary_size=0)
    times: dict[str, dict[str, float]] = {}
    results: dict[str, dict] = {}
    for device in args.devices:
        if device.startswith("cuda"):
            torch.zeros(1, device=device)  # initialise CUDA outside the timings
        compute = ComputeSettings(device=device, batch_size=64, num_workers=4, progress=False)
        cache = args.out / f"cache-{device}"
        got = results[device] = {}
        got["reference"] = timed("reference features + thresholds", device, times, reference_rows, model, "layer3",
                                 reference, cache_dir=cache, compute=compute, activation_regions=3)
        got["run"] = timed("train", device, times, train, model, "layer3", reference, args.out / f"run-{device}",
                           word_vectors=str(args.out / "vectors.txt"), settings=train_settings, compute=compute,
                           cache_dir=cache)
        shared = args.out / "run-shared"  # the first device's run, explained and scored on both
        if not shared.exists():
            shutil.copytree(args.out / f"run-{device}", shared)
        got["explain"] = timed("explain", device, times, explain, load_run(shared), args.out / "groups",
                               settings=explain_settings, compute=compute, model=model, cache_dir=cache,
                               write=device == args.devices[0])
        [got["evaluate"]] = timed("evaluate (4 methods)", device, times, evaluate, [load_run(shared)], evaluation,
                                  settings=EvaluateSettings(methods=("activation", "attention", "image", "netdissect"),
                                                            lenient=False),
                                  explain_settings=explain_settings, compute=compute, model=model, cache_dir=cache,
                                  write=False)
        got["groups"] = timed("compare-groups", device, times, compare_groups, load_run(shared), args.out / "groups",
                              settings=GroupSettings(), compute=compute, model=model, cache_dir=cache, write=False)

    a, b = (results[d] for d in args.devices)
    print(f"\nDevices: {args.devices[0]} → {args.devices[1]}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    print(f"{args.reference_images} reference scenes, {2 * args.target_images} group images, "
          f"{args.target_images} evaluation scenes, ResNet-18 layer3 (random weights), torch {torch.__version__}\n")
    print("| stage | " + " | ".join(f"{d} s" for d in args.devices) + " | agreement |")
    print("|---|---|---|---|")
    ref_a, ref_b = a["reference"], b["reference"]
    scale = float(ref_a.vectors.abs().max())
    same_rows = len(ref_a.vectors) == len(ref_b.vectors) and torch.equal(ref_a.regional, ref_b.regional)
    vector_gap = float((ref_a.vectors - ref_b.vectors).abs().max()) / scale if same_rows else float("nan")
    agreement = {
        "reference features + thresholds": f"{'same' if same_rows else 'DIFFERENT'} rows ({ref_a.pairs} pairs, "
                                           f"{len(ref_a.vectors)} rows); largest difference {vector_gap:.1e} of the largest value",
        "train": f"best epoch {a['run'].config['best_epoch']} / {b['run'].config['best_epoch']}; "
                 f"validation loss {_best_loss(a['run'].path):.4f} / {_best_loss(b['run'].path):.4f}",
    }
    words_a = [[w["word"] for w in f.words[:5]] for f in a["explain"].filters]
    words_b = [[w["word"] for w in f.words[:5]] for f in b["explain"].filters]
    agreement["explain"] = (f"top-5 words identical for {sum(x == y for x, y in zip(words_a, words_b))} of "
                            f"{len(words_a)} filters")
    methods = a["evaluate"].methods
    agreement["evaluate (4 methods)"] = "; ".join(
        f"{m} R@5 {methods[m]['recall@5']:.3f} / {b['evaluate'].methods[m]['recall@5']:.3f}" for m in methods)
    top_a = [f.filter for f in a["groups"].filters[:20]]
    top_b = [f.filter for f in b["groups"].filters[:20]]
    agreement["compare-groups"] = f"{len(set(top_a) & set(top_b))} of the 20 most different filters shared"
    for stage, by_device in times.items():
        cells = " | ".join(f"{by_device[d]:.1f}" for d in args.devices)
        print(f"| {stage} | {cells} | {agreement.get(stage, '')} |")
    if args.processes > 1:
        check_torchrun(args, args.out / "run-shared", b["explain"].filters, args.devices[1])


def check_torchrun(args, shared: Path, single: list, device: str) -> None:
    """Explain the shared run under torchrun and compare with one process on ``device``.

    NCCL when every process can have a GPU of its own, else Gloo on the CPU.
    """
    gpus = torch.cuda.device_count()
    on = device if device.startswith("cuda") and args.processes <= gpus else "cpu"
    copy = args.out / "run-torchrun"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(shared, copy)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               "-m", "lavise", "explain", str(copy), "--target", str(args.out / "groups"), "--device", on,
               "--vocabulary-size", "0", "--batch-size", "64", "--num-workers", "2", "--no-progress",
               "--cache-dir", str(args.out / "cache-torchrun")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        print(f"\ntorchrun explain on {args.processes} processes FAILED:\n{result.stderr[-3000:]}")
        return
    data = json.loads((copy / "explanations.json").read_text())
    same_words = sum([w["word"] for w in f["words"][:5]] == [w["word"] for w in g.words[:5]]
                     for f, g in zip(data["filters"], single))
    same_images = sum(f["top_images"] == g.top_images for f, g in zip(data["filters"], single))
    gap = max(abs(f["threshold"] - g.threshold) for f, g in zip(data["filters"], single))
    print(f"\ntorchrun explain, {args.processes} processes on {on} ({'NCCL' if on.startswith('cuda') else 'Gloo'}): "
          f"{seconds:.1f} s with start-up; against one process on {device}: top-5 words identical for {same_words} "
          f"of {len(single)} filters, top images for {same_images}; largest threshold difference {gap:.1e}")


def _best_loss(run: Path) -> float:
    rows = (run / "training.csv").read_text().splitlines()[1:]
    return min(float(row.split(",")[2]) for row in rows)


if __name__ == "__main__":
    main()
