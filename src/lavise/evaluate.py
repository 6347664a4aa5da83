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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lavise.compute import cpu_threads
from lavise.datasets.base import BadImage, ReferenceDataset, SkipLog, load_rgb
from lavise.distributed import Ranks, current
from lavise.errors import LaviseError, LaviseWarning
from lavise.confidence import auroc, precision_coverage
from lavise.explain import naming_of
from lavise.features import MapStream, raise_no_usable
from lavise.naming import WordSpace, feature_inputs, gather_maps, name_pairs_in, scan_filters
from lavise.tallies import tally_dataset
from lavise.inputs import original
from lavise.metrics import (
    RECALL_KS, IoUTally, Match, WordNetMatch, ground_truth, labelling_split, score_filters,
)
from lavise.models import Preprocessing, TargetModel, layer_reader, preprocess_image
from lavise.regions import upsampled_regions
from lavise.runs import Run, as_run
from lavise.settings import EVALUATION_METHODS, ComputeSettings, EvaluateSettings, ExplainSettings
from lavise.storage import atomic_path, cache_folder, output_set, write_json
from lavise.unseen import entity_naming, method_protocol, protocol_info, ranked_words, unseen_hops
from lavise.vocabulary import normalize_concept

_TALLY_VERSION = 2  # 2: T_u of saturated filters lies just below their maximum


