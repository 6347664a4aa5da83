"""Batched feature extraction, each image through the backbone once per product, cached on disk.

Three products, each cached (:func:`lavise.storage.cached`) under a key of model,
weights, preprocessing, layer, dataset and the settings it depends on, and recomputed
when any of them changes:

- reference features: per (image, concept) pair the pooled d-vector mean(F ⊙ M) of the
  concept's mask, and with activation regions up to k more rows per pair, pooled over
  the active regions of the filters strongest inside the mask: what the explainer
  trains on (:func:`reference_features`);
- reference thresholds: T_u over the reference images, for those regions, in one
  streaming pass (:func:`reference_thresholds`);
- target feature maps: F for every target image, from which thresholds, top images and
  every method's explainer inputs are computed (:func:`target_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lavise.compute import resolve_device
from lavise.datasets.base import BadImage, ImageFiles, ReferenceDataset, SkipLog, load_rgb
from lavise.errors import LaviseError
from lavise.inputs import masked_mean
from lavise.models import Preprocessing, TargetModel, layer_reader, preprocess_image, preprocess_masks
from lavise.regions import ThresholdTally, masks_to_grid, strongest_regions
from lavise.settings import ComputeSettings, TrainSettings
from lavise.storage import cached


@dataclass
class _Item:
    index: int
    image: torch.Tensor | None = None
    concepts: list[int] | None = None
    masks: torch.Tensor | None = None
    problem: tuple[str, str] | None = None  # (reason counted, detail for the example)


class _Images(Dataset):
    """Loads and preprocesses one image (and its masks); failures become items, not errors."""

    def __init__(self, dataset, preprocessing: Preprocessing, with_masks: bool) -> None:
        self.dataset = dataset
        self.preprocessing = preprocessing
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> _Item:
        try:
            image = load_rgb(self.dataset.image_path(index))
        except BadImage as error:
            return _Item(index, problem=("unreadable images", str(error)))
        item = _Item(index, image=preprocess_image(image, self.preprocessing))
        if self.with_masks:
            try:
                concepts, masks = self.dataset.masks(index, image.size)
            except ValueError as error:
                return _Item(index, problem=("images whose annotations do not fit", str(error)))
            item.concepts = concepts
            item.masks = preprocess_masks(masks, self.preprocessing)
        return item


def _batches(dataset, preprocessing: Preprocessing, with_masks: bool, compute: ComputeSettings, description: str):
    """Batches of loaded items, decoded by ``compute.num_workers`` processes, with a progress bar."""
    loader = DataLoader(
        _Images(dataset, preprocessing, with_masks),
        batch_size=compute.batch_size,
        num_workers=compute.num_workers,
        collate_fn=list,
        persistent_workers=False,
    )
    with tqdm(total=len(dataset), desc=description, unit="img", disable=not compute.progress) as bar:
        for items in loader:
            yield items
            bar.update(len(items))


@dataclass
class ReferenceFeatures:
    """Pooled masked features of a reference dataset.

    Attributes:
        vectors: (N, d) mean(F ⊙ M) over the whole grid, one row per (image, concept)
            pair, and with activation regions, rows pooled over such regions too.
        areas: (N,) the mask's share of the feature grid, Σ M / hw; vectors / areas is
            the mean of F inside the mask.
        concepts: (N,) index into ``concept_names``.
        images: (N,) index of the image in the dataset.
        concept_names: every concept of the dataset.
        grid: (h, w) of the layer's feature map.
        skipped: what could not be used, by reason.
        regional: (N,) True for a row pooled over a filter's activation region inside
            the mask (:func:`lavise.regions.strongest_regions`), False for a whole mask.
    """

    vectors: torch.Tensor
    concepts: torch.Tensor
    images: torch.Tensor
    concept_names: list[str]
    grid: tuple[int, int]
    skipped: SkipLog
    areas: torch.Tensor
    regional: torch.Tensor

    @property
    def pairs(self) -> int:
        """How many (image, concept) pairs: the rows of whole masks."""
        return int((~self.regional).sum())

    def pooled(self, pooling: str) -> torch.Tensor:
        """(N, d) explainer inputs: ``mean`` over the grid (as stored) or ``region``, over the mask."""
        return self.vectors if pooling == "mean" else self.vectors / self.areas.clamp_min(1e-12).unsqueeze(1)


def _usable(items, dataset, skipped: SkipLog) -> list:
    """The items of a batch with an image and at least one mask; the rest counted in ``skipped``."""
    good = []
    for item in items:
        if item.problem:
            skipped.add(item.problem[0], f"{dataset.image_path(item.index)} ({item.problem[1]})")
        elif not item.concepts:
            skipped.add("images without any annotation", str(dataset.image_path(item.index)))
        else:
            good.append(item)
    return good


def _reference_maps(model: TargetModel, layer: str, dataset: ReferenceDataset, skipped: SkipLog, *,
                    description: str, compute: ComputeSettings):
    """(usable items, their (n, d, h, w) maps on the device) per batch; the rest counted in ``skipped``."""
    torch_device = resolve_device(compute.device)
    module = model.module.to(torch_device)
    with layer_reader(module, layer) as read, torch.inference_mode():
        for items in _batches(dataset, model.preprocessing, True, compute, description):
            good = _usable(items, dataset, skipped)
            if good:
                yield good, read(torch.stack([it.image for it in good]).to(torch_device)).float()


def reference_thresholds(
    model: TargetModel,
    layer: str,
    dataset: ReferenceDataset,
    quantile: float,
    *,
    cache_dir: Path | None,
    compute: ComputeSettings = ComputeSettings(),
) -> torch.Tensor:
    """(d,) T_u over the usable reference images, as explain takes them over its targets (cached).

    One streaming pass (:class:`lavise.regions.ThresholdTally`), so a reference set
    larger than memory works; the images counted are those :func:`reference_features`
    pools.
    """

    def build():
        tally, skipped = None, SkipLog()
        skipped.merge(dataset.skipped)
        for _, maps in _reference_maps(model, layer, dataset, skipped, description="reference thresholds", compute=compute):
            if tally is None:
                tally = ThresholdTally(quantile, len(dataset) * maps.shape[2] * maps.shape[3])
            tally.add(maps)
        if tally is None:
            raise_no_usable("reference", dataset, skipped)
        return {"thresholds": tally.thresholds().cpu()}, {}

    parts = {"product": "reference-thresholds", **model.identity(), "layer": layer, "data": dataset.identity(),
             "quantile": quantile}
    return cached(cache_dir, "thresholds", parts, build)[0]["thresholds"]


def reference_features(
    model: TargetModel,
    layer: str,
    dataset: ReferenceDataset,
    *,
    cache_dir: Path | None,
    compute: ComputeSettings = ComputeSettings(),
    activation_regions: int = TrainSettings.activation_regions,
    quantile: float = TrainSettings.region_quantile,
) -> ReferenceFeatures:
    """Pool the layer's features under each concept mask of each reference image (cached).

    With ``activation_regions`` = k > 0, each (image, concept) pair also gives up to k
    rows pooled over the activation regions of the k filters most active inside its
    mask (:func:`lavise.regions.strongest_regions`, with T_u at ``quantile`` over the
    reference images; empty regions give no row). That costs a second pass over the
    images, for the thresholds. k = 0 pools whole masks only, as the paper.
    """
    if activation_regions < 0:
        raise LaviseError(f"activation_regions must be 0 or more, got {activation_regions}.")
    regions = {"activation_regions": activation_regions, "quantile": quantile} if activation_regions else {}
    parts = {"product": "reference-pooled", "version": 3, **model.identity(), "layer": layer,
             "data": dataset.identity(), **regions}

    def build():
        result = _pool_reference(model, layer, dataset, cache_dir, compute, activation_regions, quantile)
        tensors = {"vectors": result.vectors, "concepts": result.concepts, "images": result.images,
                   "areas": result.areas, "regional": result.regional}
        return tensors, {"concept_names": result.concept_names, "grid": list(result.grid), "skipped": result.skipped.to_dict()}

    tensors, info = cached(cache_dir, "reference", parts, build)
    return ReferenceFeatures(
        tensors["vectors"], tensors["concepts"], tensors["images"], info["concept_names"],
        tuple(info["grid"]), SkipLog.from_dict(info["skipped"]), tensors["areas"], tensors["regional"],
    )


def _pool_reference(model, layer, dataset, cache_dir, compute, activation_regions, quantile) -> ReferenceFeatures:
    """The rows of :func:`reference_features`, computed in one pass over the images."""
    thresholds = None
    if activation_regions:
        thresholds = reference_thresholds(model, layer, dataset, quantile, cache_dir=cache_dir, compute=compute)
    skipped = SkipLog()
    skipped.merge(dataset.skipped)
    vectors, concepts, images, areas, regional = [], [], [], [], []
    grid = None

    def keep_rows(masks, pair_maps, pair_concepts, pair_images, is_regional):
        """Pool under (P, h, w) or (P, k, h, w) masks; a mask of zero area gives no row."""
        pooled = masked_mean(pair_maps, masks).cpu().reshape(-1, pair_maps.shape[1])
        area = masks.flatten(-2).mean(dim=-1).cpu().flatten()
        copies = area.numel() // len(pair_concepts)  # k masks per pair, pair-major
        found = area > 0
        vectors.append(pooled[found])
        areas.append(area[found])
        concepts.append(pair_concepts.repeat_interleave(copies)[found])
        images.append(pair_images.repeat_interleave(copies)[found])
        regional.append(torch.full((int(found.sum()),), is_regional))

    for good, maps in _reference_maps(model, layer, dataset, skipped, description="reference features", compute=compute):
        grid = tuple(maps.shape[-2:])
        pairs = [(n, concept) for n, it in enumerate(good) for concept in it.concepts]
        cells = masks_to_grid(torch.cat([it.masks for it in good]).to(maps.device), grid)
        empty = (cells.flatten(1).sum(dim=1) <= 0).cpu()
        for row in empty.nonzero().flatten().tolist():
            n, concept = pairs[row]
            where = f"{dataset.image_path(good[n].index).name}:{dataset.concepts[concept]}"
            skipped.add("concept masks of zero area after resize and crop", where)
        pair_maps = maps[torch.tensor([n for n, _ in pairs], device=maps.device)]
        pair_concepts = torch.tensor([concept for _, concept in pairs])
        pair_images = torch.tensor([good[n].index for n, _ in pairs])
        keep_rows(cells, pair_maps, pair_concepts, pair_images, False)
        if thresholds is not None:
            regions = strongest_regions(pair_maps, cells, thresholds.to(maps.device), activation_regions)
            keep_rows(regions, pair_maps, pair_concepts, pair_images, True)
    if not vectors or sum(len(v) for v in vectors) == 0:
        raise_no_usable("reference", dataset, skipped)
    return ReferenceFeatures(
        torch.cat(vectors), torch.cat(concepts).long(), torch.cat(images).long(),
        list(dataset.concepts), grid, skipped, torch.cat(areas), torch.cat(regional),
    )


@dataclass
class TargetFeatures:
    """Feature maps of the target images.

    Attributes:
        maps: (N, d, h, w) the layer's output for each usable image.
        paths: the N image files, in the same order.
        skipped: images that could not be used.
    """

    maps: torch.Tensor
    paths: list[str]
    skipped: SkipLog


def target_features(
    model: TargetModel,
    layer: str,
    images: ImageFiles,
    *,
    cache_dir: Path | None,
    compute: ComputeSettings = ComputeSettings(),
) -> TargetFeatures:
    """The layer's feature maps for every target image (cached)."""

    def build():
        skipped = SkipLog()
        torch_device = resolve_device(compute.device)
        module = model.module.to(torch_device)
        maps, paths = [], []
        with layer_reader(module, layer) as read, torch.inference_mode():
            for items in _batches(images, model.preprocessing, False, compute, "target features"):
                good = []
                for item in items:
                    if item.problem:
                        skipped.add(item.problem[0], f"{images.image_path(item.index)} ({item.problem[1]})")
                    else:
                        good.append(item)
                if good:
                    maps.append(read(torch.stack([it.image for it in good]).to(torch_device)).float().cpu())
                    paths.extend(str(images.image_path(it.index)) for it in good)
        if not maps:
            raise_no_usable("target", images, skipped)
        return {"maps": torch.cat(maps)}, {"paths": paths, "skipped": skipped.to_dict()}

    parts = {"product": "target-maps", **model.identity(), "layer": layer, "data": images.identity()}
    tensors, info = cached(cache_dir, "target", parts, build)
    return TargetFeatures(tensors["maps"], info["paths"], SkipLog.from_dict(info["skipped"]))


def raise_no_usable(kind: str, dataset, skipped: SkipLog) -> None:
    reasons = "; ".join(skipped.lines()) or "no images"
    raise LaviseError(f"No usable {kind} image in '{dataset.root}': {reasons}.")
