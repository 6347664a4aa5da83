"""What the experiments share: the demo folders and protocol runs they read, and their tables.

- :class:`DemoFolder`: the data, runs and cache of a ``lavise demo --out DIR`` folder
  (also the ``seed-S`` folders that ``benchmarks/fresh_seeds.py`` writes);
- :func:`protocol_layers`: the protocol runs that ``benchmarks/fresh_seeds.py`` trains
  under ``WORK/seed-S/protocol``, found on disk, each with its feature maps, thresholds
  and top images on the demo's evaluation scenes (:class:`ScoredLayer`);
- :func:`filter_vectors`: the explainer's outputs on each scored filter's top images;
- :func:`mean_sd`, :func:`print_mean_sd_rows`: mean ± sd over seeds, as Markdown.

The experiments import this module as ``common``: run as ``python experiments/NAME.py``,
a script's own folder is on the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavise.datasets.coco import CocoDataset
from lavise.embeddings import Vocabulary, WordVectors, load_word_vectors
from lavise.evaluate import Evaluation, evaluate
from lavise.naming import explainer_outputs, feature_inputs
from lavise.features import target_features
from lavise.regions import top_images
from lavise.regions import quantile_thresholds
from lavise.runs import Run, load_run
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings
from lavise.storage import read_json


@dataclass(frozen=True)
class DemoFolder:
    """What the experiment scripts read from a ``lavise demo`` folder: its data, runs and cache."""

    path: Path

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    @property
    def reference(self) -> CocoDataset:
        """The reference scenes the demo's explainers learn from."""
        return CocoDataset(self.path / "data/reference/annotations.json", self.path / "data/reference/images")

    @property
    def evaluation(self) -> CocoDataset:
        """The annotated evaluation scenes, held-out concepts included."""
        return CocoDataset(self.path / "data/evaluation/annotations.json", self.path / "data/evaluation/images")

    def run(self, target: str) -> Run:
        """The demo's run of ``efficientnet_lite0`` or ``scene_cnn``."""
        return load_run(self.path / "runs" / target)


@dataclass
class ScoredLayer:
    """One protocol run on its demo's evaluation scenes: what the experiments share."""

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

# The experiments answered their questions with lavise 0.4's naming (the 20,000 most frequent
# words, cosine, no concept names added); they keep it, so their figures stay reproducible.
NAMING = ExplainSettings.as_in_0_4()


def protocol_runs(folder: Path, explainer: str) -> list[tuple[str, str, Path]]:
    """(target, layer, run directory) of every run of ``explainer`` in a seed's protocol folder.

    ``benchmarks/fresh_seeds.py`` names them ``{target}-{layer}-{explainer}``; the target
    and layer are read from each run's ``config.json``, in the order of the folder names.
    """
    found = []
    for path in sorted(folder.glob(f"*-{explainer}")):
        if not path.is_dir():
            continue
        if not (path / "config.json").is_file():
            raise SystemExit(f"'{path}' is not a complete run (no config.json): rerun benchmarks/fresh_seeds.py.")
        config = read_json(path / "config.json")
        target, layer = config["model"]["name"], config["layer"]
        if path.name == f"{target}-{layer}-{explainer}":  # not the run of another explainer ending alike
            found.append((target, layer, path))
    if not found:
        raise SystemExit(f"No protocol runs of the '{explainer}' explainer in '{folder}': run benchmarks/fresh_seeds.py.")
    return found


def protocol_layers(work: Path, seeds: list[int], explainer: str, compute: ComputeSettings,
                    top: int = 25) -> Iterator[ScoredLayer]:
    """Every protocol run of ``explainer`` in ``work``, seed by seed and layer by layer."""
    for seed in seeds:
        demo = DemoFolder(work / f"seed-{seed}")
        for target, layer, path in protocol_runs(demo.path / "protocol", explainer):
            run = load_run(path)
            [evaluation] = evaluate([run], demo.evaluation, settings=EvaluateSettings(methods=("activation",)),
                                    explain_settings=NAMING, compute=compute, cache_dir=demo.cache, write=False)
            truth = [[g["concept"] for g in f["ground_truth"]] for f in evaluation.filters]
            maps = target_maps(run, demo, compute)
            word_vectors = load_word_vectors(run.config["word_vectors"], cache_dir=demo.cache)
            yield ScoredLayer(
                seed, f"{target} {layer}", demo, run, evaluation, truth,
                torch.tensor([u for u, t in enumerate(truth) if t]), maps, quantile_thresholds(maps, 0.005),
                top_images(maps, top), word_vectors, word_vectors.vocabulary(size=20_000),
            )


def target_maps(run: Run, demo: DemoFolder, compute: ComputeSettings) -> torch.Tensor:
    """(N, d, h, w) the run's layer on the demo's evaluation scenes (cached)."""
    return target_features(run.target_model(), run.layer, demo.evaluation, cache_dir=demo.cache, compute=compute).maps


def filter_vectors(head: torch.nn.Module, pooling: str, maps: torch.Tensor, thresholds: torch.Tensor,
                   chosen: torch.Tensor, scored: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(f, p, D) unit explainer outputs for each scored filter's top images (activation masking).

    ``pooling`` is the one the head was trained with (``Run.pooling``).
    """
    device = torch.device("cpu")
    inputs = feature_inputs("activation", maps, thresholds, device, pooling)
    p = chosen.shape[1]
    filters, rows = scored.repeat_interleave(p), chosen[scored].flatten()
    outputs = explainer_outputs(head, inputs, filters, rows, device=device, chunk=chunk)
    return F.normalize(outputs, dim=1).reshape(len(scored), p, -1)


def mean_sd(values: list[float | None]) -> str:
    """``mean ± sd`` (sample sd; 0 for one value) of the values given, ``–`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def print_mean_sd_rows(table: dict[str, dict[str, list[tuple[float, ...]]]]) -> None:
    """Markdown rows ``| layer | name | mean ± sd of each column |`` of {layer: {name: [per-seed tuple]}}."""
    for layer, rows in table.items():
        for name, values in rows.items():
            print(f"| {layer} | {name} | " + " | ".join(mean_sd(list(c)) for c in np.array(values).T) + " |")
