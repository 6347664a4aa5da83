"""How many reference scenes does the explainer need? Recall against the size of the reference set.

Trains lavise's explainer (the defaults: region pooling, Adam at 1e-3) on the first N
scenes of a demo's reference set, for several N, and scores activation masking on the
demo's evaluation scenes: seen recall, unseen recall and the number of seen concepts
(a concept must appear in the first N scenes to be trained on).

    python experiments/reference_curve.py --demo /tmp/lavise-eval/seed-0 --sizes 100 200 400 800

The demo folder must exist (``lavise demo --out DIR``). docs/evaluation.md quotes the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DemoFolder, NAMING
from lavise.datasets.coco import CocoDataset
from lavise.evaluate import evaluate, markdown_cell
from lavise.runs import train
from lavise.settings import ComputeSettings, EvaluateSettings, TrainSettings


def first_scenes(annotations: Path, count: int, out: Path) -> Path:
    """A COCO file holding the first ``count`` images of ``annotations`` (by id) and their masks."""
    data = json.loads(annotations.read_text())
    images = sorted(data["images"], key=lambda image: image["id"])[:count]
    kept = {image["id"] for image in images}
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in kept]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(subset))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["efficientnet_lite0", "scene_cnn"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-curve"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    compute = ComputeSettings(progress=False, threads=args.threads, num_workers=0)
    demo = DemoFolder(args.demo)
    cache, dataset = demo.cache, demo.evaluation
    rows = []
    for target in args.targets:
        base = demo.run(target)
        for size in args.sizes:
            subset = first_scenes(args.demo / "data/reference/annotations.json", size,
                                  args.work / args.demo.name / f"reference-{size}.json")
            reference = CocoDataset(subset, args.demo / "data/reference/images")
            run = train(base.model_spec, base.layer, reference,
                        args.work / args.demo.name / f"{target}-{size}",
                        settings=TrainSettings(seed=base.config["train"]["seed"]), compute=compute, cache_dir=cache)
            (evaluation,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), lenient=False),
                                     explain_settings=NAMING, compute=compute, cache_dir=cache, write=False)
            s = evaluation.methods["activation"]
            seen, unseen = s["seen"] or {}, s["unseen"] or {}  # None when no filter's ground truth has one
            rows.append([target, base.layer, str(size), str(len(run.split["seen"])), markdown_cell(s["recall@5"]),
                         markdown_cell(seen.get("recall@5")), markdown_cell(seen.get("recall@20")),
                         markdown_cell(unseen.get("recall@20")), markdown_cell(s["unseen_named@20"])])
            print(" | ".join(rows[-1]), flush=True)
    header = ["target", "layer", "reference scenes", "seen concepts", "R@5", "seen R@5", "seen R@20",
              "unseen R@20", "unseen named@20"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
