"""How two models' concepts differ (paper §4.5.5): two explained runs of the same kind of layer.

Counted by the distinct words their filters are named by, the words only one of them
has, and the filters that correspond best: mutual best matches, by the correlation of
their peak activations on shared target images when those are given, else by the cosine
of their word-count profiles. Writes ``models.json`` and ``models.csv`` (atomically).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavise.compute import cpu_threads
from lavise.datasets.base import ImageFiles
from lavise.errors import LaviseError, LaviseWarning
from lavise.explain import read_explanations
from lavise.distributed import current
from lavise.features import MapStream
from lavise.models import TargetModel
from lavise.regions import peak_activations
from lavise.runs import Run, as_run
from lavise.settings import ComputeSettings, ModelComparisonSettings
from lavise.storage import cache_folder, write_csv, write_json


def word_profiles(filter_words: Sequence[Sequence[dict]]) -> tuple[list[str], torch.Tensor]:
    """Each filter's word counts as a row over the words of all filters.

    d filters' [{"word", "count"}, ...] -> (words, (d, V) float64 counts)
    """
    index: dict[str, int] = {}
    rows, columns, values = [], [], []
    for u, words in enumerate(filter_words):
        for entry in words:
            rows.append(u)
            columns.append(index.setdefault(entry["word"], len(index)))
            values.append(float(entry["count"]))
    profiles = torch.zeros(len(filter_words), len(index), dtype=torch.float64)
    profiles[rows, columns] = torch.tensor(values, dtype=torch.float64)
    return list(index), profiles


def profile_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows (0 for an empty row).

    (dA, V), (dB, V) -> (dA, dB)
    """
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def peak_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over images of every pair of filters' peak activations (0 for a constant filter).

    (N, dA), (N, dB) -> (dA, dB)
    """
    a, b = a.double() - a.double().mean(dim=0), b.double() - b.double().mean(dim=0)
    return F.normalize(a, dim=0).T @ F.normalize(b, dim=0)


def mutual_best_matches(similarity: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j) where j is i's most similar column and i is j's most similar row.

    (dA, dB) -> pairs sorted by similarity, highest first
    """
    best_column = similarity.argmax(dim=1)  # (dA,)
    best_row = similarity.argmax(dim=0)  # (dB,)
    rows = torch.arange(similarity.shape[0])
    mutual = rows[best_row[best_column] == rows]
    pairs = [(int(i), int(best_column[i])) for i in mutual]
    return sorted(pairs, key=lambda p: (-float(similarity[p]), p))


@dataclass
class FilterMatch:
    """A filter of run A and the filter of run B that corresponds best to it."""

    a: int
    b: int
    similarity: float
    correlation: float | None
    words_a: list[str]
    words_b: list[str]
    shared_words: list[str]


@dataclass
class ModelComparison:
    """The result of :func:`compare_models`."""

    concepts: dict[str, dict[str, list[int]]]  # per run ("a", "b"): word -> its filters
    shared: list[str]
    unique: dict[str, list[str]]
    matches: list[FilterMatch]
    matched_by: str
    path: Path | None = None


