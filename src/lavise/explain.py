"""Naming filters (``lavise explain``): a filter's words from its top images, ranked.

For each filter u: its p most activated target images and T_u, from one pass over the
images (:func:`lavise.naming.scan_filters`); on each image, the explainer input for u,
the explainer's output and its s nearest words (:func:`lavise.naming.name_pairs`), by
aligned retrieval, CSLS or cosine (:mod:`lavise.retrieval`); the s words of each top image where u
fires (exceeds T_u) ranked (:func:`rank_words`); the
top x reported, with a confidence that the first is right and whether it is confident
enough to be named (:mod:`lavise.confidence`). :func:`explain` writes them into the run
as ``explanations.json`` and ``.csv``.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lavise.compute import cpu_threads
from lavise.confidence import FEATURES, Calibration, calibrate, vote_features
from lavise.datasets.base import ImageFiles, relative_name
from lavise.distributed import Ranks, current
from lavise.embeddings import Vocabulary, concept_vectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.features import MapStream, raise_no_usable
from lavise.models import TargetModel
from lavise.naming import FilterScan, feature_inputs, name_pairs, nearest_words, scan_filters
from lavise.retrieval import REFERENCE_OUTPUTS, reference_outputs, retrieval_space
from lavise.runs import Run, as_run
from lavise.settings import METHODS, RANKINGS, ComputeSettings, ExplainSettings
from lavise.survey import CALIBRATION_VERSION, ReferenceLabels, load_survey, reference_labels, survey_calibration
from lavise.storage import cache_folder, output_set, read_json, save_tensors, tensors_digest, write_csv, write_json
from lavise.vocabulary import naming_vocabulary, normalize_concept


@dataclass(frozen=True)
class RankedWord:
    """A filter's word: its vocabulary index, how many of the p·s collected words it is
    (``count``), and of how many of the p images it is the nearest word (``first``)."""

    word: int
    count: int
    first: int


def rank_words(
    word_ids: torch.Tensor, similarities: torch.Tensor, top: int, *, words_per_image: int, ranking: str,
    voting: torch.Tensor | None = None,
) -> list[list[RankedWord]]:
    """Rank each filter's collected words and keep the first ``top``.

    ``frequency`` (the paper): by ``count``, then by summed similarity, then word order.
    ``first-choice`` (lavise's default): by ``first``, then as ``frequency``. One image's
    second to s-th words are mostly near-synonyms of its first, so under ``frequency``
    the neighbours of one image's word crowd out the word of another; on the demo's
    development seeds this raised the mean seen recall@5 on every layer tried
    (docs/evaluation.md).

    ``voting``: (d, p) which images' words count (:meth:`Naming.voting`); None: all. A
    filter none of whose images vote gets no words.

    (d, p·s) word indices, each image's s words nearest first, and their similarities ->
    per filter its ranked words.
    """
    if ranking not in RANKINGS:
        raise LaviseError(f"Unknown ranking '{ranking}'; valid: {', '.join(RANKINGS)}.")
    d, collected = word_ids.shape
    if words_per_image < 1 or collected % words_per_image:
        raise ValueError(f"{collected} words per filter are not whole images of {words_per_image} words.")
    filters = torch.arange(d).unsqueeze(1).expand_as(word_ids).flatten()
    pairs = torch.stack([filters, word_ids.flatten().long()], dim=1)  # (d·p·s, 2)
    is_first = (torch.arange(collected) % words_per_image == 0).repeat(d)
    values = similarities.flatten()
    if voting is not None:
        if voting.shape != (d, collected // words_per_image):
            raise ValueError(f"voting {tuple(voting.shape)} does not match {d} filters of {collected // words_per_image} images.")
        counted = voting.bool().repeat_interleave(words_per_image, dim=1).flatten()
        pairs, is_first, values = pairs[counted], is_first[counted], values[counted]
    unique, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    summed = torch.zeros(len(unique), dtype=similarities.dtype).index_add_(0, inverse, values)
    firsts = torch.zeros(len(unique), dtype=torch.long).index_add_(0, inverse, is_first.long())
    u_filter, u_word = unique[:, 0].numpy(), unique[:, 1].numpy()
    keys = [u_word, -summed.numpy(), -counts.numpy()]
    if ranking == "first-choice":
        keys.append(-firsts.numpy())
    order = np.lexsort((*keys, u_filter))  # last key primary
    ranked: list[list[RankedWord]] = [[] for _ in range(d)]
    for i in order:
        bucket = ranked[u_filter[i]]
        if len(bucket) < top:
            bucket.append(RankedWord(int(u_word[i]), int(counts[i]), int(firsts[i])))
    return ranked


def labels_first(ranked: list[list[RankedWord]], labels: Sequence[int], within: int) -> list[list[RankedWord]]:
    """Each filter's words with its reference label (a word id; −1: none) moved first when
    it is among the first ``within``; the others keep their order.

    The words come from the explainer alone; the label is what the reference annotations
    say the filter detects (:class:`ReferenceLabels`). When both point at one word, that
    word is the likelier name: on the demo's development seed it raised precision@1 on
    all four layers (docs/evaluation.md).

    Example:
        >>> words = [[RankedWord(5, 9, 4), RankedWord(7, 6, 2)], [RankedWord(5, 9, 4)]]
        >>> [[w.word for w in r] for r in labels_first(words, [7, 7], 2)]
        [[7, 5], [5]]
    """
    reordered = []
    for words, label in zip(ranked, labels):
        at = next((i for i, w in enumerate(words[:within]) if w.word == label), None) if label >= 0 else None
        reordered.append(words if not at else [words[at], *words[:at], *words[at + 1:]])
    return reordered


def first_words(ranked: list[list[RankedWord]]) -> torch.Tensor:
    """(f,) each filter's first word, −1 where it has none."""
    return torch.tensor([r[0].word if r else -1 for r in ranked], dtype=torch.int64)


def consistency(words: list[dict]) -> int:
    """How many of a filter's top images agree on one nearest word: the most first choices."""
    return max((w["first"] for w in words), default=0)


def most_trusted(filters: list[FilterExplanation]) -> list[FilterExplanation]:
    """The filters with words, confidently named first, by confidence (by consistency without one)."""
    return sorted((f for f in filters if f.words),
                  key=lambda f: (not f.named, -(f.confidence if f.confidence is not None else consistency(f.words)),
                                 f.filter))


def naming_line(f: FilterExplanation, words: int = 5, mark=str) -> str:
    """A filter's words as a summary shows them: with its confidence, and marked when it has no confident name."""
    listed = ", ".join(f"{mark(w['word'])} ({w['first']}/{w['count']})" for w in f.words[:words])
    confidence = "" if f.confidence is None else f"{f.confidence:.2f}  "
    return f"{confidence}{listed}" if f.named else f"{confidence}no confident name (candidates: {listed})"


@dataclass
class FilterExplanation:
    """What one filter is named: words with counts, and the images they came from.

    ``confidence`` is the calibrated probability that the first word is right (None for
    a run trained before lavise 0.5); ``named`` is false when it is below the threshold:
    the filter has no confident name, and its words are only candidates.
    ``firing_images``: on how many of its top images it exceeds T_u; with
    ``firing_images_only`` its words come from those (None: explained by an earlier lavise).
    ``label``, ``label_iou``: the reference concept its regions overlap most on the
    reference training images, when that IoU exceeds ``label_iou`` (NetDissect's label from the
    run's survey), and that IoU; None for a run trained without a survey.
    """

    filter: int
    words: list[dict]
    top_images: list[str]
    threshold: float
    active: bool
    confidence: float | None = None
    named: bool = True
    firing_images: int | None = None
    label: str | None = None
    label_iou: float | None = None


@dataclass
class Naming:
    """What filters are named with: the vocabulary, its retrieval vectors (and CSLS's hub penalty), the confidence."""

    vocabulary: Vocabulary
    vectors: torch.Tensor  # (V, D) unit: the words as retrieval compares them (lavise.retrieval)
    penalty: torch.Tensor | None
    retrieval: str
    calibration: Calibration | None
    settings: ExplainSettings
    labels: ReferenceLabels | None = None

    def describe(self) -> dict:
        """For the outputs: which vocabulary and retrieval named, how the confidence was fitted."""
        calibration = None if self.calibration is None else {"threshold": self.calibration.threshold,
                                                             **self.calibration.facts}
        return {"retrieval": self.retrieval, "calibration": calibration}

    def votes(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, D) explainer outputs -> (m, s) nearest word ids and scores."""
        return nearest_words(outputs, self.vectors, self.settings.words_per_image, penalty=self.penalty)

    def voting(self, firing: torch.Tensor) -> torch.Tensor | None:
        """The top images whose words count, from the (f, p) images where each filter fires
        (:meth:`FilterScan.firing`): those, or None (all) without ``firing_images_only``."""
        return firing if self.settings.firing_images_only else None

    def ranked(self, word_ids: torch.Tensor, scores: torch.Tensor, top: int | None = None,
               voting: torch.Tensor | None = None, filters: torch.Tensor | None = None) -> list[list[RankedWord]]:
        """Each filter's ranked words; with ``filters`` (which real filters the rows are) and
        the run's reference labels, a label among the first ``label_first`` words goes first."""
        top = top or self.settings.top_words
        within = self.settings.label_first if filters is not None and self.labels is not None else 0
        ranked = rank_words(word_ids, scores, max(top, within), words_per_image=self.settings.words_per_image,
                            ranking=self.settings.ranking, voting=voting)
        if within:
            ranked = labels_first(ranked, self.labels.label_words(filters), within)
        return [r[:top] for r in ranked]

    def confidences(self, word_ids: torch.Tensor, scores: torch.Tensor, ranked: list[list[RankedWord]],
                    voting: torch.Tensor | None = None, filters: torch.Tensor | None = None) -> list[float | None]:
        """Each filter's confidence that its first word is right; None without a calibration or words.

        ``filters``: (f,) which filters the rows are (None: all, in order); a confidence
        fitted on the run's survey reads their reference labels.
        """
        first = first_words(ranked)
        if self.calibration is None or not len(first):
            return [None] * len(first)
        features = vote_features(word_ids, scores, first.clamp_min(0), self.settings.words_per_image, voting)
        if self.calibration.features != FEATURES:
            rows = torch.arange(len(first)) if filters is None else filters
            features = torch.cat([features, self.labels.features(first, rows)], dim=1)
        values = self.calibration.confidence(features)
        return [None if w < 0 else float(v) for w, v in zip(first.tolist(), values)]

    def is_named(self, confidence: float | None) -> bool:
        return confidence is None or self.calibration is None or confidence >= self.calibration.threshold




def naming_of(run: Run, settings: ExplainSettings, cache_dir: Path | None, ranks: Ranks) -> Naming:
    """The vocabulary, hub penalty and calibrated confidence an explain with ``settings`` uses on ``run``.

    The penalty and the calibration are cached in the run, per vocabulary and settings.
    """
    concepts = run.split["seen"] + run.split["unseen"]
    word_vectors = load_word_vectors(run.config["word_vectors"], cache_dir=cache_dir)
    vocabulary = naming_vocabulary(settings, word_vectors, concepts)
    if settings.words_per_image > len(vocabulary):
        raise LaviseError(f"words_per_image={settings.words_per_image} exceeds the vocabulary ({len(vocabulary)} words).")
    if not 0 <= settings.abstain_precision < 1:
        raise LaviseError(f"abstain_precision must be in [0, 1), got {settings.abstain_precision}.")
    _, seen_vectors, _ = concept_vectors(run.split["seen"], word_vectors, normalize_concept)
    vectors, penalty, retrieval = retrieval_space(run, vocabulary, seen_vectors, settings, ranks)
    naming = Naming(vocabulary, vectors, penalty, retrieval, None, settings)
    survey = load_survey(run.path)
    if survey is not None:
        naming.labels = reference_labels(survey, vocabulary.words, settings.label_iou)
        if settings.calibration == "reference-filters":
            naming.calibration = survey_calibration(run.path, naming, survey, ranks)
    saved = reference_outputs(run.path)
    if saved is not None and naming.calibration is None:
        naming.calibration = _calibration(run, naming, saved, ranks)
    elif saved is None and ranks.main:
        warnings.warn(f"Run '{run.path}' has no {REFERENCE_OUTPUTS} (it was trained before lavise 0.5): its filters are "
                      "named by cosine similarity, get no confidence and are all named; train it again for both.",
                      LaviseWarning, stacklevel=3)
    return naming


def _calibration(run: Run, naming: Naming, saved: dict[str, torch.Tensor], ranks: Ranks) -> Calibration:
    settings = naming.settings
    held = saved["validation"].bool()
    if len(torch.unique(saved["concepts"][held])) < 2:  # too few held-out images: every saved row
        held = torch.ones_like(held)
    outputs, concepts = saved["outputs"][held], saved["concepts"][held]
    words = [normalize_concept(c) for c in run.split["seen"]]
    parts = {"product": "confidence", "version": CALIBRATION_VERSION, "outputs": tensors_digest(outputs, concepts),
             "words": naming.vocabulary.words, "vectors": tensors_digest(naming.vectors),
             "penalty": None if naming.penalty is None else tensors_digest(naming.penalty),
             "concepts": words, **{k: getattr(settings, k) for k in (
                 "top_images", "words_per_image", "ranking", "abstain_precision", "threshold_rule", "calibration_seed")}}

    def name_votes(filter_outputs: torch.Tensor):
        f, p, _ = filter_outputs.shape
        ids, scores = naming.votes(filter_outputs.flatten(0, 1))
        ids, scores = ids.reshape(f, -1), scores.reshape(f, -1)
        return ids, scores, first_words(naming.ranked(ids, scores, top=1))

    def build():
        fitted = calibrate(outputs, concepts, words, name_votes, naming.vocabulary.words, top=settings.top_images,
                           words_per_image=settings.words_per_image, target=settings.abstain_precision,
                           seed=settings.calibration_seed, rule=settings.threshold_rule)
        return fitted.to_tensors()

    return Calibration.from_tensors(*ranks.cached(run.path, "confidence", parts, build))


@dataclass
class Explanations:
    """Every filter's explanation, and how it was made (``extra``: settings, vocabulary, target, compute)."""

    model: str
    layer: str
    method: str
    filters: list[FilterExplanation]
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self, extra: dict | None = None) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "method": self.method,
            **(self.extra if extra is None else extra),
            "filters": [asdict(f) for f in self.filters],
        }

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None) -> Explanations:
        known = {"model", "layer", "method", "filters"}
        filters = [FilterExplanation(**f) for f in data["filters"]]
        return cls(data["model"], data["layer"], data["method"], filters, path, {k: v for k, v in data.items() if k not in known})


