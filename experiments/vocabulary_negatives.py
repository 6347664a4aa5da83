"""Negatives beyond the seen concepts: does a hinge loss against vocabulary words help?

The explainer's hinge loss (equation 1) ranks the true concept's word above the other
*seen* concepts' words only. At inference the words come from a 20,000-word vocabulary,
so nothing in training keeps the output away from the thousands of other words. This
retrains lavise's explainer with K extra negatives: the K most frequent vocabulary
words that are not seen concept names (``frequent``), or the K vocabulary words nearest
to the seen concepts' words, hard negatives (``nearest``). Scores activation masking on
the demo's evaluation scenes, seen and unseen. ``none`` (no extra negatives) trains as
``lavise train`` does, with the defaults, the demo run's seed and epochs.

    python experiments/vocabulary_negatives.py --demo /tmp/lavise-eval/seed-0 --target scene_cnn

The demo folder must exist (``lavise demo --out DIR``). docs/evaluation.md quotes the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import DemoFolder, NAMING
from lavise.compute import cpu_threads, resolve_device
from lavise.embeddings import concept_vectors, load_word_vectors
from lavise.evaluate import evaluate, markdown_table
from lavise.explainer import TrainingResult, train_explainer
from lavise.reference import reference_rows
from lavise.runs import Run, load_run, split_concepts
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings, TrainSettings
from lavise.storage import save_tensors, write_csv, write_json


def negative_words(vocabulary, seen: list[str], seen_vectors: torch.Tensor, count: int, kind: str) -> torch.Tensor:
    """(count, D) vectors of vocabulary words that are not seen concept names."""
    allowed = torch.tensor([w not in set(seen) for w in vocabulary.words])
    if kind == "frequent":  # the vocabulary is ordered by frequency
        rows = allowed.nonzero().flatten()[:count]
    else:  # nearest to any seen concept's word
        closeness = (vocabulary.unit_vectors @ F.normalize(seen_vectors, dim=1).T).amax(dim=1)
        closeness[~allowed] = -float("inf")
        rows = torch.topk(closeness, count).indices
    return vocabulary.unit_vectors[rows]  # the hinge loss normalises concept vectors anyway


def train_with_negatives(base: Run, reference, settings: TrainSettings, compute: ComputeSettings, cache: Path,
                         negatives) -> tuple[TrainingResult, dict, dict]:
    """The explainer of ``base``'s model and layer trained as lavise.runs.train trains it, with the
    vectors ``negatives(seen, seen_vectors)`` appended to the seen concepts' as extra negatives.

    Returns the result, the concept split and the training counts of a run's config.
    """
    with cpu_threads(compute):
        word_vectors = load_word_vectors(base.config["word_vectors"], cache_dir=cache)
        features = reference_rows(base.target_model(), base.layer, reference, cache_dir=cache, compute=compute,
                                      activation_regions=settings.activation_regions, quantile=settings.region_quantile)
        # the concepts, rows and targets of lavise.runs.train
        names_with_vectors, _, _ = concept_vectors(features.concept_names, word_vectors)
        present = {features.concept_names[i] for i in torch.unique(features.concepts).tolist()}
        seen, unseen = split_concepts([n for n in names_with_vectors if n in present], settings.unseen_fraction, settings.seed)
        seen_index = {name: i for i, name in enumerate(seen)}
        row_names = [features.concept_names[i] for i in features.concepts.tolist()]
        rows = torch.tensor([name in seen_index for name in row_names])
        targets = torch.tensor([seen_index.get(name, -1) for name in row_names])[rows]
        _, seen_vectors, _ = concept_vectors(seen, word_vectors)
        extra = negatives(seen, seen_vectors)
        # targets index the first rows, so every appended word is a negative only
        result = train_explainer(
            features.pooled(settings.pooling)[rows], targets, features.images[rows], torch.cat([seen_vectors, extra]),
            settings, device=resolve_device(compute.device), progress=compute.progress,
        )
    counts = {"training_pairs": int((rows & ~features.regional).sum()), "training_rows": int(rows.sum()),
              "best_epoch": result.best_epoch}
    return result, {"seen": seen, "unseen": unseen}, counts


def write_run(base: Run, out: Path, result: TrainingResult, split: dict, settings: TrainSettings,
              facts: dict) -> Run:
    """A copy of ``base`` (run directory layout: lavise.runs) holding the retrained head."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", "explanations.json", "explanations.csv", "thresholds.safetensors"):
        (out / stale).unlink(missing_ok=True)
    save_tensors(out / "explainer.safetensors", result.head.state_dict())
    write_csv(out / "training.csv", ["epoch", "train_loss", "validation_loss"],
              [[h["epoch"], h["train_loss"], h["validation_loss"]] for h in result.history])
    write_json(out / "split.json", {**base.split, "seed": settings.seed, "unseen_fraction": settings.unseen_fraction,
                                    **split})
    write_json(out / "config.json", {**base.config, "train": settings.to_dict(), **facts})  # last, as train does
    return load_run(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--target", default="scene_cnn", choices=("scene_cnn", "efficientnet_lite0"))
    parser.add_argument("--negatives", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["frequent", "nearest"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-negatives"))
    args = parser.parse_args()

    compute = ComputeSettings(progress=False, threads=0, num_workers=0)
    demo = DemoFolder(args.demo)
    cache, reference, dataset = demo.cache, demo.reference, demo.evaluation
    base = demo.run(args.target)
    vocabulary = load_word_vectors(base.config["word_vectors"], cache_dir=cache).vocabulary(
        size=ExplainSettings().vocabulary_size)
    settings = TrainSettings(seed=base.config["train"]["seed"], epochs=base.config["train"]["epochs"])

    for kind in ["none", *args.kinds]:
        def negatives(seen: list[str], seen_vectors: torch.Tensor) -> torch.Tensor:
            if kind == "none":
                return seen_vectors[:0]
            return negative_words(vocabulary, seen, seen_vectors, args.negatives, kind)

        result, split, facts = train_with_negatives(base, reference, settings, compute, cache, negatives)
        facts["negatives"] = {"kind": kind, "count": 0 if kind == "none" else args.negatives}
        run = write_run(base, args.work / f"{args.demo.name}-{args.target}-{kind}", result, split, settings, facts)
        (evaluation,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), lenient=False),
                                 explain_settings=NAMING, compute=compute, cache_dir=cache, write=False)
        print(f"\n{args.demo.name} {args.target}, negatives: {kind}"
              + ("" if kind == "none" else f" ({args.negatives} words)") + "\n")
        print(markdown_table([evaluation]), flush=True)


if __name__ == "__main__":
    main()
