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

    python benchmarks/ranking_experiment.py --work /tmp/lavise-dev --seeds 0 1 2

WORK is a folder written by ``benchmarks/fresh_seeds.py`` (its ``seed-S/protocol`` runs).
Prints seen recall@5/10/20, all-concept recall@5 and unseen recall@20, mean ± sd over
the seeds, per layer and ranking.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from demo_folder import DemoFolder  # benchmarks/ is on the path when a script in it runs
from evaluate_demo import print_mean_sd_rows
from fresh_seeds import LAYERS
from lavise.embeddings import Vocabulary, WordVectors, load_word_vectors
from lavise.evaluate import Evaluation, evaluate, score_filters
from lavise.explain import feature_inputs, nearest_words, quantile_thresholds, rank_words, top_images
from lavise.features import target_features
from lavise.runs import Run, load_run
from lavise.settings import ComputeSettings, EvaluateSettings


@dataclass
class ScoredLayer:
    """One protocol run on its demo's evaluation scenes: what the experiments here share."""

    seed: int
    name: str  # "target layer"
    demo: DemoFolder
    run: Run
    evaluation: Evaluation  # lavise's default naming, for its ground truth and as a check
    truth: list[list[str]]  # per filter, its ground-truth concepts
    scored: torch.Tensor  # (f,) the filters with ground truth
    maps: torch.Tensor  # (N, d, h, w) on the evaluation scenes
    thresholds: torch.Tensor  # (d,)
    chosen: torch.Tensor  # (d, p) top scenes
    word_vectors: WordVectors
    vocabulary: Vocabulary  # the default 20,000 words

    @property
    def scored_truth(self) -> list[list[str]]:
        return [self.truth[u] for u in self.scored.tolist()]


def protocol_layers(work: Path, seeds: list[int], explainer: str, compute: ComputeSettings,
                    top: int = 25) -> Iterator[ScoredLayer]:
    """Every protocol run of ``explainer`` in ``work``, seed by seed and layer by layer."""
    for seed in seeds:
        demo = DemoFolder(work / f"seed-{seed}")
        for target, layers in LAYERS.items():
            for layer in layers:
                run = load_run(demo.path / "protocol" / f"{target}-{layer}-{explainer}")
                [evaluation] = evaluate([run], demo.evaluation, settings=EvaluateSettings(methods=("activation",)),
                                        compute=compute, cache_dir=demo.cache, write=False)
                truth = [[g["concept"] for g in f["ground_truth"]] for f in evaluation.filters]
                maps = target_features(run.target_model(), layer, demo.evaluation, cache_dir=demo.cache, progress=False).maps
                word_vectors = load_word_vectors(run.config["word_vectors"], cache_dir=demo.cache)
                yield ScoredLayer(
                    seed, f"{target} {layer}", demo, run, evaluation, truth,
                    torch.tensor([u for u, t in enumerate(truth) if t]), maps, quantile_thresholds(maps, 0.005),
                    top_images(maps, top), word_vectors, word_vectors.vocabulary(size=20_000),
                )


def filter_vectors(run, maps, thresholds, chosen, scored, chunk: int = 2048) -> torch.Tensor:
    """(f, p, D) unit explainer outputs for each scored filter's top images (activation masking)."""
    inputs = feature_inputs("activation", maps, thresholds, torch.device("cpu"), run.pooling)
    p = chosen.shape[1]
    filters, rows = scored.repeat_interleave(p), chosen[scored].flatten()
    head = run.head.eval()
    with torch.inference_mode():
        out = [F.normalize(head(inputs(filters[i : i + chunk], rows[i : i + chunk])), dim=1)
               for i in range(0, len(rows), chunk)]
    return torch.cat(out).reshape(len(scored), p, -1)


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
        vectors = filter_vectors(layer.run, layer.maps, layer.thresholds, layer.chosen, layer.scored)
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
