"""Dataset readers: reference data (images with concept masks) and target images."""

from __future__ import annotations

from pathlib import Path

from lavise.datasets.base import BadImage, ImageFiles, LaviseWarning, ReferenceDataset, SkipLog, load_rgb
from lavise.datasets.coco import CocoDataset
from lavise.datasets.folder import FolderDataset
from lavise.errors import LaviseError

__all__ = [
    "BadImage",
    "CocoDataset",
    "FolderDataset",
    "ImageFiles",
    "LaviseWarning",
    "ReferenceDataset",
    "SkipLog",
    "load_rgb",
    "open_reference",
]

REFERENCE_FORMATS = ("coco", "folder")


def open_reference(path: Path, *, images: Path | None = None, format: str | None = None) -> ReferenceDataset:
    """Open a reference dataset: a COCO JSON (with its image folder) or a class folder.

    The format is guessed from ``path`` when not given: a ``.json`` file is COCO, a
    folder is a folder-per-class dataset.
    """
    path = Path(path)
    format = format or ("coco" if path.suffix.lower() == ".json" else "folder")
    if format == "coco":
        if images is None:
            candidate = path.parent / "images"
            if not candidate.is_dir():
                raise LaviseError(
                    f"COCO reference '{path}' needs its image folder: pass --reference-images "
                    f"(no 'images' folder beside the JSON)."
                )
            images = candidate
        return CocoDataset(path, images)
    if format == "folder":
        return FolderDataset(path)
    raise LaviseError(f"Unknown reference format '{format}'; valid: {', '.join(REFERENCE_FORMATS)}.")
