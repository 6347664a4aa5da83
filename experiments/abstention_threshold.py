"""Does the abstention threshold keep its promise, and would another rule keep it better?

A filter whose confidence is below the calibration's threshold is reported as having no
confident name. The threshold is fitted for precision ``abstain_precision`` (0.9) on the
run's surveyed filters, the 80 held-out reference images of the demo deciding which of
their first words are right. On the 1200 evaluation scenes of fresh seeds 27 and 28 it
named 43-100 % of the scored filters at precision 0.65-0.98 (docs/evaluation.md). This
experiment scores, per layer and on the target's own filters:

- ``calibration``: the mean confidence of the scored filters against their precision@1
  (a calibrated confidence has the two equal);
- ``observed``: the threshold of ``--threshold-rule observed``, the lowest confidence at
  which the surveyed filters at or above it were right 0.9 of the time
  (:func:`lavise.confidence.threshold_for_precision`);
- ``expected``: that of ``--threshold-rule expected``, the lowest at which the surveyed
  filters at or above it have a mean confidence of at least 0.9
  (:func:`lavise.confidence.threshold_for_expected_precision`): the fitted probabilities
  rather than each surveyed filter's one right-or-wrong outcome;
- ``on the target``: the same rule on the scored filters' own confidences, as a threshold
  taken at explain time over the target's filters would be;
- ``hindsight``: the threshold that the scored filters' own right and wrong first words
  would choose: how far this confidence could go if its threshold were perfect.

Reads the 0.5-world runs of ``python benchmarks/naming_quality.py --seeds S --work WORK``:

    python experiments/abstention_threshold.py --work /tmp/lavise-naming --seed 0 --scenes 1200
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from lavise.confidence import threshold_for_expected_precision, threshold_for_precision
from lavise.datasets.coco import CocoDataset
from lavise.demos.demo import evaluation_scenes
from lavise.distributed import Ranks
from lavise.evaluate import evaluate
from lavise.explain import naming_of
from lavise.runs import load_run
from lavise.settings import ComputeSettings, DemoSettings, EvaluateSettings, ExplainSettings

LAYERS = ("efficientnet_lite0-blocks.5.0.bn1", "efficientnet_lite0-blocks.6.0.bn1", "scene_cnn-features.11",
          "scene_cnn-features.8")


def named(confidence: np.ndarray, right: np.ndarray, threshold: float) -> str:
    """'precision at share named' of the scored filters at or above ``threshold``."""
    chosen = confidence >= threshold
    if not chosen.any():
        return "none named"
    return f"{right[chosen].mean():.3f} at {chosen.mean():.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-naming"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, nargs="+", default=[1200])
    args = parser.parse_args()
    world = args.work / f"seed-{args.seed}" / "05-world"
    demo = DemoSettings(seed=args.seed)
    settings = ExplainSettings()
    target = settings.abstain_precision
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    print("| layer | scenes | P@1 | mean confidence | observed | expected | on the target | hindsight | filters |")
    print("|---|---|---|---|---|---|---|---|---|")
    for count in args.scenes:
        folder = evaluation_scenes(world, demo, count)
        dataset = CocoDataset(folder / "annotations.json", folder / "images")
        for layer in LAYERS:
            [evaluation] = evaluate([world / "protocol" / layer], dataset,
                                    settings=EvaluateSettings(methods=("activation",), unseen_protocol=False),
                                    explain_settings=settings, compute=compute, cache_dir=world / "cache", write=False)
            rows = [f["methods"]["activation"] for f in evaluation.filters]
            scored = [r for r in rows if r.get("confidence") is not None and r["precision@1"] is not None]
            confidence = np.array([r["confidence"] for r in scored])
            right = np.array([r["precision@1"] == 1.0 for r in scored])
            # the rules fit the same confidence (only the threshold differs), so one evaluation scores both
            run = load_run(world / "protocol" / layer)
            observed, expected = (naming_of(run, dataclasses.replace(settings, threshold_rule=rule), world / "cache",
                                            Ranks()).calibration.threshold for rule in ("observed", "expected"))
            on_target = threshold_for_expected_precision(confidence, target)
            hindsight = threshold_for_precision(confidence, right, target)
            cells = [named(confidence, right, t) for t in (observed, expected, on_target, hindsight)]
            print(f"| {layer} | {count} | {right.mean():.3f} | {confidence.mean():.3f} | {' | '.join(cells)} | "
                  f"{len(scored)} |", flush=True)


if __name__ == "__main__":
    main()
