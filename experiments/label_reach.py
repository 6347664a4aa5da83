"""How far could the reference labels carry precision@1, and what caps it on EfficientNet?

lavise moves a filter's reference label (its concept of highest IoU on the reference
training images, when above 0.04) first when it is among the explainer's first three
words (``--label-first 3``). On EfficientNet's layers precision@1 stayed 0.66-0.68 on the
1200 evaluation scenes of fresh seeds 27-29 (docs/evaluation.md). This experiment names
the scored filters with the explainer's words alone (``label_first=0``) and reorders them
here, per layer:

- ``label first within K, IoU > m``: the filter's best reference concept moved first
  when it is among the first K words and its IoU exceeds m (K = 3, m = 0.04: lavise's
  default);
- ``label always first, IoU > m``: the best reference concept first whatever the
  explainer says (the filter keeps its words when no concept exceeds m): how far the
  labels alone go.

Each prints precision@1 over all scored filters, over those with a seen ground-truth
concept, over those whose ground truth is only concepts the reference data lacks (the
demo keeps 30 % of its concepts out of the reference scenes), and over the labelled
filters (best IoU above m) at their share. ``--candidates K,M ...`` also evaluates
lavise's own naming with ``label_first=K, label_iou=M``, the confidence fitted for it:

    python experiments/label_reach.py --work /tmp/lavise-naming --seeds 0 --scenes 1200 300 \
        --candidates 3,0.04 10,0.04 10,0.02 5,0.02

On development seed 0 no scored filter with only unseen ground truth had a right first
word, on any layer, whatever the labels did: 22 % and 16 % of EfficientNet's scored
filters on 1200 scenes (26 % and 20 % on 300), 1-4 % of the scene CNN's. That caps
precision@1 at 0.78 and 0.84 on EfficientNet without naming an unseen concept. No
candidate was better on every layer: labels within ten words above IoU 0.02 raised
``blocks.5.0.bn1`` from 0.626 to 0.725 on 1200 scenes but lowered its AUROC from 0.900 to
0.799, and cost the scene CNN's ``features.11`` 0.014 of precision@1 on 300 scenes; the
default stayed (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lavise.datasets.coco import CocoDataset
from lavise.demos.demo import evaluation_scenes
from lavise.evaluate import evaluate
from lavise.runs import load_run
from lavise.settings import ComputeSettings, DemoSettings, EvaluateSettings, ExplainSettings
from lavise.survey import load_survey
from lavise.vocabulary import normalize_concept

LAYERS = ("efficientnet_lite0-blocks.5.0.bn1", "efficientnet_lite0-blocks.6.0.bn1", "scene_cnn-features.11",
          "scene_cnn-features.8")
WINDOWS = (3, 5, 10)
MINIMA = (0.04, 0.02, 0.01, 0.0)


def first_word(words: list[str], label: str | None, iou: float, within: int | None, minimum: float) -> str | None:
    """The first word once the label goes first (within the first ``within`` words; None: always)."""
    if label is None or iou <= minimum:
        return words[0] if words else None
    if within is None or label in words[:within]:
        return label
    return words[0] if words else None


def share_right(right: np.ndarray, chosen: np.ndarray) -> float:
    return float(right[chosen].mean()) if chosen.any() else float("nan")


def cells(values: tuple[float, ...]) -> str:
    *precisions, share = values
    return " / ".join(f"{v:.3f}" for v in precisions) + f" at {share:.0%}"


def layer_row(run: Path, dataset: CocoDataset, compute: ComputeSettings, cache: Path) -> dict:
    tensors, facts = load_survey(run)
    best_iou, best = tensors["label_iou"].float().max(dim=1)
    concepts = [normalize_concept(c) for c in facts["concepts"]]
    seen = {normalize_concept(c) for c in load_run(run).split["seen"]}
    [evaluation] = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), unseen_protocol=False),
                            explain_settings=ExplainSettings(label_first=0), compute=compute, cache_dir=cache,
                            write=False)
    rows = []
    for entry in evaluation.filters:
        truth = {normalize_concept(g["concept"]) for g in entry["ground_truth"]}
        words = entry["methods"]["activation"]["words"]
        if not truth or not words:
            continue
        u = entry["filter"]
        rows.append((words, truth, concepts[int(best[u])], float(best_iou[u])))
    has_seen = np.array([bool(t & seen) for _, t, _, _ in rows])
    row = {"filters": len(rows), "unseen only": int((~has_seen).sum())}
    right = np.array([w[0] in t for w, t, _, _ in rows])
    row["words"] = (right.mean(), share_right(right, has_seen), share_right(right, ~has_seen), float("nan"), 1.0)
    for within in (*WINDOWS, None):
        for minimum in MINIMA:
            name = f"first {within}, IoU > {minimum}" if within else f"label, IoU > {minimum}"
            right = np.array([first_word(w, lab, iou, within, minimum) in t for w, t, lab, iou in rows])
            labelled = np.array([iou > minimum for _, _, _, iou in rows])
            row[name] = (right.mean(), share_right(right, has_seen), share_right(right, ~has_seen),
                         share_right(right, labelled), labelled.mean())
    unlabelled = [(t, lab, iou) for _, t, lab, iou in rows if iou <= 0.04]
    row["unlabelled"] = len(unlabelled)
    row["unlabelled, best is truth"] = sum(lab in t for t, lab, iou in unlabelled if iou > 0)
    row["unlabelled IoU"] = np.median([iou for _, _, iou in unlabelled]) if unlabelled else float("nan")
    return row


def candidate_row(run: Path, dataset: CocoDataset, compute: ComputeSettings, cache: Path, within: int,
                  minimum: float) -> str:
    """lavise's own naming with ``label_first=within, label_iou=minimum``, its confidence fitted
    for it on the survey: P@1, AUROC, the named filters' P@1 at the share named, and how many
    named filters have only ground truth the reference data lacks."""
    seen = {normalize_concept(c) for c in load_run(run).split["seen"]}
    settings = ExplainSettings(label_first=within, label_iou=minimum)
    [evaluation] = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), unseen_protocol=False),
                            explain_settings=settings, compute=compute, cache_dir=cache, write=False)
    summary = evaluation.methods["activation"]
    named_unseen = 0
    for entry in evaluation.filters:
        truth = {normalize_concept(g["concept"]) for g in entry["ground_truth"]}
        method = entry["methods"]["activation"]
        if truth and not truth & seen and method.get("confidence") is not None:
            named_unseen += method["confidence"] >= summary["confidence"]["threshold"]
    confidence = summary["confidence"]
    return (f"label first {within:>2}, IoU > {minimum:<5} P@1 {summary['precision@1']:.3f}  AUROC {confidence['auroc']:.3f}  "
            f"named P@1 {confidence['precision@1_named']:.3f} at {confidence['named']:.0%}  "
            f"({named_unseen} named with only unseen ground truth)  seen R@5 {summary['seen']['recall@5']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-naming"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenes", type=int, nargs="+", default=[1200])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--candidates", nargs="*", default=[], metavar="K,M",
                        help="also evaluate lavise's naming with label_first=K, label_iou=M, confidence and all")
    args = parser.parse_args()
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    for seed in args.seeds:
        world = args.work / f"seed-{seed}" / "05-world"
        demo = DemoSettings(seed=seed)
        for count in args.scenes:
            folder = evaluation_scenes(world, demo, count)
            dataset = CocoDataset(folder / "annotations.json", folder / "images")
            for layer in args.layers:
                row = layer_row(world / "protocol" / layer, dataset, compute, world / "cache")
                print(f"\nseed {seed}, {count} scenes, {layer}: {row['filters']} scored filters; "
                      f"{row['unlabelled']} without a label above 0.04, of which {row['unlabelled, best is truth']} "
                      f"have a best reference concept that is ground truth (median IoU {row['unlabelled IoU']:.3f})")
                print(f"  {row['unseen only']} of them have only concepts the reference data lacks as ground truth; "
                      "P@1 all / with a seen ground-truth concept / only unseen ones / of the labelled filters "
                      "(best reference IoU above the minimum) at their share")
                print(f"  words alone             {cells(row['words'])}")
                for within in (*WINDOWS, None):
                    for m in MINIMA:
                        print(f"  {'label first within ' + str(within) if within else 'label always first':<24}"
                              f"IoU > {m:<5} {cells(row[(f'first {within}' if within else 'label') + f', IoU > {m}'])}",
                              flush=True)
                for candidate in args.candidates:
                    within, minimum = candidate.split(",")
                    print("  " + candidate_row(world / "protocol" / layer, dataset, compute, world / "cache",
                                               int(within), float(minimum)), flush=True)


if __name__ == "__main__":
    main()
