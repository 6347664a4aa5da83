"""Convex combinations of seen words (ConSE): does naming by mixture reach unseen concepts?

ConSE (Norouzi et al., ICLR 2014) names an image of an unseen class with the
probability-weighted mean of the word vectors of its T most likely seen classes, rather
than with a regressed vector. Here the explainer's scores against the seen concepts'
words (vᵀv̂, the quantity its hinge loss ranks) give softmax weights; the filter's words
are then the vocabulary words nearest that mixture, ranked as usual. T = 1 names every
image with one seen concept's neighbours; larger T lands between seen concepts, where a
held-out concept might lie.

    python experiments/conse.py --demo /tmp/lavise-eval/seed-0 --target scene_cnn

Retrains the demo run's explainer with lavise's defaults (region pooling, lr 1e-3) and
scores activation masking with the plain head and with ConSE heads of several T.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from common import DemoFolder, NAMING
from lavise.embeddings import concept_vectors, load_word_vectors
from lavise.evaluate import evaluate, markdown_table
from lavise.runs import train
from lavise.settings import ComputeSettings, EvaluateSettings, TrainSettings


class ConSEHead(nn.Module):
    """The explainer's output replaced by the softmax-weighted mean of its T best seen words."""

    def __init__(self, head: nn.Module, seen_vectors: torch.Tensor, top: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.head, self.top, self.temperature = head, top, temperature
        self.register_buffer("seen", seen_vectors)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        scores = self.head(pooled) @ self.seen.T
        best = torch.topk(scores, min(self.top, scores.shape[1]), dim=1)
        weights = torch.softmax(best.values / self.temperature, dim=1)
        return torch.einsum("nt,ntd->nd", weights, self.seen[best.indices])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--target", default="scene_cnn", choices=("scene_cnn", "efficientnet_lite0"))
    parser.add_argument("--tops", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the weights")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-conse"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    compute = ComputeSettings(progress=False, threads=args.threads, num_workers=0)
    demo = DemoFolder(args.demo)
    cache, reference, dataset = demo.cache, demo.reference, demo.evaluation
    base = demo.run(args.target)
    run = train(base.model_spec, base.layer, reference,
                args.work / f"{args.demo.name}-{args.target}",
                settings=TrainSettings(seed=base.config["train"]["seed"], epochs=base.config["train"]["epochs"],
                                       pooling="region", learning_rate=1e-3),
                compute=compute, cache_dir=cache)
    _, seen_vectors, _ = concept_vectors(run.split["seen"], load_word_vectors(cache_dir=cache))
    heads = {"plain": run} | {
        f"ConSE T={t}, temperature {args.temperature:g}": replace(run, head=ConSEHead(run.head, seen_vectors, t, args.temperature).eval()) for t in args.tops
    }
    for name, variant in heads.items():
        (evaluation,) = evaluate([variant], dataset, settings=EvaluateSettings(methods=("activation",), lenient=True),
                                 explain_settings=NAMING, compute=compute, cache_dir=cache, write=False)
        print(f"\n{args.demo.name} {args.target}, {name}\n")
        print(markdown_table([evaluation]))


if __name__ == "__main__":
    main()
