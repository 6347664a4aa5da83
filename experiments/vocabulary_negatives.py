"""Negatives beyond the seen concepts: does a hinge loss against vocabulary words help?

The explainer's hinge loss (equation 1) ranks the true concept's word above the other
*seen* concepts' words only. At inference the words come from a 20,000-word vocabulary,
so nothing in training keeps the output away from the thousands of other words. This
retrains lavise's explainer with K extra negatives: the K most frequent vocabulary
words that are not seen concept names (``frequent``), or the K vocabulary words nearest
to the seen concepts' words, hard negatives (``nearest``). Scores activation masking on
the demo's evaluation scenes, seen and unseen.

    python benchmarks/vocabulary_negatives.py --demo /tmp/lavise-eval/seed-0 --target scene_cnn

The demo folder must exist (``lavise demo --out DIR``). docs/evaluation.md quotes the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import lavise.runs
from demo_folder import DemoFolder  # benchmarks/ is on the path when a script in it runs
from lavise.embeddings import load_word_vectors
from lavise.evaluate import evaluate, markdown_table
from lavise.runs import train
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings, TrainSettings


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
    vocabulary = load_word_vectors(cache_dir=cache).vocabulary(size=ExplainSettings().vocabulary_size)
    settings = TrainSettings(seed=base.config["train"]["seed"], epochs=base.config["train"]["epochs"])
    real = lavise.runs.train_explainer

    for kind in ["none", *args.kinds]:
        def with_negatives(vectors, targets, groups, concept_vectors, settings, **kwargs):
            if kind == "none":
                return real(vectors, targets, groups, concept_vectors, settings, **kwargs)
            extra = negative_words(vocabulary, base.split["seen"], concept_vectors, args.negatives, kind)
            # targets index the first rows, so every appended word is a negative only
            return real(vectors, targets, groups, torch.cat([concept_vectors, extra]), settings, **kwargs)

        with mock.patch.object(lavise.runs, "train_explainer", with_negatives):
            run = train(base.model_spec, base.layer, reference, args.work / f"{args.demo.name}-{args.target}-{kind}",
                        settings=settings, compute=compute, cache_dir=cache)
        (evaluation,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), lenient=False),
                                 compute=compute, cache_dir=cache, write=False)
        print(f"\n{args.demo.name} {args.target}, negatives: {kind}"
              + ("" if kind == "none" else f" ({args.negatives} words)") + "\n")
        print(markdown_table([evaluation]), flush=True)


if __name__ == "__main__":
    main()
