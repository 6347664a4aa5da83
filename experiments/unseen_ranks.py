"""How far the explainer's output is from a held-out concept's word: ranks, not recall.

Recall@20 of unseen concepts is about 0 on the demo (docs/evaluation.md). This script
asks how close it comes. For every scored filter and each of its ground-truth concepts,
it takes the explainer's output on each of the filter's 25 top evaluation scenes
(lavise's default input: activation masking with the run's pooling), ranks the
vocabulary's 20,000 words by cosine, and records the concept word's best rank over the
images (0 = nearest). Seen and unseen concepts are reported apart: the share whose best
rank is within 20, 100 and 1,000, and the median.

    python experiments/unseen_ranks.py --work /tmp/lavise-dev --seeds 0 1 2

WORK is a folder written by ``benchmarks/fresh_seeds.py`` (its ``seed-S/protocol`` runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import filter_vectors, protocol_layers
from lavise.settings import ComputeSettings


def best_ranks(vectors: torch.Tensor, vocabulary: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """(p, D) unit outputs, (V, D) unit words, (c,) word rows -> (c,) best rank over the p outputs."""
    similarity = vectors @ vocabulary.T  # (p, V)
    own = similarity[:, words]  # (p, c)
    ranks = (similarity.unsqueeze(2) > own.unsqueeze(1)).sum(dim=1)  # (p, c)
    return ranks.min(dim=0).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-dev"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--explainer", default="lavise", choices=("lavise", "paper"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    ranks: dict[str, dict[str, list[int]]] = {}
    for layer in protocol_layers(args.work, args.seeds, args.explainer, compute):
        index = {w: i for i, w in enumerate(layer.vocabulary.words)}
        vectors = filter_vectors(layer.run.head, layer.run.pooling, layer.maps, layer.thresholds, layer.chosen, layer.scored)
        seen = set(layer.run.split["seen"])
        cell = ranks.setdefault(layer.name, {"seen": [], "unseen": []})
        for row, concepts in enumerate(layer.scored_truth):
            concepts = [c for c in concepts if c in index]
            if not concepts:
                continue
            best = best_ranks(vectors[row], layer.vocabulary.unit_vectors, torch.tensor([index[c] for c in concepts]))
            for concept, rank in zip(concepts, best.tolist()):
                cell["seen" if concept in seen else "unseen"].append(rank)
        print(f"seed {layer.seed} {layer.name} done", flush=True)
    print(f"\nBest rank of a filter's ground-truth concept word over its 25 top scenes, seeds {args.seeds}, "
          f"explainer {args.explainer}, 20,000 words (0 = nearest); (filter, concept) pairs\n")
    print("| layer | concepts | pairs | rank < 20 | rank < 100 | rank < 1,000 | median rank |")
    print("|---|---|---|---|---|---|---|")
    for layer, parts in ranks.items():
        for part in ("seen", "unseen"):
            values = np.array(parts[part])
            if not len(values):
                print(f"| {layer} | {part} | 0 | – | – | – | – |")
                continue
            shares = " | ".join(f"{(values < k).mean():.3f}" for k in (20, 100, 1000))
            print(f"| {layer} | {part} | {len(values)} | {shares} | {int(np.median(values))} |")


if __name__ == "__main__":
    main()
