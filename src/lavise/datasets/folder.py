"""Classification datasets laid out one sub-folder per class: the mask is the whole image.

ImageNet and Places365 are distributed this way. Folder names are the concepts
("traffic_light" -> "traffic light"), or are mapped to words: through a mapping file
(ImageNet's ``LOC_synset_mapping.txt``, a ``words.txt``, a two-column CSV, or a JSON
object), or, for ImageNet's 1000 WordNet-id folders, through torchvision's class names.

torchvision ships the 1000 class names in index order (``weights.meta["categories"]``)
but no list of WordNet ids. ImageNet's class index is the sorted order of its WordNet
ids (the order torchvision's ``ImageFolder`` and every ImageNet training script use), so
``class_names="imagenet"`` pairs the sorted folder names with the names in order, and
accepts only a folder of exactly 1000 WordNet-id sub-folders, where that order holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lavise.datasets.base import (
    BROKEN_LINKS, IMAGE_EXTENSIONS, IMAGE_LOADER, ImageRoot, SkipLog, oriented_masks, printable, require_folder,
)
from lavise.errors import LaviseError
from lavise.storage import files_digest

IMAGENET = "imagenet"
_WNID = re.compile(r"^n\d{8}$")
_KEY_SEPARATOR = re.compile(r"[\t, ]+")


class FolderDataset:
    """``root/<class folder>/<image>``; each image is labelled with its folder's concept.

    Underscores in names become spaces ("traffic_light" -> "traffic light").

    Args:
        root: the folder of class folders.
        class_names: ``None`` (the folder names), a mapping file (see
            :func:`read_class_names`), or ``"imagenet"`` for torchvision's ImageNet class
            names (the folders must be the 1000 WordNet ids).
        allow_outside_root: use class folders and images that are symbolic links leading
            outside ``root`` instead of refusing the dataset.

    Example:
        >>> FolderDataset(Path("/nonexistent"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Reference folder '/nonexistent' does not exist.
    """

    def __init__(self, root: Path, *, class_names: str | Path | None = None, allow_outside_root: bool = False) -> None:
        self.root = Path(root)
        require_folder(self.root, "Reference folder")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not class_dirs:
            raise LaviseError(
                f"Reference folder '{self.root}' has no sub-folders; a folder dataset holds "
                "one sub-folder of images per class."
            )
        self.skipped = SkipLog()
        self.class_names = None if class_names is None else str(class_names)
        folders = [d.name for d in class_dirs]
        if class_names is None:
            mapping = {f: printable(f) for f in folders}  # a name that is not UTF-8 is shown with \\x escapes
        elif str(class_names) == IMAGENET:
            mapping = imagenet_class_names(folders, self.root)
        else:
            mapping = read_class_names(Path(class_names))
            unmapped = [f for f in folders if f not in mapping]
            if len(unmapped) == len(folders):
                raise LaviseError(
                    f"None of the {len(folders)} class folders of '{self.root}' (e.g. {folders[0]!r}) "
                    f"is named in '{class_names}'."
                )
            for folder in unmapped:
                self.skipped.add("class folders not named in the class-name file", folder)
            class_dirs = [d for d in class_dirs if d.name in mapping]
        self.concepts = distinct_names([mapping[d.name].replace("_", " ") for d in class_dirs], [d.name for d in class_dirs])

        rule = ImageRoot(self.root, source=f"Reference folder '{printable(self.root)}' (through symbolic links)",
                         allow_outside=allow_outside_root)
        files: list[str] = []
        labels: list[int] = []
        for concept, directory in enumerate(class_dirs):
            if directory.is_symlink() and not rule.admits(directory.name, "a class folder"):
                continue
            images = class_images(directory, self.root, self.skipped, rule)
            if not images:
                self.skipped.add("class folders without images", directory.name)
            files.extend(images)
            labels.extend([concept] * len(images))
        rule.check()
        if not files:
            raise LaviseError(f"No image files under '{self.root}'.")
        self._files = files  # relative paths: far smaller than Path objects for 10^6 images
        self._labels = np.array(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"FolderDataset(root='{self.root}', images={len(self)}, concepts={len(self.concepts)})"

    def image_path(self, index: int) -> Path:
        return self.root / self._files[index]

    @oriented_masks
    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        width, height = size
        return [int(self._labels[index])], np.ones((1, height, width), dtype=np.uint8)

    def identity(self) -> dict:
        return {
            "kind": "folder",
            "loader": IMAGE_LOADER,
            "root": str(self.root.resolve()),
            "files": files_digest([self.image_path(i) for i in range(len(self))]),
            "concepts": self.concepts,
        }


def class_images(directory: Path, root: Path, skipped: SkipLog, rule: ImageRoot) -> list[str]:
    """The image files under one class folder, relative to ``root``, sorted.

    Other files, broken symbolic links (dangling or looping) and links that lead outside
    ``root`` (recorded by ``rule``) are not images of the class; the first two are counted.
    """
    images = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.add("files that are not images", relative)
            elif not path.is_symlink() or rule.admits(relative, "a symbolic link"):
                images.append(relative)
        elif path.is_symlink() and not path.exists():
            skipped.add(BROKEN_LINKS, relative)
    return images


def read_class_names(path: Path) -> dict[str, str]:
    """Folder name -> word(s), from a mapping file.

    Accepted: a text file with the folder name, then a tab, comma or spaces, then the
    names, of which the first comma-separated one is kept (ImageNet's
    ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``; ``words.txt``; a CSV
    ``n01440764,tench``); or a JSON object, either ``{"n01440764": "tench"}`` or Keras's
    class index ``{"0": ["n01440764", "tench"]}``. Lines starting with ``#`` are comments.
    """
    path = Path(path)
    if not path.is_file():
        raise LaviseError(f"Class-name file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise LaviseError(f"Class-name file '{path}' cannot be read as text: {error}") from None
    mapping: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LaviseError(f"Class-name file '{path}' is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise LaviseError(f"Class-name file '{path}' must hold a JSON object of folder -> name.")
        for key, value in data.items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                key, value = value  # Keras: {"0": ["n01440764", "tench"]}
            if not isinstance(value, str) or not value.strip():
                raise LaviseError(f"Class-name file '{path}': the name of {key!r} is not a non-empty string.")
            if key in mapping:
                raise LaviseError(f"Class-name file '{path}' names {key!r} twice.")
            mapping[key] = value.split(",")[0].strip()
        return mapping
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = _KEY_SEPARATOR.split(line, maxsplit=1)
        name = parts[1].split(",")[0].strip() if len(parts) == 2 else ""
        if not name:
            raise LaviseError(f"Class-name file '{path}' line {number}: {line!r} has a folder name but no class name.")
        if parts[0] in lines:
            raise LaviseError(f"Class-name file '{path}' names {parts[0]!r} twice (lines {lines[parts[0]]} and {number}).")
        lines[parts[0]] = number
        mapping[parts[0]] = name
    if not mapping:
        raise LaviseError(f"Class-name file '{path}' is empty.")
    return mapping


def imagenet_class_names(folders: list[str], root: Path) -> dict[str, str]:
    """The 1000 sorted WordNet-id folders -> torchvision's ImageNet class names, in order."""
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    wnids = sorted(f for f in folders if _WNID.match(f))
    if len(wnids) != len(names) or len(folders) != len(names):
        raise LaviseError(
            f"class_names='imagenet' needs the {len(names)} ImageNet class folders named by WordNet "
            f"id (n01440764 ...); '{root}' has {len(folders)} sub-folders, {len(wnids)} of them WordNet "
            "ids. torchvision has no WordNet-id list to map a subset, so pass a mapping file "
            "instead (e.g. ImageNet's LOC_synset_mapping.txt)."
        )
    return dict(zip(wnids, names))


def distinct_names(names: list[str], folders: list[str]) -> list[str]:
    """Keep the first of equal names; later ones are tagged with their folder.

    Example:
        >>> distinct_names(["crane", "tench", "crane"], ["n02012849", "n01440764", "n03126707"])
        ['crane', 'tench', 'crane (n03126707)']
    """
    seen: set[str] = set()
    result = []
    for name, folder in zip(names, folders):
        result.append(name if name not in seen else f"{name} ({folder})")
        seen.add(name)
    return result
