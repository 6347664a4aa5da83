"""Small JPEG thumbnails of the images the report shows, with each filter's region drawn in.

A thumbnail shows what the network saw: the preprocessing's resize and centre crop,
scaled to a square of ``size`` pixels. On a filter's top image the filter's activation
map is upsampled (bilinear) to the thumbnail, thresholded at the filter's T_u, and drawn
as NetDissect's reports draw it: the region kept as it is, the rest dimmed, with an
outline around it.

Thumbnails are made once: ``manifest.json`` in the thumbnail folder records, per filter
and per example image, a key of everything the picture depends on (model and its
preprocessing, layer, each image's name, size and modification time, T_u, thumbnail
size, quality and drawing), and a thumbnail whose key is unchanged and whose file
exists is not made again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lavise.datasets.base import BadImage, SkipLog, load_rgb
from lavise.models import Preprocessing
from lavise.regions import upsampled_regions
from lavise.storage import atomic_path, cache_key, read_json, write_json

MANIFEST_VERSION = 1
DIM = 0.3  # brightness kept outside a filter's region
OUTLINE = (255, 214, 0)  # RGB of the region's outline


# --- the pure parts ------------------------------------------------------------------------


def crop_box(width: int, height: int, preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """The part of a (width × height) image the network sees after resize and centre crop.

    The shorter side is resized to ``resize_size`` and a ``crop_size`` square cut from the
    middle, so in the original image's pixels the square has side
    crop_size · shorter / resize_size (clipped to the image when the crop is larger).

    Example:
        >>> crop_box(200, 100, Preprocessing(resize_size=64, crop_size=32))
        (75.0, 25.0, 125.0, 75.0)
    """
    side = preprocessing.crop_size * min(width, height) / preprocessing.resize_size
    side_x, side_y = min(side, width), min(side, height)
    left, top = (width - side_x) / 2, (height - side_y) / 2
    return (left, top, left + side_x, top + side_y)


def region_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: int) -> torch.Tensor:
    """Where each upsampled activation map exceeds its threshold.

    (P, h, w) maps, (P,) thresholds -> (P, size, size) bool
    """
    return upsampled_regions(maps[:, None], thresholds[:, None], (size, size))[:, 0]


def region_outlines(masks: torch.Tensor) -> torch.Tensor:
    """The pixels of each region that touch a pixel outside it (8-neighbourhood).

    A 3×3 erosion, done as two passes of three shifted ANDs; outside the picture counts
    as inside, so the picture's edge is no region's edge.

    (P, H, W) bool -> (P, H, W) bool
    """
    padded = F.pad(masks.to(torch.uint8), (1, 1, 1, 1), value=1).bool()  # (P, H+2, W+2)
    rows = padded[:, :, :-2] & padded[:, :, 1:-1] & padded[:, :, 2:]  # (P, H+2, W)
    inside = rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]  # (P, H, W): all 9 neighbours in
    return masks & ~inside


def dim_table(dim: float = DIM) -> np.ndarray:
    """round(v · dim) for every uint8 value v, as a lookup table: (256,) uint8."""
    return np.round(np.arange(256, dtype=np.float32) * np.float32(dim)).astype(np.uint8)


def overlay_regions(
    images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor, *, dim: float = DIM, outline=OUTLINE
) -> torch.Tensor:
    """Draw each filter's region over its image: dim outside, keep inside, outline the edge.

    (P, S, S, 3) uint8 images, (P, h, w) maps, (P,) thresholds -> (P, S, S, 3) uint8
    """
    masks = region_masks(maps, thresholds, images.shape[1])  # (P, S, S)
    dimmed = torch.from_numpy(dim_table(dim)[images.numpy()])  # a table lookup: no float copy
    out = torch.where(masks[..., None], images, dimmed)
    out[region_outlines(masks)] = torch.tensor(outline, dtype=torch.uint8)
    return out


# --- the I/O parts -------------------------------------------------------------------------


def load_thumbnail(path: Path, preprocessing: Preprocessing, size: int) -> np.ndarray:
    """The network's view of an image file as a (size, size, 3) uint8 array.

    Raises BadImage for files that cannot be read.
    """
    image = load_rgb(path)
    box = crop_box(image.width, image.height, preprocessing)
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0))


def save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    """Write an (H, W, 3) uint8 array as a JPEG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality, optimize=False)


