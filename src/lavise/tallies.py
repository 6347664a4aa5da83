"""The IoU pass of an evaluation: every filter's regions against every concept's masks, image by image.

A stream of an annotated dataset's maps (:class:`lavise.features.MapStream`) meets its
masks, loaded in the same chunk-aligned batches; each image adds its region-mask
intersections to the tally of its split (labelling or scoring, :class:`IoUTally`). The
sums are exact, so the ranks' tallies add up to a single process's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from lavise.datasets.base import BadImage, ReferenceDataset, SkipLog, image_size
from lavise.distributed import Ranks
from lavise.features import MapStream, chunk_batches
from lavise.metrics import IoUTally, masks_on_grid
from lavise.models import Preprocessing, preprocess_masks
from lavise.regions import upsampled_regions
from lavise.settings import ComputeSettings


@dataclass
class _MaskItem:
    index: int
    concepts: list[int] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (m, P) bool
    problem: tuple[str, str] | None = None


class _GroundTruthMasks(Dataset):
    """One image's concept masks, resized and cropped like the image, on the IoU grid."""

    def __init__(self, dataset: ReferenceDataset, preprocessing: Preprocessing, size: int) -> None:
        self.dataset, self.preprocessing, self.size = dataset, preprocessing, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> _MaskItem:
        path = self.dataset.image_path(index)
        try:
            size = image_size(path)  # from the header, EXIF orientation applied as load_rgb does
            concepts, masks = self.dataset.masks(index, size)
        except (OSError, BadImage) as error:
            return _MaskItem(index, problem=("unreadable images", f"{path} ({error})"))
        except ValueError as error:
            return _MaskItem(index, problem=("images whose annotations do not fit", f"{path} ({error})"))
        coverage = preprocess_masks(masks, self.preprocessing) if len(concepts) else torch.zeros(0, 1, 1)
        return _MaskItem(index, list(concepts), masks_on_grid(coverage, self.size))


def _pad_masks(items: list[_MaskItem], pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m, P) masks and (n, m) concept indices, padded with −1 to the largest m."""
    width = max([len(it.concepts) for it in items] + [1])
    masks = torch.zeros(len(items), width, pixels, dtype=torch.bool)
    concepts = torch.full((len(items), width), -1, dtype=torch.long)
    for row, item in enumerate(items):
        m = len(item.concepts)
        if m:
            masks[row, :m] = item.masks
            concepts[row, :m] = torch.tensor(item.concepts)
    return masks, concepts


def tally_dataset(
    stream: MapStream,
    dataset: ReferenceDataset,
    thresholds: torch.Tensor,
    labelling: torch.Tensor,
    *,
    size: int,
    compute: ComputeSettings,
    ranks: Ranks,
    step_elements: int = 2**26,
) -> tuple[IoUTally, IoUTally, SkipLog]:
    """IoU tallies of the labelling and scoring splits, in one pass over the maps and masks.

    Each rank tallies its chunks; the sums are exact and merged over the ranks.

    Args:
        stream: the maps of ``dataset``'s images.
        labelling: (len(dataset),) bool, the images in the labelling split.
        step_elements: elements of the region tensor per step; bounds memory.
    """
    d, concepts = stream.filters, len(dataset.concepts)
    device = stream.device
    tallies = (IoUTally.zeros(d, concepts, device), IoUTally.zeros(d, concepts, device))
    skipped = SkipLog()
    pixels = size * size
    step = max(1, step_elements // (d * pixels))
    batches = chunk_batches(stream.bounds, list(stream.mine), compute.batch_size)
    loader = iter(DataLoader(_GroundTruthMasks(dataset, stream.model.preprocessing, size), batch_sampler=batches,
                             num_workers=compute.num_workers, collate_fn=list))
    thresholds = thresholds.to(device)
    with ranks.together("tallying IoU with the masks"):
        for chunk in stream.chunks("IoU tallies"):
            start, stop = stream.bounds[chunk.index]
            items = [item for _ in range(math.ceil((stop - start) / compute.batch_size)) for item in next(loader)]
            row_of = {int(r): i for i, r in enumerate(chunk.rows.tolist())}
            usable = []
            for item in items:
                if item.problem:
                    skipped.add(*item.problem)
                elif item.index in row_of:  # images without features were counted when features were taken
                    usable.append(item)
            for begin in range(0, len(usable), step):
                part = usable[begin : begin + step]
                rows = torch.tensor([row_of[it.index] for it in part])
                regions = upsampled_regions(chunk.maps[rows].to(device), thresholds, (size, size)).flatten(2)
                masks, indices = _pad_masks(part, pixels)
                masks, indices = masks.to(device), indices.to(device)
                split = labelling[torch.tensor([it.index for it in part])]
                for tally, members in zip(tallies, (split, ~split)):
                    if members.any():
                        members = members.to(device)
                        tally.add(regions[members], masks[members], indices[members])
    merged = []
    for tally in tallies:
        images = int(ranks.sum(torch.tensor([tally.images]))[0])
        merged.append(IoUTally(ranks.sum(tally.intersection).cpu(), ranks.sum(tally.region_area).cpu(),
                               ranks.sum(tally.mask_area).cpu(), images))
    every = SkipLog()
    for log in ranks.gather(skipped.to_dict()):
        every.merge(SkipLog.from_dict(log))
    return merged[0], merged[1], every
