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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lavise.datasets.base import ReferenceDataset, SkipLog
from lavise.distributed import Ranks
from lavise.features import MapStream
from lavise.models import TargetModel
from lavise.naming import feature_inputs, pair_outputs, scan_filters, stream_thresholds
from lavise.settings import ComputeSettings
from lavise.storage import read_safetensors, save_tensors, tensors_digest
from lavise.tallies import tally_dataset

SURVEY = "filter_survey.safetensors"
METHOD = "activation"  # the explainer input the survey names with; explain uses the survey only with it
TOP_IMAGES = 50  # held-out images kept per filter: explain names with its first top_images of them
QUANTILE = 0.005  # T_u as explain's default takes it
IOU_SIZE = 112  # the grid where regions meet masks, as evaluate's default
IOU_THRESHOLD = 0.04  # NetDissect's: a concept is a filter's label or ground truth above it


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
             "iou_threshold": IOU_THRESHOLD, "held_out_images": scan.images, "threshold_images": usable, "labelling_images": label_tally.images,
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