def explain(
    run: Path | Run,
    target: Path | ImageFiles,
    *,
    settings: ExplainSettings = ExplainSettings(),
    compute: ComputeSettings = ComputeSettings(),
    model: TargetModel | None = None,
    cache_dir: Path | None = None,
    write: bool = True,
) -> Explanations:
    """Name every filter of the run's layer from unlabelled target images.

    One pass over the target images (their maps cached in chunks), then words for each
    filter's top images. Writes ``thresholds.safetensors``, ``explanations.json`` and
    ``explanations.csv`` into the run directory (unless ``write`` is false).

    Under ``torchrun``, or with a process group initialised by the caller, every rank
    calls this with the same arguments: each takes a contiguous shard of the images,
    the statistics merge exactly, and rank 0 writes; every rank returns the same result.
    """
    if settings.method not in METHODS:
        raise LaviseError(f"Unknown method '{settings.method}'; valid: {', '.join(METHODS)}.")
    for name in ("top_images", "words_per_image", "top_words"):
        if getattr(settings, name) < 1:
            raise LaviseError(f"{name} must be at least 1, got {getattr(settings, name)}.")
    ranks = current()
    with cpu_threads(compute):
        with ranks.together("opening the run, the model and the images"):
            run = as_run(run)
            images = target if isinstance(target, ImageFiles) else ImageFiles(Path(target))
            cache_dir = cache_folder(cache_dir)
            target_model = run.target_model(model)
            naming = naming_of(run, settings, cache_dir, ranks)
            stream = MapStream(target_model, run.layer, images, cache_dir=cache_dir, compute=compute, ranks=ranks)
            run.check_filters(stream.filters, "the target images")
        ranks.agree({"run": run.config, "model": target_model.identity(), "images": images.identity(),
                     "settings": settings.to_dict()}, "explain jobs")
        if ranks.main:
            _warn_outside_vocabulary(run, naming.vocabulary)
        scan = scan_filters(stream, quantile=settings.quantile, top=settings.top_images, compute=compute, ranks=ranks)
        if scan.images == 0:
            raise_no_usable("target", images, scan.skipped)
        if ranks.main:
            scan.skipped.warn(f"target {images.root}")
            if settings.top_images > scan.images:
                warnings.warn(f"top_images={settings.top_images} but only {scan.images} usable target images; "
                              f"using {scan.images}.", LaviseWarning, stacklevel=2)
        filters = torch.arange(stream.filters)
        with cpu_threads(compute, workers=0):  # no images are decoded while naming: every core
            named = name_pairs(
                stream, scan, filters, lambda maps, _: feature_inputs(settings.method, maps, scan.thresholds, stream.device, run.pooling),
                run.head, naming.vectors, settings.words_per_image, compute=compute, ranks=ranks,
                penalty=naming.penalty,
            )
        explanations = None
        with ranks.together("writing the explanations"):
            if ranks.main:
                explanations = _explanations(run, images, scan, named, naming, compute, ranks, write)
        data = ranks.gather(explanations.to_dict(explanations.extra) if ranks.main else None)[0]
        return explanations if ranks.main else Explanations.from_dict(data, run.path / "explanations.json" if write else None)


