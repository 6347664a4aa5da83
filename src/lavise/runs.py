"""A training run: features → concept split → explainer, saved in one run directory.

Layout of a run directory::

    config.json              model, preprocessing, layer, reference data, word vectors,
                             training settings, feature shape, package version
    split.json               seen and unseen concepts (and those left out, with reasons)
    explainer.safetensors    the best explainer head (by validation loss)
    reference_outputs.safetensors
                             its outputs on up to 20,000 reference rows (held-out images
                             first): the neighbourhoods of CSLS and the confidence's calibration
    filter_survey.safetensors
                             every filter on the held-out reference images: its top images'
                             explainer outputs and its IoU with the concepts (lavise.survey)
    training.csv             loss per epoch
    thresholds.safetensors   written by `explain`: T_u per filter
    explanations.json/.csv   written by `explain`
    hubness-*, confidence-*  written by `explain`: the CSLS penalty and the calibrated
                             confidence, per vocabulary and settings
"""

from __future__ import annotations

import dataclasses
import random
import uuid
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
from lavise.features import layer_probe
from lavise.explainer import ExplainerHead, TrainingResult, head_outputs, split_by_group, train_explainer
from lavise.reference import ReferenceRows, reference_rows
from lavise.models import ModelSpec, TargetModel, load_target_model
from lavise.retrieval import REFERENCE_OUTPUTS
from lavise.vocabulary import normalize_concept, unnamed_concepts
from lavise.settings import ComputeSettings, TrainSettings
from lavise.survey import SURVEY, save_survey, survey_filters, survey_images
from lavise.storage import cache_folder, load_tensors, output_set, read_json, save_tensors, write_csv, write_json


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
        return ModelSpec(spec["name"], spec.get("weights"), spec.get("checkpoint"), spec.get("layout", "auto"))

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
            self._check_checkpoint(given)
            trained_layout = self.config.get("layout_requested", "auto")
            if model.layout == "auto" and trained_layout != "auto":  # the layout the run was trained with
                model = dataclasses.replace(model, layout=trained_layout)
            return model
        model = load_target_model(self.model_spec)
        self._check_checkpoint(model.description)
        return model

    def _check_checkpoint(self, given: dict) -> None:
        """Refuse a checkpoint file whose contents changed since training: the same
        architecture with other weights has other filters, and the explainer would name
        them with what it learnt of the old ones."""
        trained = self.config["model"].get("checkpoint_sha256")
        now = given.get("checkpoint_sha256")
        if trained is not None and now != trained:
            raise LaviseError(
                f"The checkpoint '{given.get('checkpoint')}' is not the file run '{self.path}' was trained "
                f"with (sha256 now {str(now)[:12]}, at training {trained[:12]}): its filters are not the ones "
                "the explainer learnt. Put the original file back, or train the run again."
            )

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
    """The run in directory ``path``; a LaviseError naming the file when it is not a
    complete, readable run (missing, truncated or edited files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LaviseError(f"'{path}' is a file, not a run directory. Create a run with 'lavise train'.")
    for name in ("config.json", "split.json", "explainer.safetensors"):
        if not (path / name).is_file():
            raise LaviseError(f"'{path}' is not a lavise run: it has no {name}. Create one with 'lavise train'.")
    config = _run_json(path / "config.json", _CONFIG_FIELDS)
    split = _run_json(path / "split.json", _SPLIT_FIELDS)
    head = ExplainerHead(config["feature_shape"][0], config["word_dim"], config["train"]["dropout"])
    run = Run(path=path, config=config, split=split, head=head)
    try:
        run.train_settings  # every later stage reads them: a wrong one is said now, naming the file
    except (LaviseError, TypeError) as error:
        raise LaviseError(f"'{path / 'config.json'}' is damaged: its training settings are wrong ({error}). "
                          "Train the run again.") from None
    try:
        head.load_state_dict(load_tensors(path / "explainer.safetensors"))
    except Exception as error:  # safetensors and torch report damage in several types
        raise LaviseError(
            f"'{path / 'explainer.safetensors'}' is damaged or does not fit the run's config.json "
            f"({str(error).splitlines()[0][:200]}): train the run again."
        ) from None
    head.eval()
    return run


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What load_run and the commands after it rely on, with what each must be.
_CONFIG_FIELDS = {
    "layer": ("a layer name", lambda v: isinstance(v, str) and bool(v)),
    "model": ("an object with the model's name", lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)),
    "preprocessing": ("an object", lambda v: isinstance(v, dict)),
    "feature_shape": ("a list of positive integers [filters, h, w]",
                      lambda v: isinstance(v, list) and len(v) == 3 and all(_positive_int(x) for x in v)),
    "word_dim": ("a positive integer", _positive_int),
    "word_vectors": ("a word-vector source", lambda v: isinstance(v, str)),
    "train": ("an object with the training settings, dropout in [0, 1)",
              lambda v: isinstance(v, dict) and isinstance(v.get("dropout"), (int, float))
              and not isinstance(v.get("dropout"), bool) and 0 <= v["dropout"] < 1),
}
_SPLIT_FIELDS = {"seen": ("a list of concept names", _names), "unseen": ("a list of concept names", _names)}


def _run_json(path: Path, fields: dict) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise LaviseError(f"'{path}' is damaged ({error}): train the run again.") from None
    if not isinstance(data, dict):
        raise LaviseError(f"'{path}' is damaged: it holds a {type(data).__name__}, not an object. Train the run again.")
    for name, (what, valid) in fields.items():
        if name not in data:
            raise LaviseError(f"'{path}' is damaged: it has no '{name}'. Train the run again.")
        if not valid(data[name]):
            raise LaviseError(f"'{path}' is damaged: '{name}' should be {what}, not {data[name]!r:.80}. Train the run again.")
    return data


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
        with ranks.together("checking the run directory"):
            if ranks.main:
                check_run_folder(out_dir)
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
                trained = _train_on_rows(target, layer, reference, out_dir, features, vectors_source, settings, compute,
                                         cache_dir)
        return _on_every_rank(ranks, trained)


def _train_on_rows(target: TargetModel, layer: str, reference: ReferenceDataset, out_dir: Path, features: ReferenceRows,
                   vectors_source, settings: TrainSettings, compute: ComputeSettings, cache_dir: Path | None) -> Run:
    """Split the concepts, train the head on the seen concepts' rows, survey its filters, write the run (rank 0)."""
    features.skipped.warn(f"reference {reference.root}")

    without_words = unnamed_concepts(features.concept_names)
    if without_words:
        warnings.warn(
            f"{len(without_words)} concept names mean no word once their dataset's marks are taken off "
            f"(e.g. 'other-merged') and are left out: {', '.join(without_words)}",
            LaviseWarning,
            stacklevel=3,
        )
    names_with_vectors, name_vectors, without_vectors = concept_vectors(
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

    rows, targets = seen_rows(features, seen)
    row_of = {name: i for i, name in enumerate(names_with_vectors)}
    seen_vectors = name_vectors[[row_of[name] for name in seen]]  # computed once: its warnings are said once
    vectors = features.pooled(settings.pooling, rows)
    device = resolve_device(compute.device)
    result = train_explainer(vectors, targets, features.images[rows], seen_vectors, settings, device=device,
                             progress=compute.progress)
    outputs = _reference_outputs(result, vectors, targets, features.regional[rows], settings.seed, device)
    survey = None
    if settings.survey_images > 0:
        held_out, labelling = survey_images(features.images[rows], result.validation_rows, len(reference),
                                            settings.survey_images, settings.seed)
        survey = survey_filters(target, layer, reference, result.head, held_out, labelling, pooling=settings.pooling,
                                dim=vectors_source.dim, compute=compute, cache_dir=cache_dir)

    channels = int(features.vectors.shape[1])
    _, layout = layer_probe(target, layer, device)
    config = {
        "lavise_version": __version__,
        "run_id": uuid.uuid4().hex,  # this training's identity: outputs made from it record it
        "model": {**target.description},
        "preprocessing": target.preprocessing.to_dict(),
        "layer": layer,
        "layout": layout.to_dict(),  # how the layer's output was read as maps (tokens, channels last, ...)
        "layout_requested": target.layout,
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
    # Every file of the run changes together or not at all, config.json (the run's identity) last;
    # what the previous explainer's outputs were made from goes with them.
    with output_set(out_dir, last="config.json", replaces=DERIVED_OUTPUTS) as run_files:
        save_tensors(run_files.path("explainer.safetensors"), result.head.state_dict())
        save_tensors(run_files.path(REFERENCE_OUTPUTS), outputs)
        if survey is not None:
            save_survey(run_files.path(SURVEY), *survey)
        write_csv(
            run_files.path("training.csv"),
            ["epoch", "train_loss", "validation_loss"],
            [[h["epoch"], h["train_loss"], h["validation_loss"]] for h in result.history],
        )
        write_json(run_files.path("split.json"), split)
        write_json(run_files.path("config.json"), config)
    return Run(path=out_dir, config=config, split=split, head=result.head)


# The files a run directory holds: what train writes, and what the other commands derive
# from its explainer (removed when it is trained again: they describe the old one).
TRAIN_OUTPUTS = ("config.json", "split.json", "explainer.safetensors", REFERENCE_OUTPUTS, SURVEY, "training.csv")
DERIVED_OUTPUTS = (
    "thresholds.safetensors", "explanations.json", "explanations.csv", "hubness-*.safetensors",
    "confidence-*.safetensors", "evaluation.json", "evaluation.md", "evaluation.png",
    "groups.json", "groups.csv", "groups.png", "sweep.json", "sweep.md",
)


def check_run_folder(out_dir: Path) -> None:
    """Refuse to train into a folder that holds anything but an earlier lavise run.

    A new or empty folder is fine, and so is an earlier run (even a half-written one):
    its files are replaced, other files in it are kept. A folder of other files (a
    user's own ``config.json``, say) is refused before any work is done, so nothing of
    the user's is overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LaviseError(f"The run directory '{out_dir}' is a file, not a folder: choose a folder for the run.")
    if not out_dir.is_dir():
        return
    present = [p for p in out_dir.iterdir() if not p.name.startswith(".staging-")]
    if not present:
        return
    kind = _config_kind(out_dir / "config.json")
    if kind == "lavise":
        return
    if kind == "other":
        raise LaviseError(
            f"'{out_dir / 'config.json'}' is not a lavise run's config.json: lavise will not overwrite it. "
            "Train into a new or empty folder."
        )
    ours = [p for p in present if (p.is_file() and any(p.match(pattern) for pattern in TRAIN_OUTPUTS + DERIVED_OUTPUTS))
            or (p.is_dir() and p.name == "report")]  # lavise report's default folder
    if len(ours) < len(present) or not ours:
        others = sorted(p.name for p in present if p not in ours)
        raise LaviseError(
            f"'{out_dir}' holds files that are not a lavise run ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): lavise will not write into it. Train into a new or "
            "empty folder, or into an earlier run to replace it."
        )


def _config_kind(path: Path) -> str:
    """'lavise', 'other' (JSON that is not a run's), 'unreadable' or 'missing'."""
    if not path.is_file():
        return "missing"
    try:
        config = read_json(path)
    except (OSError, ValueError):
        return "unreadable"  # a damaged run's config.json: the folder's other files decide
    return "lavise" if isinstance(config, dict) and "lavise_version" in config and "feature_shape" in config else "other"


def seen_rows(features: ReferenceRows, seen: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows: (N,) whether each reference row's concept is seen, and those rows'
    targets, indices into ``seen``."""
    seen_index = {name: i for i, name in enumerate(seen)}
    seen_of_concept = torch.tensor([seen_index.get(name, -1) for name in features.concept_names], dtype=torch.long)
    row_targets = seen_of_concept[features.concepts]  # one lookup for every row, not a Python loop over them
    rows = row_targets >= 0
    return rows, row_targets[rows]


def add_survey(run: Path | Run, reference: ReferenceDataset, *, model: TargetModel | None = None,
               compute: ComputeSettings = ComputeSettings(), cache_dir: Path | None = None) -> bool:
    """Survey the filters of a run trained without a survey (lavise 0.5 before it had one),
    on the reference data it was trained on, and save it into the run; False when it has
    too few held-out images for one. The explainer is not trained again: its held-out
    images are found as training found them (the validation split is seeded). ``model``:
    the module of a run trained on a custom one, as explain takes it.
    """
    run = as_run(run)
    if reference.identity() != run.config["reference"]["identity"]:
        raise LaviseError(f"{reference!r} is not the reference data run '{run.path}' was trained on.")
    settings, target = run.train_settings, run.target_model(model)
    cache_dir = cache_folder(cache_dir)
    with cpu_threads(compute):
        features = reference_rows(target, run.layer, reference, cache_dir=cache_dir, compute=compute,
                                  activation_regions=settings.activation_regions, quantile=settings.region_quantile,
                                  ranks=Ranks())
        rows, _ = seen_rows(features, run.split["seen"])
        _, validation = split_by_group(features.images[rows], settings.validation_fraction,
                                       torch.Generator().manual_seed(settings.seed))
        held_out, labelling = survey_images(features.images[rows], validation, len(reference),
                                            max(settings.survey_images, 1), settings.seed)
        survey = survey_filters(target, run.layer, reference, run.head, held_out, labelling, pooling=settings.pooling,
                                dim=int(run.config["word_dim"]), compute=compute, cache_dir=cache_dir)
    if survey is None:
        return False
    with output_set(run.path, last=SURVEY) as files:
        save_survey(files.path(SURVEY), *survey)
    return True


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
