"""How a filter's words are chosen from its top images: votes, mean vectors, hubness.

For every scored filter of a run, the explainer turns each of the filter's p most
activated evaluation scenes into a vector in the word space (the run's own method of
``lavise explain``: activation masking with the run's pooling). This script ranks the
vocabulary from those vectors in several ways and scores each on the demo's evaluation
scenes, exactly as ``lavise evaluate`` does:

- ``vote s=K``: each image votes for its K nearest words; most votes first, ties by
  summed similarity (``lavise explain --ranking frequency --words-per-image K``, the
  paper's with K = 5);
- ``first-choice s=K``: words that are some image's nearest first, by how many images,
  then as ``vote s=K`` (``lavise explain --words-per-image K``, lavise's with K = 5);
- ``rank-weighted 1/r`` and ``1/r²``: each image's 20 nearest words, the r-th weighted
  1/r or 1/r²;
- ``mean``: the words nearest the mean of the images' unit vectors;
- ``weighted mean``: the same, each image weighted by the filter's peak activation on it;
- ``csls``: the mean vector's similarities less each word's mean similarity to its 10
  nearest filter vectors of the layer, the hubness correction of Conneau et al. (2018).

    python experiments/ranking.py --work /tmp/lavise-dev --seeds 0 1 2

WORK is a folder written by ``benchmarks/fresh_seeds.py`` (its ``seed-S/protocol`` runs).
Prints seen recall@5/10/20, all-concept recall@5 and unseen recall@20, mean ± sd over
the seeds, per layer and ranking.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import filter_vectors, print_mean_sd_rows, protocol_layers
from lavise.explain import rank_words
from lavise.naming import nearest_words
from lavise.metrics import score_filters
from lavise.settings import ComputeSettings


def rankings(vectors: torch.Tensor, peaks: torch.Tensor, vocab: torch.Tensor, top: int = 20) -> dict[str, list[list[int]]]:
    f, p, _ = vectors.shape
    result = {}
    for s in (1, 2, 3, 5, 20):
        ids, sims = nearest_words(vectors.reshape(f * p, -1), vocab, s)
        ranked = rank_words(ids.reshape(f, p * s), sims.reshape(f, p * s), top, words_per_image=s, ranking="frequency")
        result[f"vote s={s}"] = [[r.word for r in words] for words in ranked]
        if s > 1:
            ranked = rank_words(ids.reshape(f, p * s), sims.reshape(f, p * s), top, words_per_image=s, ranking="first-choice")
            result[f"first-choice s={s}"] = [[r.word for r in words] for words in ranked]
    ids, sims = nearest_words(vectors.reshape(f * p, -1), vocab, 20)
    ids = ids.reshape(f, p, 20)
    for name, weight in (("rank-weighted 1/r", 1 / torch.arange(1, 21.0)), ("rank-weighted 1/r²", 1 / torch.arange(1, 21.0) ** 2)):
        result[name] = weighted_votes(ids, weight.expand(f, p, 20), top)
    mean = F.normalize(vectors.mean(dim=1), dim=1)
    weights = peaks / peaks.sum(dim=1, keepdim=True)
    weighted = F.normalize((vectors * weights.unsqueeze(2)).sum(dim=1), dim=1)
    result["mean"] = (mean @ vocab.T).topk(top, dim=1).indices.tolist()
    result["weighted mean"] = (weighted @ vocab.T).topk(top, dim=1).indices.tolist()
    sims = mean @ vocab.T  # (f, V)
    hub = sims.topk(min(10, f), dim=0).values.mean(dim=0)  # (V,)
    result["csls"] = (2 * sims - hub).topk(top, dim=1).indices.tolist()
    return result


def weighted_votes(ids: torch.Tensor, weights: torch.Tensor, top: int) -> list[list[int]]:
    """(f, p, s) word ids and their weights -> each filter's ``top`` words by summed weight."""
    f = ids.shape[0]
    totals = torch.zeros(f, int(ids.max()) + 1)
    totals.scatter_add_(1, ids.reshape(f, -1), weights.reshape(f, -1).float())
    return totals.topk(top, dim=1).indices.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-dev"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--explainer", default="lavise", choices=("lavise", "paper"))
    parser.add_argument("--top-images", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    table: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for layer in protocol_layers(args.work, args.seeds, args.explainer, compute, args.top_images):
        peaks = layer.maps.flatten(2).amax(dim=2).T.gather(1, layer.chosen)[layer.scored]  # (f, p)
        vectors = filter_vectors(layer.run.head, layer.run.pooling, layer.maps, layer.thresholds, layer.chosen, layer.scored)
        vocab = layer.vocabulary
        for name, ranked in rankings(vectors, peaks, vocab.unit_vectors).items():
            words = [[vocab.words[w] for w in r] for r in ranked]
            summary, _ = score_filters(words, layer.scored_truth, set(layer.run.split["seen"]))
            if name == "first-choice s=5" and args.top_images == 25:  # what evaluate does by default: must match
                assert abs(summary["seen"]["recall@5"] - layer.evaluation.methods["activation"]["seen"]["recall@5"]) < 1e-9
            table.setdefault(layer.name, {}).setdefault(name, []).append((
                summary["seen"]["recall@5"], summary["seen"]["recall@10"], summary["seen"]["recall@20"],
                summary["recall@5"], summary["unseen"]["recall@20"] if summary["unseen"] else 0.0))
        print(f"seed {layer.seed} {layer.name} done", flush=True)
    print(f"\nRecall, mean ± sd over seeds {args.seeds}, explainer {args.explainer}\n")
    print("| layer | ranking | seen R@5 | seen R@10 | seen R@20 | all R@5 | unseen R@20 |")
    print("|---|---|---|---|---|---|---|")
    print_mean_sd_rows(table)


if __name__ == "__main__":
    main()
