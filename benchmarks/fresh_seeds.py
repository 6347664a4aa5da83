"""The unbiased report of issue 5: the paper's explainer against lavise's, on fresh seeds.

lavise's choices were made on the development seeds 0, 1 and 2 (docs/evaluation.md):
the explainer (region pooling, learning rate 1e-3, activation masking) for lavise 0.2,
the first-choice word ranking for 0.3, and training on activation regions too, the
candidate of protocol 3. This script reports them on seeds and layers fixed before
looking (docs/evaluation.md, "Fresh seeds"): for each seed it builds the demo's data (new
scenes, a new draw of concepts and of which are held out, a new scene CNN), trains the
explainers on two layers of each demo target, and evaluates every method on the demo's
evaluation scenes, with the paper's word ranking (frequency) and, for the feature-space
methods, lavise's (first-choice).

    python benchmarks/fresh_seeds.py --protocol 3 --seeds 15 16 17 18 19 --work /tmp/lavise-fresh

Protocol 1 (lavise 0.2, seeds 5-9, commit 454449d) scored the paper's ranking only;
protocol 2 (lavise 0.3, seeds 10-14, fixed in the commit that added first-choice) adds
lavise's ranking and compares the paper's method with lavise's whole default; protocol 3
(seeds 15-19, fixed in the commit that added activation-region training, before any of
them ran) adds the explainer trained on activation regions too, and prints the rule
that decides whether it becomes the default (:func:`print_decision`); protocol 4 (seeds
20-24, fixed after protocol 3 and before any of its seeds ran) trains only lavise 0.3's
explainer and the candidate, with the rule's unseen clause allowing 0.01. Each seed's scores
are saved to WORK/seed-S/scores-v2.json (protocol 2) or scores-v3.json (protocol 3) as
soon as they exist, so an interrupted run resumes where it stopped; a seed scored under
an earlier protocol is scored again (its demo data and caches are reused). Prints one
Markdown table (mean ± sd over the seeds) of seen, unseen and all-concept recall, then
each seed's seen recall@5 for each comparison: on how many seeds the second is higher,
and whether the mean ± sd intervals overlap.

These protocols ran on lavise 0.2-0.4, and keep their demo world and naming
(``DemoSettings.as_in_0_4``, ``ExplainSettings.as_in_0_4``) so that they reproduce;
lavise 0.5's naming is measured by ``benchmarks/naming_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluate_demo import mean_sd  # benchmarks/ is on the path when a script in it runs
from lavise.datasets.coco import CocoDataset
from lavise.demos.demo import run_demo
from lavise.evaluate import evaluate
from lavise.models import ModelSpec
from lavise.runs import train
from lavise.settings import ComputeSettings, DemoSettings, EvaluateSettings, ExplainSettings, TrainSettings


@dataclass(frozen=True)
class Explainer:
    """One way of training the explainer, and the methods scored with it."""

    name: str
    pooling: str
    learning_rate: float
    methods: tuple[str, ...]
    activation_regions: int = 0


EXPLAINERS = (
    # The authors' code: global mean of F ⊙ M, Adam at 1e-4; every method of the paper.
    Explainer("paper", "mean", 1e-4, ("original", "image", "activation", "attention", "cosine-attention", "netdissect")),
    # lavise 0.2-0.3: mean inside the mask, Adam at 1e-3 (chosen on seeds 0-2).
    Explainer("lavise", "region", 1e-3, ("activation", "attention")),
    # Protocol 3's candidate: lavise's, plus 3 activation-region rows per (image, concept)
    # pair (experiments/activation_masks.py on seeds 0-2).
    Explainer("lavise-regions", "region", 1e-3, ("activation", "attention"), activation_regions=3),
)

# Which explainers each protocol trains, and the file its scores go to.
PROTOCOLS = {2: (EXPLAINERS[:2], "scores-v2.json"), 3: (EXPLAINERS, "scores-v3.json"), 4: (EXPLAINERS[1:], "scores-v4.json")}
SEEDS = {2: [10, 11, 12, 13, 14], 3: [15, 16, 17, 18, 19], 4: [20, 21, 22, 23, 24]}
# How much lower the candidate's mean unseen recall@20 may be on a layer. Protocol 3
# allowed none; it rejected the candidate on that clause alone, by 0.001 and 0.005 (one
# filter at one seed) at the floor of a measure that is about 0 for every explainer.
# Protocol 4 allows 0.01 and repeats the test on new seeds.
UNSEEN_TOLERANCE = {3: 0.0, 4: 0.01}

# Two layers per target, fixed before the fresh seeds were run: the demo's layer, and a
# second post-activation layer (a deeper one for EfficientNet, an earlier one for the
# scene CNN, whose features.11 is its last).
LAYERS = {
    "efficientnet_lite0": ("blocks.5.0.bn1", "blocks.6.0.bn1"),
    "scene_cnn": ("features.11", "features.8"),
}

# lavise's word ranking is scored for the feature-space methods it would name with.
FIRST_CHOICE_METHODS = ("activation", "attention", "cosine-attention")

# The comparison of the issue: the paper's activation masking (authors' explainer,
# frequency ranking) against lavise's default (lavise's explainer, activation masking,
# first-choice ranking). Protocol 3 also compares lavise 0.3's default with the candidate.
BASELINE, DEFAULT = "paper activation", "lavise activation first-choice"
CANDIDATE = "lavise-regions activation first-choice"
COMPARISONS = {2: [(BASELINE, DEFAULT)], 3: [(BASELINE, DEFAULT), (BASELINE, CANDIDATE), (DEFAULT, CANDIDATE)],
               4: [(DEFAULT, CANDIDATE)]}

# Image masking re-runs the network for every (filter, top image) pair: about 15 minutes
# per EfficientNet layer and seed on two CPU cores. It is scored on the scene CNN only;
# on the development seeds it named nearly every EfficientNet filter alike (recall@5
# 0.001, docs/evaluation.md).
IMAGE_MASKING_TARGETS = ("scene_cnn",)

COLUMNS = [
    ("R@5", ("recall@5",)), ("R@10", ("recall@10",)), ("R@20", ("recall@20",)),
    ("seen R@5", ("seen", "recall@5")), ("seen R@10", ("seen", "recall@10")), ("seen R@20", ("seen", "recall@20")),
    ("unseen R@5", ("unseen", "recall@5")), ("unseen R@10", ("unseen", "recall@10")),
    ("unseen R@20", ("unseen", "recall@20")), ("unseen named@20", ("unseen_named@20",)),
]


def scores_of_seed(seed: int, work: Path, compute: ComputeSettings, protocol: int) -> dict:
    """{"target layer": {"explainer method": summary}} for one seed, computed once."""
    explainers, file_name = PROTOCOLS[protocol]
    out = work / f"seed-{seed}"
    saved = out / file_name
    if saved.is_file():
        return json.loads(saved.read_text())
    started = time.perf_counter()
    summary = run_demo(out, DemoSettings.as_in_0_4(seed=seed), compute)  # the protocols ran on lavise 0.4's demo
    reference_dir = out / "data" / "reference"
    evaluation_dir = out / "data" / "evaluation"
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")
    dataset = CocoDataset(evaluation_dir / "annotations.json", evaluation_dir / "images")
    specs = {
        "efficientnet_lite0": ModelSpec("efficientnet_lite0", "IMAGENET"),
        "scene_cnn": ModelSpec("scene_cnn", None, str(out / "models" / "scene_cnn.pt")),
    }
    scores: dict[str, dict] = {}
    for target, layers in LAYERS.items():
        for layer in layers:
            for explainer in explainers:
                settings = TrainSettings(seed=seed, epochs=DemoSettings().explainer_epochs,
                                         pooling=explainer.pooling, learning_rate=explainer.learning_rate,
                                         activation_regions=explainer.activation_regions)
                run = train(specs[target], layer, reference, out / "protocol" / f"{target}-{layer}-{explainer.name}",
                            settings=settings, compute=compute, cache_dir=out / "cache")
                methods = tuple(m for m in explainer.methods if m != "image" or target in IMAGE_MASKING_TARGETS)
                for ranking, suffix in (("frequency", ""), ("first-choice", " first-choice")):
                    if ranking == "first-choice":
                        methods = tuple(m for m in methods if m in FIRST_CHOICE_METHODS)
                    [evaluation] = evaluate([run], dataset, settings=EvaluateSettings(methods=methods),
                                            explain_settings=ExplainSettings.as_in_0_4(ranking=ranking),
                                            compute=compute, cache_dir=out / "cache")
                    for method, result in evaluation.methods.items():
                        scores.setdefault(f"{target} {layer}", {})[f"{explainer.name} {method}{suffix}"] = result
                print(f"seed {seed}: {target} {layer} {explainer.name} done", flush=True)
    scores["_seconds"] = time.perf_counter() - started
    scores["_unseen_concepts"] = summary["unseen_concepts"]
    saved.write_text(json.dumps(scores, indent=1))
    return scores


def pick(summary: dict, keys: tuple[str, ...]) -> float | None:
    value = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def print_decision(results: dict, seeds: list[int], targets: list[str], unseen_tolerance: float) -> None:
    """The rule of protocols 3 and 4, fixed before their seeds ran: the candidate becomes
    the default if its mean seen recall@5 is higher than lavise 0.3's on at least 3 of the
    4 layers, lower by no more than 0.02 on any, and its mean unseen recall@20 is nowhere
    lower by more than ``unseen_tolerance`` (protocol 3: 0, protocol 4: 0.01)."""

    def mean(row: str, target: str, keys: tuple[str, ...]) -> float:
        return float(np.mean([pick(results[s][target][row], keys) or 0.0 for s in seeds]))

    seen = [mean(CANDIDATE, t, ("seen", "recall@5")) - mean(DEFAULT, t, ("seen", "recall@5")) for t in targets]
    unseen = [mean(CANDIDATE, t, ("unseen", "recall@20")) - mean(DEFAULT, t, ("unseen", "recall@20")) for t in targets]
    higher = sum(d > 0 for d in seen)
    adopt = higher >= 3 and min(seen) >= -0.02 and min(unseen) >= -unseen_tolerance
    print(f"\nDecision: seen recall@5 higher on {higher} of {len(targets)} layers (differences "
          + ", ".join(f"{d:+.3f}" for d in seen) + "); unseen recall@20 differences "
          + ", ".join(f"{d:+.3f}" for d in unseen) + f" → {'adopt' if adopt else 'do not adopt'} {CANDIDATE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the protocol's (2: 10-14, 3: 15-19)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-fresh"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--protocol", type=int, choices=sorted(PROTOCOLS), default=3,
                        help="2: the paper's and lavise 0.3's explainers (seeds 10-14); 3: also the candidate "
                             "(15-19); 4: lavise 0.3's and the candidate's, a looser unseen clause (20-24)")
    args = parser.parse_args()
    explainers = PROTOCOLS[args.protocol][0]
    args.seeds = args.seeds or SEEDS[args.protocol]

    # Decoding in the main process and every core for torch: most of the time goes to
    # forward passes over cached or small images, which one thread left half idle.
    compute = ComputeSettings(progress=False, threads=args.threads, num_workers=0)
    results = {seed: scores_of_seed(seed, args.work, compute, args.protocol) for seed in args.seeds}
    targets = [f"{t} {layer}" for t, layers in LAYERS.items() for layer in layers]
    rows = [f"{e.name} {m}{suffix}" for e in explainers for m in e.methods
            for suffix in ("", " first-choice") if not suffix or m in FIRST_CHOICE_METHODS]

    print(f"\nExact match, mean ± sd over seeds {args.seeds}; filters: those with ground truth (mean)\n")
    header = ["target", "explainer, method", "filters", *[name for name, _ in COLUMNS]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for target in targets:
        for row in rows:
            if row not in results[args.seeds[0]][target]:
                continue
            summaries = [results[s][target][row] for s in args.seeds]
            unseen = row.endswith("netdissect")  # it was given every concept's labels
            cells = [target, row, f"{np.mean([s['filters'] for s in summaries]):.0f}"]
            for name, keys in COLUMNS:
                cell = mean_sd([pick(s, keys) for s in summaries])
                cells.append(f"({cell})" if unseen and name.startswith("unseen") else cell)
            print("| " + " | ".join(cells) + " |")

    for before_row, after_row in COMPARISONS[args.protocol]:
        print(f"\nSeen recall@5 per seed: {before_row} → {after_row} (better: seeds where the second is higher; "
              "mean ± sd overlap: whether the two intervals meet)\n")
        print("| target | " + " | ".join(f"seed {s}" for s in args.seeds) + " | better | mean ± sd overlap |")
        print("|" + "---|" * (len(args.seeds) + 3))
        for target in targets:
            before = np.array([pick(results[s][target][before_row], ("seen", "recall@5")) for s in args.seeds])
            after = np.array([pick(results[s][target][after_row], ("seen", "recall@5")) for s in args.seeds])
            cells = [f"{b:.3f} → {a:.3f}" for b, a in zip(before, after)]
            low, high = sorted([(before.mean(), before.std(ddof=1)), (after.mean(), after.std(ddof=1))])
            overlap = "yes" if low[0] + low[1] >= high[0] - high[1] else "no"
            print(f"| {target} | " + " | ".join(cells) + f" | {int((after > before).sum())} of {len(args.seeds)} | {overlap} |")
    if args.protocol in UNSEEN_TOLERANCE:
        print_decision(results, args.seeds, targets, UNSEEN_TOLERANCE[args.protocol])
    print(f"\nTime per seed (demo, {len(explainers) * len(targets)} explainers, evaluation; less where the seed's "
          "demo was already built): "
          + ", ".join(f"seed {s}: {results[s]['_seconds']:.0f} s" for s in args.seeds))


if __name__ == "__main__":
    main()
