"""How much of the demo's precision@1 shortfall is the noise of its ground truth?

Issue 17 asks for precision@1 >= 0.8 on the demo, where ``lavise evaluate`` takes each
filter's ground truth (its concepts with IoU > 0.04) from half of the demo's 300
evaluation scenes. NetDissect's own label, taken from the other half, is ground truth for
only 52-70 % of EfficientNet's scored filters: many filters barely clear the threshold, and
150 scenes decide whether they do. This experiment scores the same runs on more evaluation
scenes of the same world (scene i of a part is drawn from the seed and i alone, so the
first 300 are the demo's own) and prints, per layer and scene count, precision@1 of the
default naming and of the explainer's words alone, the confidence's AUROC and abstention,
NetDissect's precision@1 and how many filters are scored.

Reads the 0.5-world runs that ``python benchmarks/naming_quality.py --seeds S --work WORK``
trained (their surveys included):

    python experiments/evaluation_size.py --work /tmp/lavise-naming --seed 0 --scenes 300 1200
    python experiments/evaluation_size.py --seed 0 --scenes 1200 300 --label-first 3 10

On development seed 0, 1200 scenes raised NetDissect's precision@1 from 0.754 to 0.967
(EfficientNet ``blocks.5.0.bn1``), 0.609 to 0.844, 0.765 to 0.940 and 0.707 to 0.872, and
lavise's default from 0.542 to 0.626, 0.609 to 0.730, 0.789 to 0.894 and 0.646 to 0.853:
the benchmark now scores on 1200 scenes too. ``--label-first 10`` (a label among the first
ten words goes first) raised precision@1 on 1200 scenes by 0.004-0.055 but lowered AUROC
on all four layers (by 0.007-0.031) and moved precision@1 on 300 scenes by -0.005 to
+0.017, so the default stays 3. Measuring the survey's ground truth on half of its
training images as well as the held-out ones (labels from the other half) was tried on
the same seed and lowered AUROC on three of the four layers (``features.11`` 0.809 to
0.737 on 1200 scenes), so the survey keeps the held-out images alone (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lavise.datasets.coco import CocoDataset
from lavise.demos.demo import evaluation_scenes
from lavise.evaluate import evaluate
from lavise.settings import ComputeSettings, DemoSettings, EvaluateSettings, ExplainSettings

LAYERS = ("efficientnet_lite0-blocks.5.0.bn1", "efficientnet_lite0-blocks.6.0.bn1", "scene_cnn-features.11",
          "scene_cnn-features.8")
WORDS_ALONE = ExplainSettings(label_first=0, calibration="simulated")  # lavise 0.5 before the run's filter survey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-naming"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, nargs="+", default=[300, 1200])
    parser.add_argument("--label-first", type=int, nargs="+", default=[3],
                        help="the default naming with each of these label_first (a reference label among the first N words goes first)")
    args = parser.parse_args()
    namings = {"words alone": WORDS_ALONE,
               **{f"0.5, label_first {n}": ExplainSettings(label_first=n) for n in args.label_first}}
    world = args.work / f"seed-{args.seed}" / "05-world"
    demo = DemoSettings(seed=args.seed)
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    print("| layer | scenes | naming | P@1 | AUROC | named | P@1 named | NetDissect P@1 | filters |")
    print("|---|---|---|---|---|---|---|---|---|")
    for count in args.scenes:
        folder = evaluation_scenes(world, demo, count)
        dataset = CocoDataset(folder / "annotations.json", folder / "images")
        for layer in LAYERS:
            for naming, settings in namings.items():
                [evaluation] = evaluate([world / "protocol" / layer], dataset,
                                        settings=EvaluateSettings(methods=("activation", "netdissect"),
                                                                  unseen_protocol=False),
                                        explain_settings=settings, compute=compute, cache_dir=world / "cache",
                                        write=False)
                scores, netdissect = evaluation.methods["activation"], evaluation.methods["netdissect"]
                confidence = scores["confidence"]
                named = confidence["precision@1_named"]
                print(f"| {layer} | {count} | {naming} | {scores['precision@1']:.3f} | {confidence['auroc']:.3f} | "
                      f"{confidence['named']:.2f} | {'–' if named is None else f'{named:.3f}'} | "
                      f"{netdissect['precision@1']:.3f} | {scores['filters']} |", flush=True)


if __name__ == "__main__":
    main()
