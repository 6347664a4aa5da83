"""Naming filters (``lavise explain``): a filter's words from its top images, ranked.

For each filter u: its p most activated target images and T_u, from one pass over the
images (:func:`lavise.naming.scan_filters`); on each image, the explainer input for u,
the explainer's output and its s nearest words (:func:`lavise.naming.name_pairs`); the
s·p words ranked (:func:`rank_words`); the top x reported. :func:`explain` writes them
into the run as ``explanations.json`` and ``.csv``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lavise.compute import cpu_threads
from lavise.datasets.base import ImageFiles, relative_name
from lavise.distributed import current
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.features import MapStream, raise_no_usable
from lavise.models import TargetModel
from lavise.naming import FilterScan, feature_inputs, name_pairs, scan_filters
from lavise.runs import Run, as_run
from lavise.settings import METHODS, RANKINGS, ComputeSettings, ExplainSettings
from lavise.storage import cache_folder, read_json, save_tensors, write_csv, write_json


@dataclass(frozen=True)
class RankedWord:
    """A filter's word: its vocabulary index, how many of the p·s collected words it is
    (``count``), and of how many of the p images it is the nearest word (``first``)."""

    word: int
    count: int
    first: int


def rank_words(
    word_ids: torch.Tensor, similarities: torch.Tensor, top: int, *, words_per_image: int, ranking: str
) -> list[list[RankedWord]]:
    """Rank each filter's collected words and keep the first ``top``.

    ``frequency`` (the paper): by ``count``, then by summed similarity, then word order.
    ``first-choice`` (lavise's default): by ``first``, then as ``frequency``. One image's
    second to s-th words are mostly near-synonyms of its first, so under ``frequency``
    the neighbours of one image's word crowd out the word of another; on the demo's
    development seeds this raised the mean seen recall@5 on every layer tried
    (docs/evaluation.md).

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
    unique, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    summed = torch.zeros(len(unique), dtype=similarities.dtype).index_add_(0, inverse, similarities.flatten())
    is_first = (torch.arange(collected) % words_per_image == 0).repeat(d)
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


def consistency(words: list[dict]) -> int:
    """How many of a filter's top images agree on one nearest word: the most first choices."""
    return max((w["first"] for w in words), default=0)


@dataclass
class FilterExplanation:
    """What one filter is named: words with counts, and the images they came from."""

    filter: int
    words: list[dict]
    top_images: list[str]
    threshold: float
    active: bool


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
            vocabulary = load_word_vectors(run.config["word_vectors"], cache_dir=cache_dir).vocabulary(
                size=settings.vocabulary_size, word_list=settings.vocabulary_file
            )
            if settings.words_per_image > len(vocabulary):
                raise LaviseError(f"words_per_image={settings.words_per_image} exceeds the vocabulary ({len(vocabulary)} words).")
            stream = MapStream(target_model, run.layer, images, cache_dir=cache_dir, compute=compute, ranks=ranks)
            run.check_filters(stream.filters, "the target images")
        ranks.agree({"run": run.config, "model": target_model.identity(), "images": images.identity(),
                     "settings": settings.to_dict()}, "explain jobs")
        if ranks.main:
            _warn_outside_vocabulary(run, vocabulary)
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
                run.head, vocabulary.unit_vectors, settings.words_per_image, compute=compute, ranks=ranks,
            )
        explanations = None
        with ranks.together("writing the explanations"):
            if ranks.main:
                explanations = _explanations(run, images, scan, named, vocabulary, settings, compute, ranks, write)
        data = ranks.gather(explanations.to_dict(explanations.extra) if ranks.main else None)[0]
        return explanations if ranks.main else Explanations.from_dict(data, run.path / "explanations.json" if write else None)


def _warn_outside_vocabulary(run: Run, vocabulary) -> None:
    known = set(vocabulary.words)
    outside = [c for c in run.split["seen"] + run.split["unseen"] if c not in known and " " not in c]
    if outside:
        warnings.warn(
            f"{len(outside)} reference concepts are not in the vocabulary and can never be "
            f"named: {', '.join(outside[:20])}",
            LaviseWarning,
            stacklevel=3,
        )


def _explanations(run, images, scan: FilterScan, named, vocabulary, settings: ExplainSettings, compute: ComputeSettings,
                  ranks, write: bool) -> Explanations:
    """Rank each filter's words and write the outputs (rank 0)."""
    word_ids, similarities = named
    ranked = rank_words(word_ids, similarities, settings.top_words,
                        words_per_image=settings.words_per_image, ranking=settings.ranking)
    active = scan.active.tolist()
    root = images.root
    filters = [
        FilterExplanation(
            filter=u,
            words=[{"word": vocabulary.words[r.word], "count": r.count, "first": r.first} for r in ranked[u]]
            if active[u] else [],
            top_images=[relative_name(images.image_path(i), root) for i in scan.chosen[u].tolist()],
            threshold=float(scan.thresholds[u]),
            active=bool(active[u]),
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
    extra = {
        "model_spec": run.config["model"],
        "settings": settings.to_dict(),
        "vocabulary": {"word_vectors": run.config["word_vectors"], "words": len(vocabulary), **vocabulary.description},
        "target": {"root": str(Path(root).resolve()), "images": scan.images, "skipped": scan.skipped.to_dict()},
        "compute": {"processes": ranks.world, "memory_budget": compute.memory_budget, "naming_maps": scan.naming_maps},
    }
    explanations = Explanations(run.config["model"]["name"], run.layer, settings.method, filters, extra=extra)
    if write:
        save_tensors(run.path / "thresholds.safetensors", {"thresholds": scan.thresholds}, {"quantile": str(settings.quantile)})
        write_json(run.path / "explanations.json", explanations.to_dict(extra))
        write_csv(
            run.path / "explanations.csv",
            ["filter", "rank", "word", "count", "first"],
            [[f.filter, r + 1, w["word"], w["count"], w["first"]] for f in filters for r, w in enumerate(f.words)],
        )
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