def mask_images(images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The image-masking baseline's inputs: each image kept only inside its filter's region.

    Outside the region the normalised image is 0, the normalisation mean: a neutral grey
    rather than black, so the network sees "nothing" rather than a dark object.

    (n, 3, H, W), (n, h, w) the chosen filter's map per image, (n,) its T_u -> (n, 3, H, W)
    """
    return images * upsampled_regions(maps.unsqueeze(1), thresholds.unsqueeze(1), images.shape[-2:])


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
    """Preprocessed images of a dataset by index, loaded once each (image masking re-runs them)."""

    def __init__(self, dataset, preprocessing: Preprocessing) -> None:
        self.dataset, self.preprocessing = dataset, preprocessing
        self._loaded: dict[int, torch.Tensor] = {}

    def __call__(self, indices: list[int]) -> torch.Tensor:
        for index in indices:
            if index not in self._loaded:
                path = self.dataset.image_path(index)
                try:
                    self._loaded[index] = preprocess_image(load_rgb(Path(path)), self.preprocessing)
                except BadImage as error:  # it was readable when its features were taken
                    raise LaviseError(f"Image '{path}' became unreadable during evaluation: {error}") from None
        return torch.stack([self._loaded[index] for index in indices])


def image_masking_inputs(
    read: Callable[[torch.Tensor], torch.Tensor],
    images: Callable[[torch.Tensor], torch.Tensor],
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    device: torch.device,
):
    """Explainer inputs of the image-masking baseline for batches of (filter, image) pairs.

    Each pair's image is masked to the filter's region and run through the network again;
    the explainer then sees the whole new feature map, unmasked. ``images(rows)`` gives
    the preprocessed images of rows of ``maps``.
    """

    def inputs(filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        chosen = gather_maps(maps, rows)[torch.arange(len(rows)), filters]  # each pair's filter map
        masked = mask_images(images(rows).to(device), chosen.to(device), thresholds[filters].to(device))
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
    ranks = current()
    matcher = WordNetMatch() if settings.lenient and ranks.main else None
    results = []
    with cpu_threads(compute):
        for run in runs:
            with ranks.together("opening the run"):
                run = as_run(run)
            result = _evaluate_run(run, dataset, settings, explain_settings, compute, model, cache_dir, matcher, ranks)
            with ranks.together("writing the evaluation"):
                if write and ranks.main:
                    write_evaluation(result, run.path)
            shared = ranks.gather([result.model, result.layer, result.methods, result.filters, result.info] if ranks.main else None)[0]
            results.append(result if ranks.main else Evaluation(*shared, path=run.path / "evaluation.json" if write else None))
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
    ranks: Ranks,
) -> Evaluation:
    with ranks.together("opening the model and the evaluation images"):
        target_model = run.target_model(model)
        stream = MapStream(target_model, run.layer, dataset, cache_dir=cache_dir, compute=compute, ranks=ranks)
        run.check_filters(stream.filters, "the evaluation images")
        naming = naming_of(run, explain_settings, cache_dir, ranks)
        entities = entity_naming(run, naming, dataset, settings, cache_dir, ranks) if settings.unseen_protocol else None
    ranks.agree({"run": run.config, "model": target_model.identity(), "data": dataset.identity(),
                 "settings": [settings.to_dict(), explain_settings.to_dict()]}, "evaluate jobs")
    scan = scan_filters(stream, quantile=explain_settings.quantile, top=explain_settings.top_images, compute=compute,
                        ranks=ranks, description="evaluation features")
    if scan.images == 0:
        raise_no_usable("evaluation", dataset, scan.skipped)
    if ranks.main:
        scan.skipped.warn(f"evaluation images {dataset.root}")
    labelling = labelling_split(len(dataset), settings.labelling_fraction, settings.split_seed)
    label_tally, score_tally, skipped = _cached_tallies(run, target_model, stream, dataset, scan.thresholds, labelling,
                                                        settings, explain_settings, compute, cache_dir, ranks)
    if ranks.main:
        skipped.warn(f"evaluation masks {dataset.root}")
    names = dataset.concepts
    score_iou = score_tally.iou()
    truth_ids = ground_truth(score_iou, settings.iou_threshold)
    scored = torch.tensor([u for u, t in enumerate(truth_ids) if t], dtype=torch.long)
    label_iou = label_tally.iou() if label_tally.images else None
    with cpu_threads(compute, workers=0):
        words, confidences, entity_words = _method_words(run, target_model, stream, scan, label_iou, names, scored, naming,
                                                         settings, compute, ranks, entities)
    if not ranks.main:
        return None
    return _scored(run, dataset, scan, words, confidences, truth_ids, score_iou, label_iou, label_tally, score_tally,
                   skipped, naming, settings, explain_settings, matcher, entities, entity_words)


def _scored(run, dataset, scan, words, confidences, truth_ids, score_iou, label_iou, label_tally, score_tally, skipped,
            naming, settings, explain_settings, matcher, entities=None, entity_words=None) -> Evaluation:
    """Every method's scores against the ground truth, per filter and in summary (rank 0).

    Concept names are matched as the vocabulary spells them (:func:`normalize_concept`:
    "sky-other-merged" is named by "sky"); the outputs keep the dataset's names.
    """
    names = dataset.concepts
    spelled = [normalize_concept(n) for n in names]
    truth = [[spelled[c] for c in ids] for ids in truth_ids]
    seen = {normalize_concept(c) for c in run.split["seen"]}
    hops = unseen_hops(truth, seen) if entities is not None else {}
    methods, per_method = {}, {}
    for method, method_words in words.items():
        summary, per_filter = score_filters(method_words, truth, seen)
        if method in confidences:
            summary["confidence"] = confidence_summary(confidences[method], per_filter, naming)
        if matcher is not None:
            lenient, _ = score_filters(method_words, truth, seen, matcher)
            summary["lenient"] = {k: v for k, v in lenient.items() if k.startswith(("recall", "precision", "f1", "unseen_named"))}
        # How many different top words the scored filters get: 1 means every filter is
        # named the same way (the input does not depend on the filter).
        summary["distinct_top_words"] = len({w[0] for w, t in zip(method_words, truth) if t and w})
        if entities is not None and method in entity_words:  # NetDissect names annotated concepts only
            summary["unseen_protocol"] = method_protocol(method_words, entity_words[method], truth, seen,
                                                         len(naming.vocabulary), len(entities.vocabulary), hops)
        methods[method] = summary
        per_method[method] = per_filter

    filters = []
    score_rows = score_iou.tolist()  # one conversion, not one per (filter, concept)
    best_iou, best_concept = ([], []) if label_iou is None else (t.tolist() for t in label_iou.max(dim=1))
    for u in range(len(truth_ids)):
        entry = {
            "filter": u,
            "ground_truth": [{"concept": names[c], "iou": round(score_rows[u][c], 5)} for c in truth_ids[u]],
            "netdissect": None,
            "methods": {},
        }
        if label_iou is not None and best_iou[u] > 0:
            entry["netdissect"] = {"concept": names[best_concept[u]], "iou": round(best_iou[u], 5)}
        for method, method_words in words.items():
            scores = per_method[method][u] or {f"recall@{k}": None for k in RECALL_KS} | {"precision@1": None, "f1@5": None}
            entry["methods"][method] = {"words": list(method_words[u]), **scores}
            if method in confidences:
                entry["methods"][method]["confidence"] = confidences[method][u]
        filters.append(entry)

    outside = sorted({names[c] for ids in truth_ids for c in ids if spelled[c] not in set(naming.vocabulary.words)})
    info = {
        "run": str(run.path),
        "run_id": run.config.get("run_id"),
        "dataset": {"description": repr(dataset), "images": scan.images, "labelling_images": label_tally.images,
                    "scoring_images": score_tally.images, "concepts": len(names)},
        "settings": {"evaluate": settings.to_dict(), "explain": explain_settings.to_dict()},
        "vocabulary": {"words": len(naming.vocabulary), **naming.vocabulary.description},
        "naming": naming.describe(),
        "seen_concepts": len(seen),
        "ground_truth_outside_vocabulary": outside,
        "filters_total": len(truth_ids),
        "skipped": {"images": scan.skipped.to_dict(), "masks": skipped.to_dict()},
    }
    if entities is not None:
        info["unseen_protocol"] = protocol_info(entities, hops)
    if outside:
        warnings.warn(
            f"{len(outside)} ground-truth concepts are not in the vocabulary and can never be "
            f"named exactly: {', '.join(outside[:20])}",
            LaviseWarning,
            stacklevel=4,
        )
    return Evaluation(run.config["model"]["name"], run.layer, methods, filters, info)


def confidence_summary(confidence: list[float | None], per_filter: list[dict | None], naming) -> dict:
    """How well the confidence tells right first words from wrong ones, over the scored filters.

    ``auroc``: of confidence against a right first word (exact match); ``named``: the share of
    scored filters with a confident name, and their precision@1; ``coverage``: precision@1 of
    the most confident filters at each share of the filters named.
    """
    pairs = [(c, s["precision@1"] == 1.0) for c, s in zip(confidence, per_filter) if s is not None and c is not None]
    if not pairs:
        return {"auroc": None, "named": None, "precision@1_named": None, "coverage": []}
    values, right = np.array([c for c, _ in pairs]), np.array([r for _, r in pairs])
    named = np.array([naming.is_named(c) for c in values])
    return {
        "auroc": auroc(values, right),
        "named": float(named.mean()),
        "precision@1_named": float(right[named].mean()) if named.any() else None,
        "coverage": precision_coverage(values, right),
        "threshold": naming.calibration.threshold,
    }


def _cached_tallies(run, target_model, stream, dataset, thresholds, labelling, settings, explain_settings, compute,
                    cache_dir, ranks):
    parts = {
        "product": "iou-tallies", "version": _TALLY_VERSION, **target_model.identity(), "layer": run.layer,
        "data": dataset.identity(), "quantile": explain_settings.quantile, "size": settings.iou_size,
        "labelling_fraction": settings.labelling_fraction, "split_seed": settings.split_seed,
    }

    def build():
        label_tally, score_tally, skipped = tally_dataset(stream, dataset, thresholds, labelling, size=settings.iou_size,
                                                          compute=compute, ranks=ranks)
        tensors = {}
        for part, tally in (("labelling", label_tally), ("scoring", score_tally)):
            tensors |= {f"{part}_intersection": tally.intersection, f"{part}_region_area": tally.region_area,
                        f"{part}_mask_area": tally.mask_area}
        return tensors, {"labelling": label_tally.images, "scoring": score_tally.images, "skipped": skipped.to_dict()}

    tensors, info = ranks.cached(cache_dir, "iou", parts, build)
    tallies = [
        IoUTally(tensors[f"{part}_intersection"], tensors[f"{part}_region_area"], tensors[f"{part}_mask_area"], info[part])
        for part in ("labelling", "scoring")
    ]
    return tallies[0], tallies[1], SkipLog.from_dict(info["skipped"])


def _method_words(run, target_model, stream, scan, label_iou, names, scored, naming, settings, compute, ranks,
                  entities=None):
    """Per method, each filter's ranked words (NetDissect: concepts by labelling IoU), per
    explainer method each filter's confidence (when the run has a calibration) and, with an
    ``entities`` naming, its words ranked within the entity list; on rank 0.

    Only the ``scored`` filters (those with ground truth) are named by the explainer
    methods: the others cannot be scored, and image masking re-runs the network for
    every (filter, image) pair. The rest get an empty word list.
    """
    d = stream.filters
    explain_settings = naming.settings
    words: dict[str, list[list[str]]] = {}
    confidences: dict[str, list[float | None]] = {}
    entity_words: dict[str, list[list[str]]] = {}
    explained = [m for m in settings.methods if m != "netdissect"]
    if explained and len(scored):
        device = stream.device
        for method in explained:
            with contextlib.ExitStack() as stack:
                if method == "image":
                    read = stack.enter_context(layer_reader(target_model.module.to(device), run.layer, target_model.layout))
                    stack.enter_context(torch.inference_mode())
                    loader = _ImageLoader(stream.images, target_model.preprocessing)

                    def inputs_for(maps, images, loader=loader, read=read):
                        return image_masking_inputs(read, lambda rows: loader([images[r] for r in rows.tolist()]), maps,
                                                    scan.thresholds, device)

                    chunk = compute.batch_size
                else:
                    def inputs_for(maps, images, method=method):
                        return feature_inputs(method, maps, scan.thresholds, device, run.pooling)

                    chunk = 2048
                spaces = [WordSpace(naming.vectors, explain_settings.words_per_image, naming.penalty)]
                if entities is not None:  # the same outputs, matched against the entity list too
                    spaces.append(WordSpace(entities.vectors, entities.settings.words_per_image, entities.penalty))
                found = name_pairs_in(stream, scan, scored, inputs_for, run.head, spaces, compute=compute, ranks=ranks,
                                      chunk=chunk)
                named, entity_named = (found[0], found[-1]) if found is not None else (None, None)
            if not ranks.main:
                continue
            voting = naming.voting(scan.firing(scored))
            if entities is not None:
                entity_words[method] = ranked_words(entities, entity_named, scored, d, voting)
            ids, sims = named
            ranked = naming.ranked(ids, sims, voting=voting, filters=scored)
            words[method] = [[] for _ in range(d)]
            if naming.calibration is not None:
                confidences[method] = [None] * d
            for u, filter_words, confidence in zip(scored.tolist(), ranked, naming.confidences(ids, sims, ranked, voting, scored)):
                words[method][u] = [naming.vocabulary.words[r.word] for r in filter_words]
                if naming.calibration is not None:
                    confidences[method][u] = confidence
    for method in explained:
        words.setdefault(method, [[] for _ in range(d)])
        if entities is not None:
            entity_words.setdefault(method, [[] for _ in range(d)])
    if "netdissect" in settings.methods:
        top = torch.topk(label_iou, min(max(RECALL_KS), label_iou.shape[1]), dim=1)
        words["netdissect"] = [
            [names[c] for c, value in zip(ids, values) if value > 0]
            for ids, values in zip(top.indices.tolist(), top.values.tolist())
        ]
    return {m: words[m] for m in settings.methods}, confidences, entity_words


# --------------------------------------------------------------------------------------
# Output: JSON, Markdown and a plot.

_COLUMNS = [("precision@1", "P@1"), ("recall@5", "R@5"), ("recall@10", "R@10"), ("recall@20", "R@20"), ("f1@5", "F1@5")]


def markdown_cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(evaluations: Sequence[Evaluation]) -> str:
    """One row per (run, method): exact precision@1, recall@k, F1@5, seen/unseen (with the share
    of filters whose ground truth is only unseen concepts), lenient, and
    how well the confidence separates right first words from wrong (AUROC), the share of
    scored filters it names and their precision@1; with the unseen protocol, unseen named@20 among
    the entities and as a multiple of chance."""
    header = ["model", "layer", "method", "filters", *[c for _, c in _COLUMNS], "seen P@1", "seen R@5", "unseen R@20",
              "unseen only", "unseen named@20", "lenient R@5", "AUROC", "named", "P@1 named", "entity named@20", "× chance"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for evaluation in evaluations:
        for method, summary in evaluation.methods.items():
            seen, unseen, lenient = summary.get("seen"), summary.get("unseen"), summary.get("lenient")
            entity = (summary.get("unseen_protocol") or {}).get("entities") or {}
            cells = [evaluation.model, evaluation.layer, method, str(summary["filters"]),
                     *[markdown_cell(summary[k]) for k, _ in _COLUMNS],
                     markdown_cell(seen.get("precision@1") if seen else None),  # older summaries lack it
                     markdown_cell(seen["recall@5"] if seen else None), markdown_cell(unseen["recall@20"] if unseen else None),
                     markdown_cell((summary.get("unseen_only") or {}).get("share")),
                     markdown_cell(summary.get("unseen_named@20")), markdown_cell(lenient["recall@5"] if lenient else None),
                     *[markdown_cell((summary.get("confidence") or {}).get(k)) for k in ("auroc", "named", "precision@1_named")],
                     *[markdown_cell(entity.get(k)) for k in ("named@20", "named@20_x_chance")]]
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
    """evaluation.json, .md and .png, changed together (evaluation.json last)."""
    with output_set(run_dir, last="evaluation.json") as outputs:
        with atomic_path(outputs.path("evaluation.md")) as tmp:
            tmp.write_text(markdown_table([evaluation]))
        plot_recall(evaluation, outputs.path("evaluation.png"))
        write_json(outputs.path("evaluation.json"), evaluation.to_dict())
    evaluation.path = run_dir / "evaluation.json"
