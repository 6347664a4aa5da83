"""What the reference annotations say about each real filter, measured when a run is trained.

The reference data is annotated, and the explainer never trained on its held-out
(validation) images. Those images are a small annotated target on which lavise checks
its own naming of the real filters, as ``lavise evaluate`` does on annotated data, and
on which the confidence is fitted (:func:`lavise.confidence.calibrate_on_survey`):

- ``outputs``: each filter's p most activated held-out images and the explainer's output
  on each, by activation masking (T_u taken over every surveyed image). They are kept as vectors,
  not words, so that explain names them with whatever vocabulary and retrieval it uses;
- ``firing``: whether the filter fires on each of them (:meth:`FilterScan.firing`);
- ``label_iou``: the IoU of its regions with every concept on the *training* images
  (up to ``TrainSettings.survey_images``): what the annotations say it detects, the
  label NetDissect would give it;
- ``truth_iou``: the same on the held-out images: the ground truth the survey's first
  words are checked against, as evaluate checks words on its scoring images.

Simulated filters (:func:`lavise.confidence.simulated_filters`) have no regions, so they
cannot tell the confidence whether a first word agrees with the annotations; these real
filters can. The survey costs one more pass over the held-out images and the sampled
training images (their maps cached like a target's).

What explain reads from it: :class:`ReferenceLabels` (each filter's label, and the
features of :data:`lavise.confidence.LABEL_FEATURES`) and :func:`survey_calibration`
(the confidence fitted on the surveyed filters, cached in the run).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lavise.confidence import Calibration, calibrate_on_survey, label_features, named_truth, vote_features
from lavise.datasets.base import ReferenceDataset, SkipLog
from lavise.distributed import Ranks
from lavise.errors import LaviseWarning
from lavise.features import MapStream
from lavise.models import TargetModel
from lavise.naming import feature_inputs, pair_outputs, scan_filters, stream_thresholds
from lavise.settings import ComputeSettings
from lavise.storage import read_safetensors, save_tensors, tensors_digest
from lavise.tallies import tally_dataset
from lavise.vocabulary import normalize_concept

SURVEY = "filter_survey.safetensors"
METHOD = "activation"  # the explainer input the survey names with; explain uses the survey only with it
TOP_IMAGES = 50  # held-out images kept per filter: explain names with its first top_images of them
QUANTILE = 0.005  # T_u as explain's default takes it
IOU_SIZE = 112  # the grid where regions meet masks, as evaluate's default
IOU_THRESHOLD = 0.04  # NetDissect's: a concept is a filter's label or ground truth above it
CALIBRATION_VERSION = 2  # of the confidence's cached calibrations: 2 records what it was fitted on and its features

# The surveyed filters the confidence is fitted on: those with a ground-truth concept on the held-out images,
# as evaluate scores only those ("all" counts the rest as wrong; its 0.9 threshold named 2-30 % of the filters
# with ground truth on the demo's development seed, docs/evaluation.md)
SURVEY_FILTERS = "with ground truth"
MIN_SURVEY_FILTERS = 20  # fewer named real filters than this cannot fit six weights: simulated filters instead


class ImageSubset:
    """Some images of a reference dataset, in the given order, with their masks."""

    def __init__(self, dataset: ReferenceDataset, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices.tolist()]
        self.root, self.concepts, self.skipped = dataset.root, dataset.concepts, SkipLog()

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"{len(self)} images of {self.dataset!r}"

    def image_path(self, index: int) -> Path:
        return self.dataset.image_path(self.indices[index])

    def masks(self, index: int, size: tuple[int, int]):
        return self.dataset.masks(self.indices[index], size)

    def identity(self) -> dict:
        return {"subset_of": self.dataset.identity(), "indices": tensors_digest(torch.tensor(self.indices))}


def survey_images(row_images: torch.Tensor, validation_rows: torch.Tensor, images: int, count: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The survey's images (:mod:`lavise.survey`): the held-out images the explainer never
    trained on, and up to ``count`` of the other reference images, drawn with ``seed``.

    (n,) image of each training row, the rows of held-out images, the dataset's size ->
    (held-out image indices, labelling image indices), each sorted
    """
    held = torch.unique(row_images[validation_rows])
    others = torch.ones(images, dtype=torch.bool)
    others[held] = False
    rest = others.nonzero().flatten()
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:count]]
    return held, rest.sort().values


