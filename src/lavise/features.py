"""Batched feature extraction, each image through the backbone once, cached on disk.

Two products:
- reference features: one pooled d-vector mean(F ⊙ M) per (image, concept) — all the
  explainer is ever trained on;
- target feature maps: F for every target image, from which thresholds, top images and
  every method's explainer inputs are computed.

Both are cached under a key of model, weights, preprocessing, layer and dataset, and
recomputed when any of them changes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lavise.attention import masked_mean, masks_to_grid
from lavise.datasets.base import BadImage, ImageFiles, ReferenceDataset, SkipLog, load_rgb
from lavise.models import Preprocessing, TargetModel, layer_reader
from lavise.storage import cache_key, load_cached, save_tensors


@contextlib.contextmanager
def cpu_threads(threads: int, num_workers: int) -> Iterator[None]:
    """Set torch's CPU threads for a block; 0 means the cores the loader workers leave."""
    count = threads or max(1, (os.cpu_count() or 1) - num_workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def preprocess_image(image, preprocessing: Preprocessing) -> torch.Tensor:
    """PIL RGB image -> normalised (3, crop, crop) float tensor."""
    tensor = TF.pil_to_tensor(image)
    tensor = TF.resize(
        tensor,
        [preprocessing.resize_size],
        interpolation=TF.InterpolationMode(preprocessing.interpolation),
        antialias=True,
    )
    tensor = TF.center_crop(tensor, [preprocessing.crop_size])
    tensor = TF.to_dtype(tensor, torch.float32, scale=True)
    return TF.normalize(tensor, list(preprocessing.mean), list(preprocessing.std))


def preprocess_masks(masks: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """(m, H, W) binary masks -> (m, crop, crop) coverage in [0, 1], aligned with the image.

    Masks take the image's resize and crop; the resize averages (antialias) rather than
    samples, so thin or small regions keep partial weight.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).float()
    tensor = TF.resize(tensor, [preprocessing.resize_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(tensor, [preprocessing.crop_size]).clamp_(0, 1)


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


def _batches(dataset, preprocessing, with_masks, batch_size, num_workers, description, progress):
    loader = DataLoader(
        _Images(dataset, preprocessing, with_masks),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        persistent_workers=False,
    )
    with tqdm(total=len(dataset), desc=description, unit="img", disable=not progress) as bar:
        for items in loader:
            yield items
            bar.update(len(items))


@dataclass
class ReferenceFeatures:
    """Pooled masked features of a reference dataset.

    Attributes:
        vectors: (N, d) mean(F ⊙ M), one row per (image, concept) pair.
        areas: (N,) the mask's share of the feature grid, Σ M / hw; vectors / areas is
            the mean of F inside the mask.
        concepts: (N,) index into ``concept_names``.
        images: (N,) index of the image in the dataset.
        concept_names: every concept of the dataset.
        grid: (h, w) of the layer's feature map.
        skipped: what could not be used, by reason.
    """

    vectors: torch.Tensor
    concepts: torch.Tensor
    images: torch.Tensor
    concept_names: list[str]
    grid: tuple[int, int]
    skipped: SkipLog
    areas: torch.Tensor

    def pooled(self, pooling: str) -> torch.Tensor:
        """(N, d) explainer inputs: ``mean`` over the grid (as stored) or ``region``, over the mask."""
        return self.vectors if pooling == "mean" else self.vectors / self.areas.clamp_min(1e-12).unsqueeze(1)


def reference_features(
    model: TargetModel,
    layer: str,
    dataset: ReferenceDataset,
    *,
    cache_dir: Path | None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> ReferenceFeatures:
    """Pool the layer's features under each concept mask of each reference image (cached)."""
    key = cache_key({"product": "reference-pooled", "version": 2, **model.identity(), "layer": layer, "data": dataset.identity()})
    path = cache_dir / f"reference-{key[:24]}.safetensors" if cache_dir else None
    if path is not None and (hit := load_cached(path, key)) is not None:
        tensors, metadata = hit
        info = json.loads(metadata["info"])
        return ReferenceFeatures(
            tensors["vectors"], tensors["concepts"], tensors["images"], info["concept_names"],
            tuple(info["grid"]), SkipLog.from_dict(info["skipped"]), tensors["areas"],
        )

    skipped = SkipLog()
    skipped.merge(dataset.skipped)
    torch_device = resolve_device(device)
    module = model.module.to(torch_device)
    vectors, concepts, images, areas = [], [], [], []
    grid = None
    with layer_reader(module, layer) as read, torch.inference_mode():
        for items in _batches(dataset, model.preprocessing, True, batch_size, num_workers, "reference features", progress):
            good = []
            for item in items:
                if item.problem:
                    skipped.add(item.problem[0], f"{dataset.image_path(item.index)} ({item.problem[1]})")
                elif not item.concepts:
                    skipped.add("images without any annotation", str(dataset.image_path(item.index)))
                else:
                    good.append(item)
            if not good:
                continue
            maps = read(torch.stack([it.image for it in good]).to(torch_device)).float()
            grid = tuple(maps.shape[-2:])
            pairs = [(n, concept) for n, it in enumerate(good) for concept in it.concepts]
            owner = torch.tensor([n for n, _ in pairs], device=torch_device)
            cells = masks_to_grid(torch.cat([it.masks for it in good]).to(torch_device), grid)
            empty = (cells.flatten(1).sum(dim=1) <= 0).cpu()
            for row in empty.nonzero().flatten().tolist():
                n, concept = pairs[row]
                where = f"{dataset.image_path(good[n].index).name}:{dataset.concepts[concept]}"
                skipped.add("concept masks of zero area after resize and crop", where)
            keep = ~empty
            vectors.append(masked_mean(maps[owner], cells).cpu()[keep])
            areas.append(cells.flatten(1).mean(dim=1).cpu()[keep])
            concepts.append(torch.tensor([concept for _, concept in pairs])[keep])
            images.append(torch.tensor([good[n].index for n, _ in pairs])[keep])
    if not vectors or sum(len(v) for v in vectors) == 0:
        raise_no_usable("reference", dataset, skipped)
    result = ReferenceFeatures(
        torch.cat(vectors), torch.cat(concepts).long(), torch.cat(images).long(),
        list(dataset.concepts), grid, skipped, torch.cat(areas),
    )
    if path is not None:
        info = {"concept_names": result.concept_names, "grid": list(grid), "skipped": skipped.to_dict()}
        save_tensors(
            path,
            {"vectors": result.vectors, "concepts": result.concepts, "images": result.images, "areas": result.areas},
            {"key": key, "info": json.dumps(info)},
        )
    return result


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
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> TargetFeatures:
    """The layer's feature maps for every target image (cached)."""
    key = cache_key({"product": "target-maps", **model.identity(), "layer": layer, "data": images.identity()})
    path = cache_dir / f"target-{key[:24]}.safetensors" if cache_dir else None
    if path is not None and (hit := load_cached(path, key)) is not None:
        tensors, metadata = hit
        info = json.loads(metadata["info"])
        return TargetFeatures(tensors["maps"], info["paths"], SkipLog.from_dict(info["skipped"]))

    skipped = SkipLog()
    torch_device = resolve_device(device)
    module = model.module.to(torch_device)
    maps, paths = [], []
    with layer_reader(module, layer) as read, torch.inference_mode():
        for items in _batches(images, model.preprocessing, False, batch_size, num_workers, "target features", progress):
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
    result = TargetFeatures(torch.cat(maps), paths, skipped)
    if path is not None:
        info = {"paths": paths, "skipped": skipped.to_dict()}
        save_tensors(path, {"maps": result.maps}, {"key": key, "info": json.dumps(info)})
    return result


def raise_no_usable(kind: str, dataset, skipped: SkipLog) -> None:
    from lavise.errors import LaviseError

    reasons = "; ".join(skipped.lines()) or "no images"
    raise LaviseError(f"No usable {kind} image in '{dataset.root}': {reasons}.")
