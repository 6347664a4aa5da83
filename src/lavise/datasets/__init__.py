"""Dataset readers: reference data (images with concept masks), target images, and groups of images.

One module per format over one small protocol (:class:`ReferenceDataset`: ``concepts``,
``image_path(i)``, ``masks(i, size)``, ``identity()``); :func:`open_reference` picks the
reader from a path. Target images are :class:`ImageFiles`; groups of them, for
``compare-groups``, come from :func:`read_groups`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from lavise.datasets.base import BadImage, ImageFiles, ReferenceDataset, SkipLog, load_rgb
from lavise.datasets.broden import BrodenDataset
from lavise.datasets.coco import CocoDataset
from lavise.datasets.folder import FolderDataset
from lavise.datasets.groups import GroupImages, read_groups
from lavise.datasets.manifest import MANIFEST_SUFFIXES, ManifestDataset
from lavise.datasets.visual_genome import VisualGenomeDataset
from lavise.errors import LaviseError, LaviseWarning
from lavise.settings import REFERENCE_FORMATS, ReferenceSettings

__all__ = [
    "REFERENCE_FORMATS",
    "BadImage",
    "BrodenDataset",
    "CocoDataset",
    "FolderDataset",
    "GroupImages",
    "ImageFiles",
    "LaviseWarning",
    "ManifestDataset",
    "ReferenceDataset",
    "ReferenceSettings",
    "SkipLog",
    "VisualGenomeDataset",
    "guess_format",
    "load_rgb",
    "open_reference",
    "read_groups",
]

# Which settings each format reads; any other setting changed from its default is refused.
_EVERY_FORMAT = ("allow_outside_root",)  # the one path rule (datasets.base.ImageRoot)
_FORMAT_SETTINGS = {
    "coco": _EVERY_FORMAT,
    "visual_genome": ("min_images", *_EVERY_FORMAT),
    "broden": ("categories", "split", *_EVERY_FORMAT),
    "folder": ("class_names", *_EVERY_FORMAT),
    "manifest": _EVERY_FORMAT,
}


def guess_format(path: Path) -> str:
    """The reference format of ``path``, from names alone (no file is parsed).

    - a folder with ``index.csv`` and ``label.csv``, or an ``index.csv``: broden;
    - a folder with ``objects.json`` and ``image_data.json``, or an ``objects.json``: visual_genome;
    - a ``.csv``, ``.jsonl`` or ``.ndjson`` file: manifest;
    - any other ``.json`` file: coco;
    - any other folder: folder (one sub-folder per class).

    Example:
        >>> guess_format(Path("annotations/instances_val2017.json")), guess_format(Path("list.jsonl"))
        ('coco', 'manifest')
    """
    path = Path(path)
    if path.is_dir():
        broden = (path / "index.csv").is_file() and (path / "label.csv").is_file()
        genome = (path / "objects.json").is_file() and (path / "image_data.json").is_file()
        if broden and genome:
            raise LaviseError(
                f"'{path}' holds both Broden (index.csv, label.csv) and Visual Genome (objects.json, "
                "image_data.json) files; pass the format (--reference-format broden or visual_genome)."
            )
        return "broden" if broden else "visual_genome" if genome else "folder"
    name = path.name.lower()
    if name == "index.csv" and (path.parent / "label.csv").is_file():
        return "broden"
    if name == "objects.json" and (path.parent / "image_data.json").is_file():
        return "visual_genome"
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if path.suffix.lower() == ".json":
        return "coco"
    if not path.exists():
        raise LaviseError(f"Reference '{path}' does not exist.")
    raise LaviseError(
        f"Cannot tell the format of reference '{path}'; pass it (--reference-format "
        f"{' | '.join(REFERENCE_FORMATS)})."
    )


def open_reference(
    path: Path,
    *,
    images: Path | None = None,
    format: str | None = None,
    settings: ReferenceSettings = ReferenceSettings(),
    cache_dir: Path | None = None,
) -> ReferenceDataset:
    """Open a reference dataset in any supported format (see docs/datasets.md).

    Args:
        path: a COCO instances JSON; a Visual Genome folder (or its ``objects.json``); a
            Broden folder (or its ``index.csv``); a folder of class folders; or a
            manifest (``.csv`` / ``.jsonl``).
        images: the image folder, where the format keeps images apart: COCO (default:
            ``images`` beside the JSON), Visual Genome (the folder holding ``VG_100K/``;
            default: the dataset folder), manifest (default: the manifest's folder).
        format: one of ``REFERENCE_FORMATS``; guessed from ``path`` when not given.
        settings: the format-specific options (Visual Genome's image threshold, Broden's
            categories and split, the folder format's class names), and, for every
            format, whether image paths may lead outside the image folder.
        cache_dir: where Visual Genome's parsed index is cached (default: the lavise cache).
    """
    path = Path(path)
    format = format or guess_format(path)
    if format not in REFERENCE_FORMATS:
        raise LaviseError(f"Unknown reference format '{format}'; valid: {', '.join(REFERENCE_FORMATS)}.")
    _check_settings(format, settings)
    if format in ("visual_genome", "broden") and path.is_file():
        path = path.parent  # objects.json or index.csv given: the dataset is its folder
    if format == "coco":
        if images is None:
            candidate = path.parent / "images"
            if not candidate.is_dir():
                raise LaviseError(
                    f"COCO reference '{path}' needs its image folder: pass --reference-images "
                    f"(no 'images' folder beside the JSON)."
                )
            images = candidate
        return CocoDataset(path, images, allow_outside_root=settings.allow_outside_root)
    if format in ("broden", "folder") and images is not None:
        raise LaviseError(
            f"--reference-images is not used by the {format} format: its images are inside '{path}'."
        )
    outside = settings.allow_outside_root
    if format == "visual_genome":
        return VisualGenomeDataset(path, images=images, min_images=settings.min_images, cache_dir=cache_dir,
                                   allow_outside_root=outside)
    if format == "broden":
        return BrodenDataset(path, categories=settings.categories, split=settings.split, allow_outside_root=outside)
    if format == "manifest":
        return ManifestDataset(path, images=images, allow_outside_root=outside)
    return FolderDataset(path, class_names=settings.class_names, allow_outside_root=outside)


def _check_settings(format: str, settings: ReferenceSettings) -> None:
    """Refuse an option the chosen format would silently ignore."""
    defaults = ReferenceSettings()
    ignored = [
        f.name for f in fields(ReferenceSettings)
        if f.name not in _FORMAT_SETTINGS[format] and getattr(settings, f.name) != getattr(defaults, f.name)
    ]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        users = sorted(fmt for fmt, names in _FORMAT_SETTINGS.items() for name in ignored if name in names)
        verb = "does" if len(ignored) == 1 else "do"
        raise LaviseError(f"{flags} {verb} not apply to the {format} format (only to: {', '.join(users)}).")