@dataclass
class Manifest:
    """What each thumbnail was made from; read and written as ``manifest.json``."""

    path: Path
    filters: dict[str, dict] = field(default_factory=dict)  # filter -> {"key", "missing": [ranks]}
    examples: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = read_json(path)
            if data.get("version") == MANIFEST_VERSION:
                return cls(path, dict(data.get("filters", {})), dict(data.get("examples", {})))
        except (OSError, ValueError, AttributeError):
            pass  # missing or damaged: everything is made again
        return cls(path)

    def save(self) -> None:
        write_json(self.path, {"version": MANIFEST_VERSION, "filters": self.filters, "examples": self.examples})


def digest(*parts: object) -> str:
    """A short stable digest of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class FilterImages:
    """One filter's top images (names relative to the target root) and its threshold T_u."""

    filter: int
    names: list[str]
    threshold: float


@dataclass
class ThumbnailJob:
    """Everything needed to draw thumbnails from the images under one root."""

    root: Path
    folder: Path  # the report's thumbnail folder
    preprocessing: Preprocessing
    size: int
    quality: int
    base_key: str  # model, layer, size, quality, drawing
    _stamps: dict[str, list | None] = field(default_factory=dict, repr=False)

    def stamp(self, name: str) -> list | None:
        """Size and modification time of an image (None if it is gone), looked up once."""
        if name not in self._stamps:
            try:
                stat = (self.root / name).stat()
                self._stamps[name] = [stat.st_size, stat.st_mtime_ns]
            except OSError:
                self._stamps[name] = None
        return self._stamps[name]


def filter_thumbnail_name(filter_index: int, rank: int) -> str:
    """The thumbnail of a filter's rank-th top image, relative to the thumbnail folder."""
    return f"{filter_index:04d}/{rank:02d}.jpg"


def filter_key(job: ThumbnailJob, item: FilterImages, overlays: bool) -> str:
    """Key of one filter's thumbnails: its images (names, sizes, times), T_u, drawing."""
    return digest(job.base_key, [[name, job.stamp(name)] for name in item.names], repr(item.threshold), overlays)


def stale_filters(job: ThumbnailJob, items: Sequence[FilterImages], manifest: Manifest, overlays: bool) -> list[FilterImages]:
    """The filters whose thumbnails are missing or were made from something else."""
    stale = []
    for item in items:
        entry = manifest.filters.get(str(item.filter)) or {}
        absent = set(entry.get("missing", []))
        complete = all(
            (job.folder / filter_thumbnail_name(item.filter, r)).is_file()
            for r in range(len(item.names))
            if r not in absent
        )
        if entry.get("key") != filter_key(job, item, overlays) or not complete:
            stale.append(item)
    return stale


