"""A training run: features → concept split → explainer, saved in one run directory.

Layout of a run directory::

    config.json              model, preprocessing, layer, reference data, word vectors,
                             training settings, feature shape, package version
    split.json               seen and unseen concepts (and those left out, with reasons)
    explainer.safetensors    the best explainer head (by validation loss)
    reference_outputs.safetensors
                             its outputs on up to 20,000 reference rows (held-out images
                             first): the neighbourhoods of CSLS and the confidence's calibration
    training.csv             loss per epoch
    thresholds.safetensors   written by `explain`: T_u per filter
    explanations.json/.csv   written by `explain`
    hubness-*, confidence-*  written by `explain`: the CSLS penalty and the calibrated
                             confidence, per vocabulary and settings
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lavise._version import __version__
from lavise.compute import cpu_threads, resolve_device
from lavise.datasets.base import ReferenceDataset
from lavise.distributed import Ranks, current
from lavise.embeddings import BUILTIN_GLOVE, concept_vectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.explainer import ExplainerHead, TrainingResult, head_outputs, train_explainer
from lavise.reference import ReferenceRows, reference_rows
from lavise.models import ModelSpec, TargetModel, load_target_model
from lavise.retrieval import REFERENCE_OUTPUTS
from lavise.vocabulary import normalize_concept, unnamed_concepts
from lavise.settings import ComputeSettings, TrainSettings
from lavise.storage import cache_folder, load_tensors, read_json, save_tensors, write_csv, write_json


def split_concepts(names: list[str], unseen_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out round(fraction · C) concepts as unseen, drawn without replacement.

    Example:
        >>> split_concepts(["cat", "dog", "car", "tree"], 0.5, seed=0)
        (['car', 'dog'], ['cat', 'tree'])
    """
    if not 0 <= unseen_fraction < 1:
        raise LaviseError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}.")
    ordered = sorted(set(names))
    count = round(len(ordered) * unseen_fraction)
    unseen = set(random.Random(seed).sample(ordered, count))
    if len(ordered) - len(unseen) < 2:
        raise LaviseError(
            f"unseen_fraction={unseen_fraction} leaves {len(ordered) - len(unseen)} of "
            f"{len(ordered)} concepts for training; the hinge rank loss needs at least 2."
        )
    return [n for n in ordered if n not in unseen], [n for n in ordered if n in unseen]


@dataclass
class Run:
    """A trained run, loaded from its directory."""

    path: Path
    config: dict
    split: dict
    head: ExplainerHead

    @property
    def layer(self) -> str:
        return self.config["layer"]

    @property
    def train_settings(self) -> TrainSettings:
        """The settings the explainer was trained with. Older runs recorded fewer: those
        before 0.2 pooled over the whole grid (``mean``), those before 0.4 trained on
        whole masks only (no activation regions)."""
        return TrainSettings(**{"pooling": "mean", "activation_regions": 0, **self.config["train"]})

    @property
    def pooling(self) -> str:
        """How the explainer's inputs were pooled in training; explain pools alike."""
        return self.train_settings.pooling

    @property
    def model_spec(self) -> ModelSpec:
        """The spec the run's model was built from; a custom module has none."""
        spec = self.config["model"]
        if spec.get("custom"):
            raise LaviseError(
                f"Run '{self.path}' was trained on a custom module ({spec['name']}); pass the "
                "same module again as model=TargetModel(...)."
            )
        return ModelSpec(spec["name"], spec.get("weights"), spec.get("checkpoint"))

    def target_model(self, model: TargetModel | None = None) -> TargetModel:
        """The run's model, rebuilt from its spec (a custom module must be passed again)."""
        if model is not None:
            trained, given = self.config["model"], model.description
            if trained.get("custom") and trained.get("weights_sha256") != given.get("weights_sha256"):
                warnings.warn(
                    f"The module passed for run '{self.path}' does not have the weights the run was "
                    f"trained with (digest {str(given.get('weights_sha256'))[:12]}, trained on "
                    f"{str(trained.get('weights_sha256'))[:12]}); its filters may not be the ones the "
                    "explainer learnt.",
                    LaviseWarning,
                    stacklevel=3,
                )
            return model
        return load_target_model(self.model_spec)

    @property
    def filters(self) -> int:
        """How many filters the explained layer has (the explainer's input size)."""
        return int(self.config["feature_shape"][0])

    def check_filters(self, count: int, where: str) -> None:
        """Refuse features of another layer: ``count`` filters seen on ``where``."""
        if count != self.filters:
            raise LaviseError(
                f"Layer '{self.layer}' gives {count} filters on {where} but the run '{self.path}' was "
                f"trained with {self.filters}: is it the same model?"
            )