def survey_filters(
    target: TargetModel,
    layer: str,
    reference: ReferenceDataset,
    head: torch.nn.Module,
    held_out: torch.Tensor,
    labelling: torch.Tensor,
    *,
    pooling: str,
    dim: int,
    compute: ComputeSettings,
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The survey's tensors and facts (see the module), or None without two usable held-out images.

    Args:
        held_out: dataset indices of the images the explainer did not train on.
        labelling: dataset indices of the training images whose IoU gives the labels.
        pooling: the run's (``Run.pooling``); ``dim``: the explainer's output size.
    """
    ranks = Ranks()  # rank 0 trains the explainer alone; the survey goes with it
    if len(held_out) < 2:
        warnings.warn(
            f"Only {len(held_out)} reference images are held out of training (validation_fraction): too few to "
            "survey the filters on, so the run has no filter survey, its filters no reference labels, and explain "
            "fits the confidence on simulated filters.",
            LaviseWarning,
            stacklevel=4,
        )
        return None
    # T_u over every surveyed image, as explain takes it over its whole target: the held-out
    # images alone are few, and a filter's top 0.5 % of their positions can be its maximum
    both = ImageSubset(reference, torch.cat([held_out, labelling]))
    every = MapStream(target, layer, both, cache_dir=cache_dir, compute=compute, ranks=ranks)
    thresholds, usable = stream_thresholds(every, QUANTILE, ranks, compute, description="surveying the filters' levels")
    is_label = torch.zeros(len(both), dtype=torch.bool)
    is_label[len(held_out):] = True
    label_tally, truth_tally, _ = tally_dataset(every, both, thresholds, is_label, size=IOU_SIZE,
                                                compute=compute, ranks=ranks)

    held = ImageSubset(reference, held_out)
    stream = MapStream(target, layer, held, cache_dir=cache_dir, compute=compute, ranks=ranks)
    scan = scan_filters(stream, quantile=QUANTILE, top=min(TOP_IMAGES, len(held)), compute=compute, ranks=ranks,
                        description="surveying the filters on held-out reference images")
    if scan.images < 2:
        return None
    scan.thresholds = thresholds  # the top images are the held-out ones; their regions, every image's T_u
    filters = torch.arange(stream.filters)
    inputs = lambda maps, _: feature_inputs(METHOD, maps, thresholds, stream.device, pooling)  # noqa: E731
    outputs = pair_outputs(stream, scan, filters, inputs, head, dim, compute=compute, ranks=ranks)
    tensors = {
        "outputs": outputs.half(),  # (f, p, D): half precision halves the file; words barely move
        "firing": scan.firing(filters),
        "active": scan.active,
        "label_iou": label_tally.iou().float(),
        "truth_iou": truth_tally.iou().float(),
    }
    facts = {"method": METHOD, "top_images": int(scan.chosen.shape[1]), "quantile": QUANTILE, "iou_size": IOU_SIZE,
             "iou_threshold": IOU_THRESHOLD, "held_out_images": scan.images, "threshold_images": usable,
             "labelling_images": label_tally.images,
             "concepts": list(reference.concepts)}
    return tensors, facts


def save_survey(path: Path, tensors: dict[str, torch.Tensor], facts: dict) -> None:
    save_tensors(path, tensors, {"facts": json.dumps(facts)})


def load_survey(run_path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The run's survey, or None for a run trained without one (before lavise 0.5, or too
    few held-out images) or whose survey file cannot be read."""
    found = read_safetensors(Path(run_path) / SURVEY)
    if found is None or "facts" not in found[1]:
        return None
    tensors, metadata = found
    return {name: t.clone() for name, t in tensors.items()}, json.loads(metadata["facts"])


@dataclass
class ReferenceLabels:
    """What the reference annotations say each filter detects (from the run's survey).

    ``iou``: (d, C) IoU of each filter's regions with each reference concept on the
    reference training images; ``concepts``: their names as the dataset spells them;
    ``word_of_concept``: (C,) each concept's word in the naming vocabulary (−1: none);
    ``threshold``: the IoU above which a concept is a filter's ground truth on the held-out
    images (NetDissect's 0.04); ``minimum``: that above which its concept of highest IoU is
    its label (``ExplainSettings.label_iou``).
    """

    iou: torch.Tensor
    concepts: list[str]
    word_of_concept: torch.Tensor
    threshold: float
    minimum: float

    def features(self, first: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        """(f,) first words of the (f,) filters -> (f, 2) :data:`lavise.confidence.LABEL_FEATURES`."""
        return label_features(first, self.iou[filters], self.word_of_concept, self.minimum)

    def label_words(self, filters: torch.Tensor) -> list[int]:
        """Each filter's label as a vocabulary word id: its best concept's, when above the minimum; −1 otherwise."""
        best_iou, best = self.iou[filters].max(dim=1)
        return torch.where(best_iou > self.minimum, self.word_of_concept[best], -1).tolist()

    def labels(self) -> list[tuple[str | None, float]]:
        """Every filter's concept of highest IoU (None when none exceeds the minimum) and that IoU."""
        best_iou, best = self.iou.max(dim=1)
        return [(self.concepts[c] if value > self.minimum else None, round(value, 4))
                for c, value in zip(best.tolist(), best_iou.tolist())]


def reference_labels(survey: tuple[dict[str, torch.Tensor], dict], words: list[str],
                     minimum: float = IOU_THRESHOLD) -> ReferenceLabels:
    tensors, facts = survey
    index = {w: i for i, w in enumerate(words)}
    word_of_concept = torch.tensor([index.get(normalize_concept(c), -1) for c in facts["concepts"]], dtype=torch.int64)
    return ReferenceLabels(tensors["label_iou"].float(), list(facts["concepts"]), word_of_concept,
                           float(facts["iou_threshold"]), minimum)


def survey_calibration(run_path: Path, naming, survey: tuple[dict[str, torch.Tensor], dict],
                       ranks: Ranks) -> Calibration | None:
    """The confidence fitted on the run's real filters, named on the held-out reference
    images as explain names them on the target (``naming``: a :class:`lavise.explain.Naming`),
    cached in the run; None when the survey cannot stand for this naming (another explainer
    input, more top images than it kept, too few filters)."""
    settings = naming.settings
    tensors, facts = survey
    if settings.method != facts["method"] or settings.top_images > facts["top_images"]:
        return None
    p, s = settings.top_images, settings.words_per_image
    outputs, firing = tensors["outputs"][:, :p].float(), tensors["firing"][:, :p].bool()
    labels = naming.labels
    truth = tensors["truth_iou"].float()
    usable = tensors["active"].bool() & (firing.any(dim=1) if settings.firing_images_only else True)
    if SURVEY_FILTERS == "with ground truth":
        usable &= (truth > labels.threshold).any(dim=1)
    if int(usable.sum()) < MIN_SURVEY_FILTERS:  # counted before naming: a filter may still end up without words
        return None
    parts = {"product": "confidence", "fitted_on": "reference filters", "version": CALIBRATION_VERSION,
             "survey": tensors_digest(outputs, firing, labels.iou, labels.word_of_concept, truth),
             "words": naming.vocabulary.words,
             "vectors": tensors_digest(naming.vectors),
             "penalty": None if naming.penalty is None else tensors_digest(naming.penalty),
             **{k: getattr(settings, k) for k in ("top_images", "words_per_image", "ranking", "abstain_precision", "threshold_rule",
                                                  "firing_images_only", "label_first", "label_iou")}, "filters": SURVEY_FILTERS}

    def build():
        f = len(outputs)
        ids, scores = naming.votes(outputs.flatten(0, 1))
        ids, scores = ids.reshape(f, p * s), scores.reshape(f, p * s)
        voting = naming.voting(firing)
        first = torch.tensor([r[0].word if r else -1 for r in naming.ranked(ids, scores, top=1, voting=voting,
                                                                             filters=torch.arange(f))], dtype=torch.int64)
        features = torch.cat([vote_features(ids, scores, first.clamp_min(0), s, voting),
                              labels.features(first, torch.arange(f))], dim=1).numpy()
        right = named_truth(first, truth, labels.word_of_concept, labels.threshold)
        keep = (usable & (first >= 0)).numpy()
        fitted = calibrate_on_survey(features[keep], right[keep], target=settings.abstain_precision,
                                     held_out_images=int(facts["held_out_images"]), rule=settings.threshold_rule)
        return fitted.to_tensors()

    return Calibration.from_tensors(*ranks.cached(run_path, "confidence", parts, build))
