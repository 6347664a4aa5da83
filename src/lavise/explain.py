"""Naming filters: thresholds, top images, explainer inputs, nearest words, ranking.

For each filter u: its p most activated target images; on each, the explainer input
for u (see :mod:`lavise.inputs`), the explainer's output (:func:`explainer_outputs`),
and its s nearest words; the s·p words ranked (:func:`rank_words`); the top x reported.
:func:`explain` writes them into the run as ``explanations.json`` and ``.csv``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lavise.compute import cpu_threads, resolve_device
from lavise.datasets.base import ImageFiles, relative_name
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.features import target_features
from lavise.inputs import explainer_inputs
from lavise.models import TargetModel
from lavise.regions import peak_activations, quantile_thresholds
from lavise.runs import Run, as_run
from lavise.settings import METHODS, RANKINGS, ComputeSettings, ExplainSettings
from lavise.storage import cache_folder, read_json, save_tensors, write_csv, write_json


def top_images(maps: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` images with the highest maximum activation of each filter.

    (N, d, h, w) -> (d, count) image indices, most activated first
    """
    return torch.topk(peak_activations(maps).T, count, dim=1).indices


def nearest_words(
    queries: torch.Tensor, unit_vocabulary: torch.Tensor, count: int, *, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` words of highest cosine similarity to each query.

    (Q, D), (V, D) unit rows -> (Q, count) word indices, (Q, count) similarities
    """
    queries = F.normalize(queries, dim=1)
    indices, values = [], []
    for start in range(0, len(queries), chunk):
        top = torch.topk(queries[start : start + chunk] @ unit_vocabulary.T, count, dim=1)
        indices.append(top.indices)
        values.append(top.values)
    return torch.cat(indices), torch.cat(values)


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
    model: str
    layer: str
    method: str
    filters: list[FilterExplanation]
    path: Path | None = None

    def to_dict(self, extra: dict | None = None) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "method": self.method,
            **(extra or {}),
            "filters": [asdict(f) for f in self.filters],
        }


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

    Writes ``thresholds.safetensors``, ``explanations.json`` and ``explanations.csv``
    into the run directory (unless ``write`` is false).
    """
    with cpu_threads(compute):
        if settings.method not in METHODS:
            raise LaviseError(f"Unknown method '{settings.method}'; valid: {', '.join(METHODS)}.")
        for name in ("top_images", "words_per_image", "top_words"):
            if getattr(settings, name) < 1:
                raise LaviseError(f"{name} must be at least 1, got {getattr(settings, name)}.")
        run = as_run(run)
        images = target if isinstance(target, ImageFiles) else ImageFiles(Path(target))
        cache_dir = cache_folder(cache_dir)
        target_model = run.target_model(model)

        vocabulary = load_word_vectors(run.config["word_vectors"], cache_dir=cache_dir).vocabulary(
            size=settings.vocabulary_size, word_list=settings.vocabulary_file
        )
        known = set(vocabulary.words)
        outside = [c for c in run.split["seen"] + run.split["unseen"] if c not in known and " " not in c]
        if outside:
            warnings.warn(
                f"{len(outside)} reference concepts are not in the vocabulary and can never be "
                f"named: {', '.join(outside[:20])}",
                LaviseWarning,
                stacklevel=2,
            )
        if settings.words_per_image > len(vocabulary):
            raise LaviseError(f"words_per_image={settings.words_per_image} exceeds the vocabulary ({len(vocabulary)} words).")

        features = target_features(target_model, run.layer, images, cache_dir=cache_dir, compute=compute)
        features.skipped.warn(f"target {images.root}")
        maps = features.maps
        run.check_filters(maps.shape[1], "the target images")
        per_filter = settings.top_images
        if per_filter > len(maps):
            warnings.warn(
                f"top_images={per_filter} but only {len(maps)} usable target images; using {len(maps)}.",
                LaviseWarning,
                stacklevel=2,
            )
            per_filter = len(maps)

        thresholds = quantile_thresholds(maps, settings.quantile)
        chosen = top_images(maps, per_filter)  # (d, p)
        device = resolve_device(compute.device)
        word_ids, similarities = pair_words(
            run.head, feature_inputs(settings.method, maps, thresholds, device, run.pooling), chosen,
            vocabulary.unit_vectors, settings.words_per_image, device=device, progress=compute.progress,
        )
        ranked = rank_words(word_ids, similarities, settings.top_words,
                            words_per_image=settings.words_per_image, ranking=settings.ranking)
        flat = maps.flatten(2)
        active = (flat.amax(dim=(0, 2)) > flat.amin(dim=(0, 2))).tolist()
        root = images.root
        filters = [
            FilterExplanation(
                filter=u,
                words=[{"word": vocabulary.words[r.word], "count": r.count, "first": r.first} for r in ranked[u]]
                if active[u] else [],
                top_images=[relative_name(features.paths[i], root) for i in chosen[u].tolist()],
                threshold=float(thresholds[u]),
                active=bool(active[u]),
            )
            for u in range(maps.shape[1])
        ]
        inactive = [f.filter for f in filters if not f.active]
        if inactive:
            warnings.warn(
                f"{len(inactive)} filters are constant on every target image and get no words: "
                f"{inactive[:20]}",
                LaviseWarning,
                stacklevel=2,
            )
        explanations = Explanations(run.config["model"]["name"], run.layer, settings.method, filters)
        if write:
            extra = {
                "model_spec": run.config["model"],
                "settings": settings.to_dict(),
                "vocabulary": {"word_vectors": run.config["word_vectors"], "words": len(vocabulary), **vocabulary.description},
                "target": {"root": str(Path(root).resolve()), "images": len(features.paths), "skipped": features.skipped.to_dict()},
            }
            save_tensors(run.path / "thresholds.safetensors", {"thresholds": thresholds}, {"quantile": str(settings.quantile)})
            write_json(run.path / "explanations.json", explanations.to_dict(extra))
            write_csv(
                run.path / "explanations.csv",
                ["filter", "rank", "word", "count", "first"],
                [[f.filter, r + 1, w["word"], w["count"], w["first"]] for f in filters for r, w in enumerate(f.words)],
            )
            explanations.path = run.path / "explanations.json"
        return explanations


PairInputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def feature_inputs(
    method: str, maps: torch.Tensor, thresholds: torch.Tensor, device: torch.device, pooling: str
) -> PairInputs:
    """The explainer inputs of (filter, image) pairs computed from feature maps held in memory.

    ``pooling`` is the run's (``Run.pooling``).

    (n,) filters, (n,) image rows -> (n, d) on ``device``
    """
    thresholds = thresholds.to(device)

    def inputs(filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return explainer_inputs(method, maps[rows].to(device), filters.to(device), thresholds, pooling)

    return inputs


def _output_chunks(
    head: torch.nn.Module, pair_inputs: PairInputs, filters: torch.Tensor, rows: torch.Tensor, *,
    device: torch.device, chunk: int, progress: bool,
) -> Iterator[torch.Tensor]:
    """The explainer's outputs for the pairs (filters[i], rows[i]), ``chunk`` pairs at a time, on ``device``."""
    head = head.to(device).eval()
    for start in tqdm(range(0, len(filters), chunk), desc="naming filters", unit="batch", disable=not progress):
        yield _head_outputs(head, pair_inputs, filters[start : start + chunk], rows[start : start + chunk])


@torch.inference_mode()
def _head_outputs(head: torch.nn.Module, pair_inputs: PairInputs, filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return head(pair_inputs(filters, rows))


def explainer_outputs(
    head: torch.nn.Module,
    pair_inputs: PairInputs,
    filters: torch.Tensor,
    rows: torch.Tensor,
    *,
    device: torch.device = torch.device("cpu"),
    chunk: int = 2048,
    progress: bool = False,
) -> torch.Tensor:
    """The explainer's output in word space for each (filter, image) pair: the step before nearest words.

    ``pair_inputs(filters, rows)`` gives the explainer inputs of a batch of pairs
    (:func:`feature_inputs`, or image masking, which re-runs the network).

    (n,) filters, (n,) image rows -> (n, D) on the CPU, not normalised
    """
    return torch.cat([out.cpu() for out in _output_chunks(
        head, pair_inputs, filters, rows, device=device, chunk=chunk, progress=progress)])


def pair_words(
    head: torch.nn.Module,
    pair_inputs: PairInputs,
    chosen: torch.Tensor,
    unit_vocabulary: torch.Tensor,
    words_per_image: int,
    *,
    device: torch.device,
    progress: bool = False,
    chunk: int = 2048,
    filter_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest words for every (filter, top image) pair, in batches of pairs.

    The same loop serves the feature-space methods and image masking (see
    :func:`explainer_outputs`). ``filter_ids`` names the filters of ``chosen``'s rows
    (default: 0..d−1).

    (d, p) chosen image rows -> (d, p·s) word indices and similarities
    """
    d, p = chosen.shape
    filter_ids = torch.arange(d) if filter_ids is None else filter_ids
    filters = filter_ids.repeat_interleave(p)  # (d·p,)
    vocab = unit_vocabulary.to(device)
    ids, sims = [], []
    for outputs in _output_chunks(head, pair_inputs, filters, chosen.flatten(), device=device, chunk=chunk, progress=progress):
        words, values = nearest_words(outputs, vocab, words_per_image)
        ids.append(words.cpu())
        sims.append(values.cpu())
    return torch.cat(ids).reshape(d, p * words_per_image), torch.cat(sims).reshape(d, p * words_per_image)


def read_explanations(run_path: Path) -> dict:
    """A run's ``explanations.json``, or a LaviseError saying how to make it."""
    path = Path(run_path) / "explanations.json"
    if not path.is_file():
        raise LaviseError(
            f"'{run_path}' has no explanations.json: name its filters first with "
            f"'lavise explain {run_path} --target FOLDER'."
        )
    return read_json(path)