def as_run(run: Path | str | Run) -> Run:
    """A loaded run, from a run or its directory."""
    return run if isinstance(run, Run) else load_run(run)


def load_run(path: Path) -> Run:
    path = Path(path)
    for name in ("config.json", "split.json", "explainer.safetensors"):
        if not (path / name).is_file():
            raise LaviseError(f"'{path}' is not a lavise run: it has no {name}. Create one with 'lavise train'.")
    config = read_json(path / "config.json")
    channels, word_dim = config["feature_shape"][0], config["word_dim"]
    head = ExplainerHead(channels, word_dim, config["train"]["dropout"])
    head.load_state_dict(load_tensors(path / "explainer.safetensors"))
    head.eval()
    return Run(path=path, config=config, split=read_json(path / "split.json"), head=head)


def train(
    model: ModelSpec | TargetModel,
    layer: str,
    reference: ReferenceDataset,
    out_dir: Path,
    *,
    word_vectors: str = BUILTIN_GLOVE,
    settings: TrainSettings = TrainSettings(),
    compute: ComputeSettings = ComputeSettings(),
    cache_dir: Path | None = None,
) -> Run:
    """Train an explainer for one layer and save the run.

    Args:
        model: a :class:`ModelSpec` to build, or a ready :class:`TargetModel`.
        layer: dotted path of the layer whose filters will be explained.
        reference: images with concept masks (COCO, folder, ...).
        out_dir: the run directory to create or overwrite.
        word_vectors: ``glove-6b-50d`` or a GloVe/word2vec text file.
        settings: training settings; ``compute``: device, batch size, workers.
        cache_dir: where features are cached (default :func:`default_cache_dir`).
    """
    ranks = current()
    with cpu_threads(compute):
        out_dir = Path(out_dir)
        cache_dir = cache_folder(cache_dir)
        with ranks.together("loading the model and the word vectors"):
            target = model if isinstance(model, TargetModel) else load_target_model(model)
            vectors_source = load_word_vectors(word_vectors, cache_dir=cache_dir)
        ranks.agree({"model": target.identity(), "layer": layer, "reference": reference.identity(),
                     "word_vectors": vectors_source.source, "settings": settings.to_dict()}, "training jobs")
        features = reference_rows(
            target, layer, reference, cache_dir=cache_dir, compute=compute,
            activation_regions=settings.activation_regions, quantile=settings.region_quantile, ranks=ranks,
        )
        trained = None
        with ranks.together("training the explainer"):
            if ranks.main:
                trained = _train_on_rows(target, layer, reference, out_dir, features, vectors_source, settings, compute)
        return _on_every_rank(ranks, trained)