def draw_filter_thumbnails(
    job: ThumbnailJob,
    items: Sequence[FilterImages],
    manifest: Manifest,
    skipped: SkipLog,
    *,
    maps: dict[tuple[str, int], torch.Tensor] | None,
    rows: set[str] | dict[str, int] | None,
    chunk: int = 16,
    progress: bool = False,
) -> None:
    """Make the thumbnails of the given filters, ``chunk`` filters at a time.

    With ``maps`` ((image name, filter) -> that filter's (h, w) map on the image) and
    ``rows`` (the image names that have maps) each thumbnail has the filter's region
    drawn in; without, the plain image is shown. Images that cannot be read, or have
    no maps, are counted once in ``skipped``, and the manifest records each filter's
    ranks that have no thumbnail.
    """
    overlays = maps is not None
    bad: set[str] = set()
    with tqdm(total=len(items), desc="report thumbnails", unit="filter", disable=not progress) as bar:
        for start in range(0, len(items), chunk):
            block = items[start : start + chunk]
            pixels, index = _load_block(job, block, skipped, rows if overlays else None, bad)
            pairs = [
                (item.filter, rank, index[name], item.threshold, name)
                for item in block
                for rank, name in enumerate(item.names)
                if name in index
            ]
            if pairs:
                images = pixels[torch.tensor([p[2] for p in pairs])]  # (P, S, S, 3)
                if overlays:
                    thresholds = torch.tensor([p[3] for p in pairs], dtype=torch.float32)
                    images = overlay_regions(images, torch.stack([maps[(p[4], p[0])] for p in pairs]), thresholds)
                out = images.numpy()
                for k, (f, rank, *_rest) in enumerate(pairs):
                    save_jpeg(out[k], job.folder / filter_thumbnail_name(f, rank), job.quality)
            for item in block:
                _remove_extra_ranks(job.folder / f"{item.filter:04d}", len(item.names))
                manifest.filters[str(item.filter)] = {
                    "key": filter_key(job, item, overlays),
                    "missing": [r for r, name in enumerate(item.names) if name not in index],
                }
            manifest.save()  # after each chunk: an interrupted build keeps what it made
            bar.update(len(block))


def example_thumbnail_name(name: str) -> str:
    """The plain thumbnail of an image (a group example), relative to the thumbnail folder."""
    return f"examples/{hashlib.sha256(name.encode()).hexdigest()[:24]}.jpg"


def draw_example_thumbnails(job: ThumbnailJob, names: Sequence[str], manifest: Manifest, skipped: SkipLog) -> set[str]:
    """Make plain thumbnails of the given images (relative to ``job.root``) once.

    Returns the names that have a thumbnail.
    """
    made = set()
    for name in sorted(set(names)):
        target = job.folder / example_thumbnail_name(name)
        key = digest(job.base_key, name, job.stamp(name))
        if manifest.examples.get(name) == key and target.is_file():
            made.add(name)
            continue
        try:
            pixels = load_thumbnail(job.root / name, job.preprocessing, job.size)
        except BadImage as problem:
            skipped.add("unreadable example images", f"{name} ({problem})")
            continue
        save_jpeg(pixels, target, job.quality)
        manifest.examples[name] = key
        made.add(name)
    manifest.save()
    return made


def _load_block(
    job: ThumbnailJob,
    block: Sequence[FilterImages],
    skipped: SkipLog,
    rows: set[str] | dict[str, int] | None,
    bad: set[str],
) -> tuple[torch.Tensor, dict[str, int]]:
    """Each distinct image of the block once: (U, S, S, 3) uint8 and name -> position."""
    names = sorted({name for item in block for name in item.names} - bad)
    arrays, index = [], {}
    for name in names:
        if rows is not None and name not in rows:
            skipped.add("top images without target features (removed or unreadable since 'explain')", name)
            bad.add(name)
            continue
        try:
            arrays.append(load_thumbnail(job.root / name, job.preprocessing, job.size))
        except BadImage as problem:
            skipped.add("unreadable top images", f"{name} ({problem})")
            bad.add(name)
            continue
        index[name] = len(arrays) - 1
    if not arrays:
        return torch.empty(0, job.size, job.size, 3, dtype=torch.uint8), index
    return torch.from_numpy(np.stack(arrays)), index


def _remove_extra_ranks(folder: Path, count: int) -> None:
    """Delete thumbnails of ranks a filter no longer has (a re-explained run with fewer)."""
    if folder.is_dir():
        for path in folder.glob("*.jpg"):
            if path.stem.isdigit() and int(path.stem) >= count:
                path.unlink(missing_ok=True)


def base_key(model_identity: dict, layer: str, *, size: int, quality: int) -> str:
    """Key of what every thumbnail of a report depends on besides its own image and filter."""
    return cache_key(
        {"product": "report-thumbnails", "version": MANIFEST_VERSION, "model": model_identity, "layer": layer,
         "size": size, "quality": quality, "dim": DIM, "outline": OUTLINE}
    )
