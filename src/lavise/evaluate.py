"""Scoring explanations against annotated data: every method side by side, NetDissect too (``lavise evaluate``).

The protocol of the paper (§4.5), with NetDissect's ground truth (:mod:`lavise.metrics`):
T_u is each filter's top-quantile level over the evaluation images; IoU between each
filter's upsampled region and each concept's masks is tallied over the images; a
concept is a filter's ground truth when their IoU exceeds 0.04; each method's words are
scored by recall@k and precision@1 over the filters with ground truth.

NetDissect itself is scored as a labeller: it ranks concepts by IoU on a *labelling*
split of the images, and every method is graded against ground truth from the other,
*scoring* split, so NetDissect is not graded on the data it was fit to.

IoU tallies are accumulated in one pass over the images with batched tensor
operations: for a batch of images, regions (n, d, P) times masks (n, P, m) gives every
filter-mask intersection at once. Outputs: ``evaluation.json``, ``evaluation.md`` and
``evaluation.png`` in each run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lavise.compute import cpu_threads, resolve_device
from lavise.datasets.base import BadImage, ReferenceDataset, SkipLog, load_rgb
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.explain import feature_inputs, pair_words, rank_words, top_images
from lavise.features import target_features
from lavise.inputs import original
from lavise.metrics import (
    RECALL_KS, IoUTally, Match, WordNetMatch, ground_truth, labelling_split, masks_on_grid, score_filters,
)
from lavise.models import Preprocessing, TargetModel, layer_reader, preprocess_image, preprocess_masks
from lavise.regions import quantile_thresholds, upsampled_regions
from lavise.runs import Run, as_run
from lavise.settings import EVALUATION_METHODS, ComputeSettings, EvaluateSettings, ExplainSettings
from lavise.storage import atomic_path, cache_folder, cached, write_json

_TALLY_VERSION = 2  # 2: T_u of saturated filters lies just below their maximum


def mask_images(images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The image-masking baseline's inputs: each image kept only inside its filter's region.

    Outside the region the normalised image is 0, the normalisation mean: a neutral grey
    rather than black, so the network sees "nothing" rather than a dark object.

    (n, 3, H, W), (n, h, w) the chosen filter's map per image, (n,) its T_u -> (n, 3, H, W)
    """
    return images * upsampled_regions(maps.unsqueeze(1), thresholds.unsqueeze(1), images.shape[-2:])


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
                regions = upsampled_regions(maps[rows].to(device), thresholds, (size, size)).flatten(2)
                masks, indices = _pad_masks(chunk, pixels)
                masks, indices = masks.to(device), indices.to(device)
                for tally, members in zip(tallies, (labelling[rows], ~labelling[rows])):
                    if members.any():
                        members = members.to(device)
                        tally.add(regions[members], masks[members], indices[members])
            bar.update(len(items))
    return tallies[0].cpu(), tallies[1].cpu(), skipped


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
    cache_dir = cache_folder(cache_dir)
    matcher = WordNetMatch() if settings.lenient else None
    results = []
    with cpu_threads(compute):
        for run in runs:
            run = as_run(run)
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
    features = target_features(target_model, run.layer, dataset, cache_dir=cache_dir, compute=compute)
    features.skipped.warn(f"evaluation images {dataset.root}")
    maps = features.maps
    run.check_filters(maps.shape[1], "the evaluation images")
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
    parts = {
        "product": "iou-tallies", "version": _TALLY_VERSION, **target_model.identity(), "layer": run.layer,
        "data": dataset.identity(), "quantile": explain_settings.quantile, "size": settings.iou_size,
        "labelling_fraction": settings.labelling_fraction, "split_seed": settings.split_seed,
    }

    def build():
        label_tally, score_tally, skipped = tally_dataset(
            dataset, maps, paths, thresholds, labelling, target_model.preprocessing, size=settings.iou_size, compute=compute
        )
        tensors = {}
        for part, tally in (("labelling", label_tally), ("scoring", score_tally)):
            tensors |= {f"{part}_intersection": tally.intersection, f"{part}_region_area": tally.region_area,
                        f"{part}_mask_area": tally.mask_area}
        return tensors, {"labelling": label_tally.images, "scoring": score_tally.images, "skipped": skipped.to_dict()}

    tensors, info = cached(cache_dir, "iou", parts, build)
    tallies = [
        IoUTally(tensors[f"{part}_intersection"], tensors[f"{part}_region_area"], tensors[f"{part}_mask_area"], info[part])
        for part in ("labelling", "scoring")
    ]
    return tallies[0], tallies[1], SkipLog.from_dict(info["skipped"])


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


def markdown_cell(value: float | None) -> str:
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
                     *[markdown_cell(summary[k]) for k, _ in _COLUMNS],
                     markdown_cell(seen["recall@5"] if seen else None), markdown_cell(unseen["recall@20"] if unseen else None),
                     markdown_cell(summary.get("unseen_named@20")), markdown_cell(lenient["recall@5"] if lenient else None)]
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
