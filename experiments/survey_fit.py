"""Which surveyed filters should the confidence be fitted on, and should a reference label go first?

The run's filter survey (lavise.survey) checks each filter's first word against its ground
truth on the held-out reference images. A filter with no ground-truth concept there can
count as wrong (``all``) or be left out of the fit (``with ground truth``, as evaluate
scores only filters with ground truth). Each is crossed with ``label_first`` 3 (a reference
label among a filter's first three words goes first) and 0 (the explainer's words alone),
and scored on the evaluation scenes: precision@1, the confidence's AUROC, the share of
scored filters named and their precision@1.

Reads the 0.5-world runs that ``python benchmarks/naming_quality.py --seeds S --work WORK``
trained (their surveys included):

    python experiments/survey_fit.py --work /tmp/lavise-naming --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lavise.survey  # noqa: F401  (the module, for its SURVEY_FILTERS)
from lavise.datasets.coco import CocoDataset
from lavise.evaluate import evaluate
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings

LAYERS = ("efficientnet_lite0-blocks.5.0.bn1", "efficientnet_lite0-blocks.6.0.bn1", "scene_cnn-features.11",
          "scene_cnn-features.8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-naming"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    survey_module = sys.modules["lavise.survey"]
    world = args.work / f"seed-{args.seed}" / "05-world"
    dataset = CocoDataset(world / "data" / "evaluation" / "annotations.json", world / "data" / "evaluation" / "images")
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    print("| layer | fitted on | label_first | P@1 | AUROC | named | P@1 named |\n|---|---|---|---|---|---|---|")
    for layer in LAYERS:
        for fitted_on in ("with ground truth", "all"):
            survey_module.SURVEY_FILTERS = fitted_on
            for label_first in (3, 0):
                [evaluation] = evaluate([world / "protocol" / layer], dataset,
                                        settings=EvaluateSettings(methods=("activation",), unseen_protocol=False),
                                        explain_settings=ExplainSettings(label_first=label_first), compute=compute,
                                        cache_dir=world / "cache", write=False)
                scores = evaluation.methods["activation"]
                confidence = scores["confidence"]
                named = confidence["precision@1_named"]
                print(f"| {layer} | {fitted_on} | {label_first} | {scores['precision@1']:.3f} | {confidence['auroc']:.3f} | "
                      f"{confidence['named']:.2f} | {'–' if named is None else f'{named:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
