"""The quality bar: `lavise evaluate` on the demo's evaluation scenes, both targets, several seeds.

For each seed, runs the whole demo (scenes, scene CNN, explainers; reused when already
there) and evaluates both demo runs on the demo's annotated evaluation scenes with every
method. Prints one Markdown table of means ± standard deviations over the seeds, and
the evaluation time of each seed (cold: including the target features of the
evaluation scenes and the IoU tallies).

    python benchmarks/evaluate_demo.py --seeds 0 1 2 --work /tmp/lavise-eval --authors

``--vit`` also trains the small scene ViT (:mod:`lavise.models.scene_vit`) on the demo's
reference scenes, the way the scene CNN is trained, and evaluates explainers of two of
its blocks (``blocks.2``, ``blocks.3``: 192 channels on the scene CNN's 14×14 grid)
beside the two demo targets.

``--authors`` trains the demo's explainers the authors' way (pooling over the whole
grid, Adam at 1e-4), as the demo did before lavise's defaults changed; without it the
demo's own defaults are used. ``--as-in-0.4`` builds lavise 0.4's demo world and names
with its naming (docs/evaluation.md's tables before lavise 0.5 were made so). docs/evaluation.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lavise.compute import cpu_threads
from lavise.datasets.coco import CocoDataset
from lavise.demos.common import DemoTarget, trained_once, trained_run
from lavise.demos.demo import explainer_settings, run_demo
from lavise.demos.scene_training import train_scene_vit
from lavise.models import ModelSpec
from lavise.evaluate import evaluate
from lavise.settings import ComputeSettings, DemoSettings, EvaluateSettings

COLUMNS = [
    ("R@5", lambda s: s["recall@5"]),
    ("R@10", lambda s: s["recall@10"]),
    ("R@20", lambda s: s["recall@20"]),
    ("P@1", lambda s: s["precision@1"]),
    ("seen R@5", lambda s: s["seen"] and s["seen"]["recall@5"]),
    ("unseen R@20", lambda s: s["unseen"] and s["unseen"]["recall@20"]),
    ("unseen named@20", lambda s: s["unseen_named@20"]),
    ("lenient R@5", lambda s: s["lenient"]["recall@5"] if s.get("lenient") else None),
    ("lenient unseen named@20", lambda s: s["lenient"].get("unseen_named@20") if s.get("lenient") else None),
]


def mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def print_mean_sd_rows(table: dict[str, dict[str, list[tuple[float, ...]]]]) -> None:
    """Markdown rows ``| layer | name | mean ± sd of each column |`` of {layer: {name: [per-seed tuple]}}."""
    for layer, rows in table.items():
        for name, values in rows.items():
            print(f"| {layer} | {name} | " + " | ".join(mean_sd(list(c)) for c in np.array(values).T) + " |")


def vit_runs(out: Path, demo: DemoSettings, compute: ComputeSettings, epochs: int) -> list[Path]:
    """The scene ViT, trained once on the demo's reference scenes, and explainers of two of its blocks."""
    reference_dir = out / "data" / "reference"
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")
    path = out / "models" / "scene_vit.pt"
    key = {"reference": reference.identity(), "epochs": epochs, "seed": demo.seed}
    started = time.perf_counter()
    with cpu_threads(compute, workers=0):
        facts = trained_once(path, key, lambda: train_scene_vit(reference, path, epochs=epochs, seed=demo.seed,
                                                                   progress=compute.progress))
    print(f"scene ViT: {facts} ({time.perf_counter() - started:.0f} s)", flush=True)
    runs = []
    for layer in ("blocks.2", "blocks.3"):
        target = DemoTarget(f"scene_vit_{layer}", ModelSpec("scene_vit", None, str(path)), layer, "small ViT trained on the scenes")
        runs.append(trained_run(out / "runs" / target.key, target, reference, explainer_settings(demo), compute,
                                out / "cache").path)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-eval"))
    parser.add_argument("--methods", nargs="+", default=list(EvaluateSettings().methods))
    parser.add_argument("--authors", action="store_true",
                        help="train the explainers the authors' way (mean pooling, lr 1e-4)")
    parser.add_argument("--json", type=Path, default=None, help="also save every seed's summaries here")
    parser.add_argument("--vit", action="store_true", help="also train and evaluate the scene ViT on two of its blocks")
    parser.add_argument("--vit-epochs", type=int, default=30, help="training epochs of the scene ViT")
    parser.add_argument("--as-in-0.4", dest="as_in_0_4", action="store_true",
                        help="lavise 0.4's demo world and naming (the tables of docs/evaluation.md before 0.5)")
    parser.add_argument("--every-top-image", action="store_true",
                        help="every top image votes, firing or not: the naming of the tables measured before "
                             "firing_images_only (the ViT tables of docs/evaluation.md)")
    args = parser.parse_args()

    compute = ComputeSettings(progress=False)
    results: dict[int, dict] = {}
    timings: dict[int, float] = {}
    for seed in args.seeds:
        out = args.work / f"seed-{seed}"
        started = time.perf_counter()
        explainer = {"explainer_pooling": "mean", "explainer_learning_rate": 1e-4} if args.authors else {}
        demo = (DemoSettings.as_in_0_4 if args.as_in_0_4 else DemoSettings)(seed=seed, **explainer)
        summary = run_demo(out, demo, compute)
        demo_seconds = time.perf_counter() - started
        evaluation_data = out / "data" / "evaluation"
        dataset = CocoDataset(evaluation_data / "annotations.json", evaluation_data / "images")
        runs = [Path(summary["runs"][key]) for key in sorted(summary["runs"])]
        if args.vit:
            runs += vit_runs(out, demo, compute, args.vit_epochs)
        started = time.perf_counter()
        evaluations = evaluate(runs, dataset, settings=EvaluateSettings(methods=tuple(args.methods)),
                               explain_settings=replace(demo.explain_settings(),
                                                        **({"firing_images_only": False} if args.every_top_image else {})),
                               compute=compute, cache_dir=out / "cache")
        timings[seed] = time.perf_counter() - started
        results[seed] = {f"{e.model} {e.layer}": e.methods for e in evaluations}
        print(f"seed {seed}: demo {demo_seconds:.0f} s, evaluation of both targets {timings[seed]:.0f} s", flush=True)

    targets = sorted({t for r in results.values() for t in r})
    header = ["target", "method", "filters", *[name for name, _ in COLUMNS]]
    print(f"\nExact-match scores, mean ± sd over seeds {args.seeds} "
          "(filters: filters with ground truth, mean over seeds)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for target in targets:
        for method in args.methods:
            summaries = [results[s][target][method] for s in args.seeds]
            cells = [target, method, f"{np.mean([s['filters'] for s in summaries]):.0f}",
                     *[mean_sd([get(s) for s in summaries]) for _, get in COLUMNS]]
            print("| " + " | ".join(cells) + " |")
    print("\nEvaluation time (both targets, all methods, cold cache): "
          + ", ".join(f"seed {s}: {t:.0f} s" for s, t in timings.items()))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "results": results, "seconds": timings}, indent=1))


if __name__ == "__main__":
    main()