def _warn_outside_vocabulary(run: Run, vocabulary) -> None:
    known = set(vocabulary.words)
    outside = [c for c in run.split["seen"] + run.split["unseen"] if normalize_concept(c) not in known]
    if outside:
        warnings.warn(
            f"{len(outside)} reference concepts are not in the vocabulary and can never be "
            f"named: {', '.join(outside[:20])}",
            LaviseWarning,
            stacklevel=3,
        )


def _explanations(run, images, scan: FilterScan, named, naming: Naming, compute: ComputeSettings, ranks,
                  write: bool) -> Explanations:
    """Rank each filter's words, give each its confidence, and write the outputs (rank 0)."""
    settings, words = naming.settings, naming.vocabulary.words
    word_ids, scores = named
    firing = scan.firing(torch.arange(len(scan.thresholds)))
    voting = naming.voting(firing)
    ranked = naming.ranked(word_ids, scores, voting=voting, filters=torch.arange(len(scan.thresholds)))
    confidences = naming.confidences(word_ids, scores, ranked, voting)
    active = scan.active.tolist()
    firing_counts = firing.sum(dim=1).tolist()
    labels = naming.labels.labels() if naming.labels is not None else [(None, None)] * len(active)
    root = images.root
    filters = [
        FilterExplanation(
            filter=u,
            words=[{"word": words[r.word], "count": r.count, "first": r.first} for r in ranked[u]] if active[u] else [],
            top_images=[relative_name(images.image_path(i), root) for i in scan.chosen[u].tolist()],
            threshold=float(scan.thresholds[u]),
            active=bool(active[u]),
            confidence=round(confidences[u], 4) if active[u] and confidences[u] is not None else None,
            named=bool(active[u]) and bool(ranked[u]) and naming.is_named(confidences[u]),
            firing_images=int(firing_counts[u]),
            label=labels[u][0],
            label_iou=labels[u][1],
        )
        for u in range(len(active))
    ]
    inactive = [f.filter for f in filters if not f.active]
    if inactive:
        warnings.warn(
            f"{len(inactive)} filters are constant on every target image and get no words: {inactive[:20]}",
            LaviseWarning,
            stacklevel=3,
        )
    unnamed = [f.filter for f in filters if f.active and not f.words]
    if unnamed:
        warnings.warn(
            f"{len(unnamed)} filters never exceed their T_u on a target image (it is their maximum: the "
            f"{settings.quantile:g} quantile is a value they hold on many positions), so none has a region to name "
            f"and they get no words: {unnamed[:20]}",
            LaviseWarning,
            stacklevel=3,
        )
    extra = {
        "run_id": run.config.get("run_id"),
        "explanation_id": uuid.uuid4().hex,  # what outputs made from these words (groups.json) record
        "model_spec": run.config["model"],
        "settings": settings.to_dict(),
        "vocabulary": {"word_vectors": run.config["word_vectors"], "words": len(naming.vocabulary),
                       **naming.vocabulary.description},
        "naming": naming.describe(),
        "target": {"root": str(Path(root).resolve()), "images": scan.images,
                   "skipped": {**images.skipped.to_dict(), **scan.skipped.to_dict()}},  # broken links too
        "compute": {"processes": ranks.world, "memory_budget": compute.memory_budget, "naming_maps": scan.naming_maps},
    }
    explanations = Explanations(run.config["model"]["name"], run.layer, settings.method, filters, extra=extra)
    if write:  # the three change together: thresholds and words of one explanation, never a mix
        with output_set(run.path, last="explanations.json") as outputs:
            save_tensors(outputs.path("thresholds.safetensors"), {"thresholds": scan.thresholds},
                         {"quantile": str(settings.quantile)})
            write_csv(
                outputs.path("explanations.csv"),
                ["filter", "rank", "word", "count", "first", "confidence", "named", "firing_images", "label",
                 "label_iou"],
                [[f.filter, r + 1, w["word"], w["count"], w["first"], "" if f.confidence is None else f.confidence,
                  int(f.named), f.firing_images, f.label or "", "" if f.label_iou is None else f.label_iou]
                 for f in filters for r, w in enumerate(f.words)],
            )
            write_json(outputs.path("explanations.json"), explanations.to_dict(extra))
        explanations.path = run.path / "explanations.json"
    return explanations


def read_explanations(run_path: Path) -> dict:
    """A run's ``explanations.json``, or a LaviseError saying how to make it."""
    path = Path(run_path) / "explanations.json"
    if not path.is_file():
        raise LaviseError(
            f"'{run_path}' has no explanations.json: name its filters first with "
            f"'lavise explain {run_path} --target FOLDER'."
        )
    return read_json(path)