def compare_models(
    run_a: Path | Run,
    run_b: Path | Run,
    *,
    settings: ModelComparisonSettings = ModelComparisonSettings(),
    target: Path | None = None,
    compute: ComputeSettings = ComputeSettings(),
    model_a: TargetModel | None = None,
    model_b: TargetModel | None = None,
    cache_dir: Path | None = None,
    out: Path | None = None,
) -> ModelComparison:
    """Compare the concepts two explained runs' filters are named by (paper §4.5.5).

    Args:
        run_a, run_b: explained runs, e.g. the same layer of a network pretrained on
            ImageNet and of one trained from scratch.
        settings: how many words count per filter, how many matches to report.
        target: images to match filters on by the correlation of their peak activations;
            None matches them by their word-count profiles.
        compute: device and batches; ``model_a``/``model_b``: the runs' custom modules.
        cache_dir: the feature cache (default :func:`lavise.storage.default_cache_dir`).
        out: folder for ``models.json`` and ``models.csv``; None writes nothing.

    Example:
        >>> compare_models("runs/pretrained", "runs/scratch", out="compare/")  # doctest: +SKIP
    """
    for name in ("words_per_filter", "matches"):
        if getattr(settings, name) < 1:
            raise LaviseError(f"{name} must be at least 1, got {getattr(settings, name)}.")
    runs = {"a": as_run(run_a), "b": as_run(run_b)}
    explained = {key: read_explanations(run.path) for key, run in runs.items()}
    _warn_if_unlike(explained, runs)
    filters = {key: data["filters"] for key, data in explained.items()}
    concepts = {key: _concepts_of(filters[key], settings.words_per_filter) for key in runs}
    shared = sorted(set(concepts["a"]) & set(concepts["b"]), key=lambda w: (-len(concepts["a"][w]) - len(concepts["b"][w]), w))
    unique = {
        key: sorted(set(concepts[key]) - set(concepts[other]), key=lambda w: (-len(concepts[key][w]), w))
        for key, other in (("a", "b"), ("b", "a"))
    }

    d_a = len(filters["a"])
    _, profiles = word_profiles([f["words"] for f in filters["a"] + filters["b"]])  # one word axis for both
    similarity = profile_similarity(profiles[:d_a], profiles[d_a:])  # (dA, dB)
    correlation = None
    if target is not None:
        correlation = _peak_correlation_on(runs, target, compute, (model_a, model_b), cache_dir)
    ranking = correlation if correlation is not None else similarity
    pairs = mutual_best_matches(ranking)[: settings.matches]
    matches = []
    for u, v in pairs:
        words_a = [w["word"] for w in filters["a"][u]["words"]]
        words_b = [w["word"] for w in filters["b"][v]["words"]]
        matches.append(FilterMatch(
            a=u, b=v, similarity=float(similarity[u, v]),
            correlation=None if correlation is None else float(correlation[u, v]),
            words_a=words_a, words_b=words_b, shared_words=[w for w in words_a if w in set(words_b)],
        ))
    comparison = ModelComparison(
        concepts, shared, unique, matches,
        "peak-activation correlation" if correlation is not None else "word-profile cosine",
    )
    if out is not None and current().main:  # rank 0 writes
        out = Path(out)
        record = {
            "runs": {
                key: {
                    "path": str(run.path),
                    "model": run.config["model"],
                    "layer": run.layer,
                    "method": explained[key].get("method"),
                    "explained_on": explained[key].get("target", {}).get("root"),
                    "filters": len(filters[key]),
                    "active": sum(1 for f in filters[key] if f.get("active", True)),
                    "concepts": len(concepts[key]),
                    "unique": [{"word": w, "filters": concepts[key][w]} for w in unique[key]],
                }
                for key, run in runs.items()
            },
            "settings": settings.to_dict(),
            "target": None if target is None else str(Path(target).resolve()),
            "matched_by": comparison.matched_by,
            "shared": [{"word": w, "filters_a": concepts["a"][w], "filters_b": concepts["b"][w]} for w in shared],
            "matches": [asdict(m) for m in matches],
        }
        write_csv(
            out / "models.csv",
            ["rank", "filter_a", "filter_b", "similarity", "correlation", "words_a", "words_b"],
            [[r, m.a, m.b, m.similarity, "" if m.correlation is None else m.correlation,
              " ".join(m.words_a[:3]), " ".join(m.words_b[:3])] for r, m in enumerate(matches, start=1)],
        )
        write_json(out / "models.json", record)
        comparison.path = out / "models.json"
    return comparison


def _concepts_of(filters: list[dict], count: int) -> dict[str, list[int]]:
    """word -> the active filters whose first ``count`` words include it."""
    concepts: dict[str, list[int]] = {}
    for f in filters:
        for entry in f["words"][:count]:
            concepts.setdefault(entry["word"], []).append(int(f["filter"]))
    return concepts


def _warn_if_unlike(explained: dict[str, dict], runs: dict[str, Run]) -> None:
    """Counts of words compare fairly only under the same naming; say what differs."""
    differences = []
    for label, get in (
        ("method", lambda d: d.get("method")),
        ("vocabulary", lambda d: d.get("vocabulary")),
        ("target images", lambda d: d.get("target", {}).get("root")),
        ("naming settings", lambda d: {k: v for k, v in d.get("settings", {}).items() if k != "method"}),
    ):
        if get(explained["a"]) != get(explained["b"]):
            differences.append(label)
    if runs["a"].config["feature_shape"][0] != runs["b"].config["feature_shape"][0]:
        differences.append("number of filters")
    if differences:
        warnings.warn(
            f"'{runs['a'].path}' and '{runs['b'].path}' were explained with different "
            f"{', '.join(differences)}; their concepts are not directly comparable.",
            LaviseWarning,
            stacklevel=3,
        )


