"""Memory and time of train and explain as the number of images grows, on 1 and 2 processes.

Writes a reference set (COCO, two boxed concepts per image) and a target folder of N
images, hard links to a few hundred distinct pictures so that large sets are quick to
make, then measures each (stage, model, N) in a fresh process: its peak resident memory
above what it held once the model was built (VmHWM − VmRSS, from /proc), its wall
time, and the share spent in the backbone's forward passes (hooks on the model's input
and on the layer). Decoding runs in the measured process (``--num-workers 0``), so its
memory counts. Then the marginal memory per added image between the two largest N,
the same stages on two processes (torchrun, Gloo) against one, and a cost model.

    python benchmarks/scale.py                      # the figures quoted in docs/scale.md
    python benchmarks/scale.py --quick              # a few minutes: small N only
    python benchmarks/scale.py --counts 8000 --only-resnet18   # one more row
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DISTINCT = 300  # distinct pictures behind the hard links
CONCEPTS = ("cat", "dog", "car", "tree", "boat", "bird")


# --- data ------------------------------------------------------------------------------


def prepare(root: Path, count: int) -> tuple[Path, Path]:
    """``root/reference-N/annotations.json`` with images, and ``root/target-N/`` (cached)."""
    base = root / "base"
    if not (base / f"{DISTINCT - 1:04d}.jpg").is_file():
        base.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(DISTINCT):
            pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / f"{i:04d}.jpg", quality=85)
    reference, target = root / f"reference-{count}", root / f"target-{count}"
    if not (reference / "annotations.json").is_file():
        shutil.rmtree(reference, ignore_errors=True)
        (reference / "images").mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            os.link(base / f"{i % DISTINCT:04d}.jpg", reference / "images" / f"{i:06d}.jpg")
            images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 320, "height": 240})
            for k, (x, y) in enumerate(((10, 20), (160, 60))):
                annotations.append({"id": 2 * i + k + 1, "image_id": i + 1, "category_id": (i + k) % len(CONCEPTS) + 1,
                                    "bbox": [x, y, 140, 150], "area": 140 * 150, "iscrowd": 0})
        categories = [{"id": j + 1, "name": name} for j, name in enumerate(CONCEPTS)]
        (reference / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                                 "categories": categories}))
    if not target.is_dir():
        target.mkdir(parents=True)
        for i in range(count):
            os.link(base / f"{(i * 7) % DISTINCT:04d}.jpg", target / f"{i:06d}.jpg")
    return reference / "annotations.json", target


# --- one measurement, in its own process ------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch

    from lavise import ComputeSettings, ExplainSettings, ModelSpec, TrainSettings, explain, load_target_model, train
    from lavise.datasets import CocoDataset
    from lavise.distributed import current, init_from_environment
    from lavise.errors import LaviseWarning

    warnings.simplefilter("ignore", LaviseWarning)
    init_from_environment("cpu")
    ranks = current()
    reference_file, target = Path(args.reference), Path(args.target)
    model = load_target_model(ModelSpec(args.model))
    clock = [0.0, 0.0]
    model.module.register_forward_pre_hook(lambda *_: clock.__setitem__(1, time.perf_counter()))
    model.module.get_submodule(args.layer).register_forward_hook(
        lambda *_: clock.__setitem__(0, clock[0] + time.perf_counter() - clock[1]))
    compute = ComputeSettings(device="cpu", num_workers=0, progress=False, batch_size=32,
                              memory_budget=args.budget, threads=args.threads)
    reference = CocoDataset(reference_file, reference_file.parent / "images")
    baseline = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    run_dir = Path(args.out) / "run"
    if args.stage == "train":
        train(model, args.layer, reference, run_dir, settings=TrainSettings(epochs=2), compute=compute,
              cache_dir=Path(args.out) / "cache")
    else:
        from lavise.runs import load_run

        explain(load_run(run_dir), target, settings=ExplainSettings(), compute=compute, model=model,
                cache_dir=Path(args.out) / "cache")
    seconds = time.perf_counter() - start
    print(json.dumps({"rank": ranks.rank, "peak": _status("VmHWM") - baseline, "seconds": seconds,
                      "backbone": clock[0], "threads": torch.get_num_threads()}), flush=True)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Make VmHWM start from the current resident size (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(stage: str, model: str, layer: str, reference: Path, target: Path, out: Path, *, budget: float,
            processes: int = 1, threads: int = 0) -> dict:
    command = [str(Path(__file__).resolve()), "child", "--stage", stage, "--model", model, "--layer", layer,
               "--reference", str(reference), "--target", str(target), "--out", str(out), "--budget", str(budget),
               "--threads", str(threads)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{stage} {model} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    main = next(line for line in lines if line["rank"] == 0)
    return {**main, "wall": wall, "peak_max": max(line["peak"] for line in lines)}


# --- the cost model -----------------------------------------------------------------------


def cost_model(images: int, gpus: int, budget: float = 2.0) -> list[str]:
    """What ``images`` target images cost with ResNet-50 layer4 (2048 × 7 × 7), p = 25, on K GPUs."""
    from lavise.features import tally_fits

    d, h, w, p, quantile, concepts = 2048, 7, 7, 25, 0.005, 1208
    maps = 4 * d * h * w
    keep = math.ceil(quantile * images * h * w) + 2
    tally = 4 * keep * d
    fits = tally_fits(quantile, images * h * w, d, budget)
    thresholds = ("in the same pass (the tally fits the budget)" if fits else
                  f"in 2 to 4 more passes: the tally would hold {tally / 2**30:.1f} GiB per rank, over the "
                  f"{budget:g} GiB budget (or give --memory-budget {2 * tally / 2**30:.0f} to keep one pass)")
    return [
        f"Cost model: {images:,} target images, ResNet-50 layer4 ({d} x {h} x {w}), p = {p}, on {gpus} GPUs, "
        f"--memory-budget {budget:g}",
        f"- explain: one forward pass per image, T_u {thresholds}; then the chosen images' maps (at most "
        f"d·p = {d * p:,} images) from memory, the map cache, or the network again",
        "- evaluate: a pass for T_u and the top images, a pass for the IoU tallies; compare-groups: a pass for T_u "
        "(none with --thresholds run) and a counting pass; train: a pass for T_u of the reference images with "
        "activation regions, then the pooling pass",
        f"- each rank takes {images // gpus:,} images; decoding usually sets the pace: give each rank several "
        "--num-workers",
        f"- stored per image with the map cache: {maps / 1e3:.0f} KB (4·d·h·w), {maps * images / 1e12:.1f} TB in all; "
        "without it (--no-cache-maps) every pass runs the network again",
        f"- held per rank beyond the budget-bound maps: the top images, {d * p * 12 / 1e6:.1f} MB; the IoU tallies, "
        f"{3 * d * concepts * 8 / 1e6:.0f} MB (1,208 Visual Genome concepts)",
        f"- exchanged per merge: top images {d * p * 12 * gpus / 1e6:.0f} MB over all ranks; the words of the d·p "
        f"pairs {d * p * 5 * 12 / 1e6:.1f} MB; IoU tallies {3 * d * concepts * 8 / 1e6:.0f} MB per all-reduce; "
        + (f"the tallies {tally * gpus / 2**30:.1f} GiB, one rank's at a time" if fits else
           f"per refining pass {d * 2048 * 24 * gpus / 2**20:.0f} MB of histograms"),
        "- commands: torchrun --nnodes=NODES --nproc-per-node=GPUS_PER_NODE --rdzv-backend=c10d "
        "--rdzv-endpoint=HOST:29400 -m lavise explain RUN --target IMAGES --num-workers 8 [--no-cache-maps]",
    ]


# --- the whole benchmark ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    one = sub.add_parser("child")
    for name in ("stage", "model", "layer", "reference", "target", "out"):
        one.add_argument(f"--{name}", required=True)
    one.add_argument("--budget", type=float, default=2.0)
    one.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-scale"))
    parser.add_argument("--quick", action="store_true", help="small sets only")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 4000, 16000],
                        help="image counts of the ResNet-18 rows")
    parser.add_argument("--only-resnet18", action="store_true",
                        help="the ResNet-18 rows only: no ResNet-50 rows, no comparison of processes")
    args = parser.parse_args()
    if args.mode == "child":
        child(args)
        return

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cores; peak = resident memory above what the process "
          "held once its model was built; --num-workers 0 (decoding counted), batches of 32\n")
    small = ("resnet18", "layer3")  # 256 x 14 x 14: 200 KB of maps per image
    large = ("resnet50", "layer4")  # 2048 x 7 x 7: 401 KB per image
    plan = [(small, n) for n in ((250, 1000) if args.quick else args.counts)]
    if not args.quick and not args.only_resnet18:
        plan += [(large, n) for n in (1000, 4000)]
    results = {}
    print("| model, layer | images | stage | peak memory | wall | backbone share |")
    print("|---|---|---|---|---|---|")
    for (model, layer), count in plan:
        reference, target = prepare(args.work / "data", count)
        out = args.work / f"{model}-{count}"
        shutil.rmtree(out, ignore_errors=True)
        for stage in ("train", "explain"):
            result = measure(stage, model, layer, reference, target, out, budget=2.0)
            results[(model, count, stage)] = result
            print(f"| {model} {layer} | {count:,} | {stage} | {result['peak'] / 2**20:.0f} MiB | {result['seconds']:.0f} s | "
                  f"{100 * result['backbone'] / result['seconds']:.0f} % |", flush=True)

    counts = sorted({n for (m, n, _) in results if m == small[0]})
    if args.only_resnet18 or len(counts) < 2:
        return
    a, b = counts[-2], counts[-1]
    for stage in ("train", "explain"):
        grown = results[(small[0], b, stage)]["peak"] - results[(small[0], a, stage)]["peak"]
        print(f"\n{small[0]} {small[1]}, {stage}: {grown / (b - a) / 1e3:+.1f} KB per image added from {a:,} to {b:,} images")
    count = counts[-1] if args.quick else 4000
    reference, target = prepare(args.work / "data", count)
    print(f"\nOne process against two (torchrun, Gloo; 2 cores: 2 threads against 1 per rank), {small[0]} {small[1]}, "
          f"{count:,} images, wall time of the whole command:")
    for processes in (1, 2):
        out = args.work / f"processes-{processes}"
        shutil.rmtree(out, ignore_errors=True)
        for stage in ("train", "explain"):
            result = measure(stage, *small, reference, target, out, budget=2.0, processes=processes)
            print(f"- {processes} process{'es' if processes > 1 else ''}: {stage} {result['wall']:.0f} s "
                  f"(rank 0: {result['seconds']:.0f} s in the stage, {100 * result['backbone'] / result['seconds']:.0f} % "
                  f"in the backbone; peak {result['peak_max'] / 2**20:.0f} MiB per rank)", flush=True)
    print()
    for gpus, budget in ((8, 2.0), (8, 64.0), (64, 2.0)):
        print("\n".join(cost_model(10_000_000, gpus, budget)) + "\n")


if __name__ == "__main__":
    main()
