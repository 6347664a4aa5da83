"""Train the explainer on activation-shaped regions too, as it sees at inference.

lavise's explainer is trained on the mean of the features inside each concept's mask,
but at inference it gets the mean inside one filter's region above T_u, which covers a
few cells of the concept. This script adds, for each reference (image, concept) pair,
K extra training rows shaped like that: for the K filters most active inside the mask,
the mean of the features where the filter exceeds its T_u (over the reference images)
and the mask covers at least half a cell. It retrains the run's explainer with the same
settings and scores both on the demo's evaluation scenes (activation masking,
first-choice ranking, exact match), seen and unseen.

lavise now builds such rows itself (``lavise.reference.reference_rows(..., activation_regions=k)``,
three by default since 0.4); this script is kept as the record of the development-seed
measurement that chose it, so its figures in docs/evaluation.md stay reproducible.

    python experiments/activation_masks.py --work /tmp/lavise-dev --seeds 0 1 2

WORK is a folder written by ``benchmarks/fresh_seeds.py`` (its ``seed-S/protocol`` runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import ScoredLayer, filter_vectors, print_mean_sd_rows, protocol_layers
from lavise.datasets import BadImage, load_rgb
from lavise.embeddings import concept_vectors
from lavise.explain import rank_words
from lavise.naming import nearest_words
from lavise.explainer import train_explainer
from lavise.features import target_features
from lavise.metrics import score_filters
from lavise.models import Preprocessing, preprocess_masks
from lavise.regions import masks_to_grid, quantile_thresholds
from lavise.settings import ComputeSettings


def reference_masks(reference, preprocessing: Preprocessing):
    """(image index, concepts, (m, H, W) masks) of each reference image with masks, read and
    preprocessed as lavise's feature extraction does; unreadable images and masks that do
    not fit are passed over, as there."""
    for index in range(len(reference)):
        try:
            image = load_rgb(reference.image_path(index))
        except BadImage:
            continue
        try:
            concepts, masks = reference.masks(index, image.size)
        except ValueError:
            continue
        if concepts:
            yield index, concepts, preprocess_masks(masks, preprocessing)


def training_rows(run, reference, cache: Path, extra: int,
                  compute: ComputeSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, d) pooled vectors, (n,) seen-concept index, (n,) image, (n,) whether the row is a
    whole mask: each mask's row followed by up to ``extra`` activation-region rows."""
    model = run.target_model()
    features = target_features(model, run.layer, reference, cache_dir=cache, compute=compute)
    row_of_path = {p: i for i, p in enumerate(features.paths)}
    maps = features.maps
    thresholds = quantile_thresholds(maps, 0.005)
    seen = {name: i for i, name in enumerate(run.split["seen"])}
    vectors, targets, images, whole = [], [], [], []
    for index, concepts, masks in reference_masks(reference, model.preprocessing):
        row = row_of_path.get(str(reference.image_path(index)))
        if row is None:
            continue
        fm = maps[row]  # (d, h, w)
        cells = masks_to_grid(masks, tuple(fm.shape[-2:]))  # (m, h, w)
        for concept, coverage in zip(concepts, cells):
            name = reference.concepts[concept]
            if name not in seen or coverage.sum() <= 0:
                continue
            weight = coverage.flatten()
            flat = fm.flatten(1)
            vectors.append(flat @ weight / weight.sum())
            targets.append(seen[name])
            images.append(row)
            whole.append(True)
            inside = weight >= 0.5
            if extra == 0 or not inside.any():
                continue
            strongest = flat[:, inside].mean(dim=1).topk(extra).indices
            for u in strongest.tolist():
                region = inside & (flat[u] > thresholds[u])
                if region.any():
                    vectors.append(flat[:, region].mean(dim=1))
                    targets.append(seen[name])
                    images.append(row)
                    whole.append(False)
    return torch.stack(vectors), torch.tensor(targets), torch.tensor(images), torch.tensor(whole)


def seen_unseen(head: torch.nn.Module, layer: ScoredLayer) -> tuple[float, float]:
    """Seen recall@5 and unseen recall@20 of ``head`` on the layer (activation masking, first-choice)."""
    # the rows are means inside masks and regions: region pooling, whatever the run's
    vectors = filter_vectors(head, "region", layer.maps, layer.thresholds, layer.chosen, layer.scored)  # (f, p, D)
    f, p, _ = vectors.shape
    ids, sims = nearest_words(vectors.reshape(f * p, -1), layer.vocabulary.unit_vectors, 5)
    ranked = rank_words(ids.reshape(f, p * 5), sims.reshape(f, p * 5), 20, words_per_image=5, ranking="first-choice")
    words = [[layer.vocabulary.words[r.word] for r in filter_words] for filter_words in ranked]
    summary, _ = score_filters(words, layer.scored_truth, set(layer.run.split["seen"]))
    return summary["seen"]["recall@5"], summary["unseen"]["recall@20"] if summary["unseen"] else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-dev"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extra", type=int, default=3, help="activation regions added per (image, concept) pair")
    args = parser.parse_args()
    torch.set_num_threads(2)
    compute = ComputeSettings(progress=False, threads=2, num_workers=0)
    table: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for layer in protocol_layers(args.work, args.seeds, "lavise", compute):
        run = layer.run
        _, seen_vectors, _ = concept_vectors(run.split["seen"], layer.word_vectors)
        vectors, targets, images, whole = training_rows(run, layer.demo.reference, layer.demo.cache, args.extra, compute)
        # the masks' rows alone are exactly what extra = 0 gives, in the same order
        for name, rows in (("masks only (retrained)", whole), (f"masks + {args.extra} activation regions", slice(None))):
            result = train_explainer(vectors[rows], targets[rows], images[rows], seen_vectors, run.train_settings,
                                     progress=False)
            score = seen_unseen(result.head, layer)
            table.setdefault(layer.name, {}).setdefault(name, []).append(score)
            print(f"seed {layer.seed} {layer.name} {name}: {len(targets[rows])} rows, seen R@5 {score[0]:.3f}", flush=True)
    print(f"\nSeen recall@5 and unseen recall@20 (activation masking, first-choice), seeds {args.seeds}\n")
    print("| layer | training rows | seen R@5 | unseen R@20 |")
    print("|---|---|---|---|")
    print_mean_sd_rows(table)


if __name__ == "__main__":
    main()