def _peak_correlation_on(
    runs: dict[str, Run], target: Path, compute: ComputeSettings, models: tuple, cache_dir: Path | None
) -> torch.Tensor:
    """(dA, dB) correlation of the two runs' filters' peak activations on the target images.

    Streamed: run A's peaks go to a scratch file on disk (4·dA bytes per image), then a
    pass over run B adds up the moments over the images both models could read.
    """
    images = ImageFiles(Path(target))
    cache_dir = cache_folder(cache_dir)
    ranks = current()
    streams = [MapStream(run.target_model(model), run.layer, images, cache_dir=cache_dir, compute=compute, ranks=ranks)
               for run, model in zip(runs.values(), models)]
    with cpu_threads(compute), tempfile.TemporaryDirectory(prefix="lavise-peaks-") as scratch, ranks.together("correlating peaks"):
        peaks_a = np.lib.format.open_memmap(Path(scratch) / "a.npy", mode="w+", dtype=np.float32,
                                            shape=(len(images), streams[0].filters))
        seen_a = np.zeros(len(images), dtype=bool)
        for chunk in streams[0].chunks("target features (a)"):
            if len(chunk.rows):
                peaks_a[chunk.rows.numpy()] = peak_activations(chunk.maps).numpy()
                seen_a[chunk.rows.numpy()] = True
        moments = PeakMoments(streams[0].filters, streams[1].filters)
        for chunk in streams[1].chunks("target features (b)"):
            both = seen_a[chunk.rows.numpy()] if len(chunk.rows) else np.zeros(0, dtype=bool)
            if both.any():
                rows = chunk.rows.numpy()[both]
                moments.add(torch.from_numpy(np.asarray(peaks_a[rows])), peak_activations(chunk.maps[torch.from_numpy(both)]))
    total = PeakMoments.from_sums({name: ranks.sum(value) for name, value in moments.sums().items()})
    return total.correlation()


class PeakMoments:
    """Sums over images of two filter sets' peaks, their squares and products: Pearson's r streamed.

    In float64, so that adding batches in any order gives the correlation of all the
    images at once (:func:`peak_correlation`) to within rounding.
    """

    def __init__(self, filters_a: int, filters_b: int) -> None:
        self.count = torch.zeros(1, dtype=torch.float64)
        self.sum_a, self.sum_b = torch.zeros(filters_a, dtype=torch.float64), torch.zeros(filters_b, dtype=torch.float64)
        self.squares_a, self.squares_b = torch.zeros_like(self.sum_a), torch.zeros_like(self.sum_b)
        self.products = torch.zeros(filters_a, filters_b, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """(n, dA) and (n, dB) peaks of the same n images."""
        a, b = a.double(), b.double()
        self.count += len(a)
        self.sum_a += a.sum(dim=0)
        self.sum_b += b.sum(dim=0)
        self.squares_a += (a * a).sum(dim=0)
        self.squares_b += (b * b).sum(dim=0)
        self.products += a.T @ b

    def sums(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "sum_a": self.sum_a, "sum_b": self.sum_b, "squares_a": self.squares_a,
                "squares_b": self.squares_b, "products": self.products}

    @classmethod
    def from_sums(cls, sums: dict[str, torch.Tensor]) -> PeakMoments:
        moments = cls(len(sums["sum_a"]), len(sums["sum_b"]))
        for name, value in sums.items():
            setattr(moments, name, value)
        return moments

    def correlation(self) -> torch.Tensor:
        """(dA, dB) Pearson correlation; 0 for a filter constant over the images."""
        n = self.count.clamp_min(1)
        covariance = self.products - torch.outer(self.sum_a, self.sum_b) / n
        spread_a = (self.squares_a - self.sum_a**2 / n).clamp_min(0).sqrt()
        spread_b = (self.squares_b - self.sum_b**2 / n).clamp_min(0).sqrt()
        scale = torch.outer(spread_a, spread_b)
        return torch.where(scale > 1e-12 * n, covariance / scale.clamp_min(1e-300), torch.zeros_like(covariance))