def _train_on_rows(target: TargetModel, layer: str, reference: ReferenceDataset, out_dir: Path, features: ReferenceRows,
                   vectors_source, settings: TrainSettings, compute: ComputeSettings) -> Run:
    """Split the concepts, train the head on the seen concepts' rows, write the run (rank 0)."""
    features.skipped.warn(f"reference {reference.root}")

    without_words = unnamed_concepts(features.concept_names)
    if without_words:
        warnings.warn(
            f"{len(without_words)} concept names mean no word once their dataset's marks are taken off "
            f"(e.g. 'other-merged') and are left out: {', '.join(without_words)}",
            LaviseWarning,
            stacklevel=3,
        )
    names_with_vectors, _, without_vectors = concept_vectors(
        [n for n in features.concept_names if n not in without_words], vectors_source, normalize_concept)
    if without_vectors:
        warnings.warn(
            f"{len(without_vectors)} concepts have no known word in {vectors_source.source} and are "
            f"left out: {', '.join(without_vectors)}",
            LaviseWarning,
            stacklevel=3,
        )
    present = {features.concept_names[i] for i in torch.unique(features.concepts).tolist()}
    without_data = [n for n in names_with_vectors if n not in present]
    if without_data:
        warnings.warn(
            f"{len(without_data)} concepts have no usable mask and are left out: {', '.join(without_data)}",
            LaviseWarning,
            stacklevel=3,
        )
    seen, unseen = split_concepts([n for n in names_with_vectors if n in present], settings.unseen_fraction, settings.seed)

    # Training rows: pairs whose concept is seen; targets index into the seen list.
    seen_index = {name: i for i, name in enumerate(seen)}
    seen_of_concept = torch.tensor([seen_index.get(name, -1) for name in features.concept_names], dtype=torch.long)
    row_targets = seen_of_concept[features.concepts]  # one lookup for every row, not a Python loop over them
    rows = row_targets >= 0
    targets = row_targets[rows]
    _, seen_vectors, _ = concept_vectors(seen, vectors_source, normalize_concept)
    vectors = features.pooled(settings.pooling, rows)
    device = resolve_device(compute.device)
    result = train_explainer(vectors, targets, features.images[rows], seen_vectors, settings, device=device,
                             progress=compute.progress)
    outputs = _reference_outputs(result, vectors, targets, features.regional[rows], settings.seed, device)

    channels = int(features.vectors.shape[1])
    config = {
        "lavise_version": __version__,
        "model": {**target.description},
        "preprocessing": target.preprocessing.to_dict(),
        "layer": layer,
        "reference": {"description": repr(reference), "identity": reference.identity()},
        "word_vectors": vectors_source.source,
        "word_dim": vectors_source.dim,
        "train": settings.to_dict(),
        "feature_shape": [channels, *features.grid],
        "training_pairs": int((rows & ~features.regional).sum()),
        "training_rows": int(rows.sum()),
        "best_epoch": result.best_epoch,
        "skipped": features.skipped.to_dict(),
    }
    split = {
        "seed": settings.seed,
        "unseen_fraction": settings.unseen_fraction,
        "seen": seen,
        "unseen": unseen,
        "without_words": without_words,
        "without_word_vectors": without_vectors,
        "without_usable_masks": without_data,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", "explanations.json", "explanations.csv", "thresholds.safetensors"):
        (out_dir / stale).unlink(missing_ok=True)  # a half-replaced run must not look complete
    for stale in [*out_dir.glob("hubness-*.safetensors"), *out_dir.glob("confidence-*.safetensors")]:
        stale.unlink()  # made for the previous explainer
    save_tensors(out_dir / "explainer.safetensors", result.head.state_dict())
    save_tensors(out_dir / REFERENCE_OUTPUTS, outputs)
    write_csv(
        out_dir / "training.csv",
        ["epoch", "train_loss", "validation_loss"],
        [[h["epoch"], h["train_loss"], h["validation_loss"]] for h in result.history],
    )
    write_json(out_dir / "split.json", split)
    write_json(out_dir / "config.json", config)  # last: its presence marks a complete run
    return Run(path=out_dir, config=config, split=split, head=result.head)


OUTPUT_ROWS = 20_000  # reference rows whose explainer outputs a run keeps, for CSLS and the confidence


def _reference_outputs(result: TrainingResult, vectors, targets: torch.Tensor, regional: torch.Tensor, seed: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """The trained head's outputs on every held-out row (then training rows) up to :data:`OUTPUT_ROWS`.

    ``concepts`` index the seen concepts; ``validation`` marks rows of held-out images.
    """
    generator = torch.Generator().manual_seed(seed)
    held = result.validation_rows
    held = held[torch.randperm(len(held), generator=generator)[:OUTPUT_ROWS]]
    others = torch.ones(len(targets), dtype=torch.bool)
    others[result.validation_rows] = False
    rest = others.nonzero().flatten()
    rest = rest[torch.randperm(len(rest), generator=generator)[: OUTPUT_ROWS - len(held)]]
    rows = torch.cat([held, rest]).sort().values
    return {
        "outputs": head_outputs(result.head, vectors, rows, device=device).float(),
        "concepts": targets[rows].cpu(),
        "validation": ~others[rows],
        "regional": regional.cpu()[rows],
    }


def _on_every_rank(ranks: Ranks, run: Run | None) -> Run:
    """Rank 0's run on every rank: its config, split and explainer (the others have no copy on disk)."""
    if ranks.world == 1:
        return run
    path, config, split = ranks.gather([str(run.path), run.config, run.split] if ranks.main else None)[0]
    state = ranks.from_rank(0, run.head.state_dict() if ranks.main else None)
    head = ExplainerHead(int(config["feature_shape"][0]), int(config["word_dim"]), config["train"]["dropout"])
    head.load_state_dict(state)
    return Run(path=Path(path), config=config, split=split, head=head.eval())
