"""What every dataset reader shares: loading images safely, counting what was skipped, target images.

A reference dataset pairs images with concepts and masks; a target dataset is just
images. Readers stream: they keep an index of file names and annotations, and load one
image (and its masks) at a time.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from lavise.errors import LaviseError, LaviseWarning
from lavise.storage import files_digest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, whatever its mode (grey, CMYK, palette, RGBA, 16-bit).

    Raises BadImage for missing, unreadable or truncated files.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncation is caught here
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(canvas, image).convert("RGB")
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                span = max(float(array.max() - array.min()), 1.0)
                image = Image.fromarray(((array - array.min()) * 255 / span).astype(np.uint8))
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"unreadable ({error})") from None


@dataclass
class SkipLog:
    """Counts skipped items by reason, keeping a few examples of each."""

    examples_kept: int = 5
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, item: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.examples_kept:
            self.examples[reason].append(item)

    def merge(self, other: SkipLog) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            room = self.examples_kept - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:room])

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        return [
            f"skipped {count} {reason} (e.g. {', '.join(self.examples[reason])})"
            for reason, count in sorted(self.counts.items())
        ]

    def warn(self, where: str) -> None:
        for line in self.lines():
            warnings.warn(f"{where}: {line}", LaviseWarning, stacklevel=3)

    def to_dict(self) -> dict:
        return {r: {"count": c, "examples": self.examples[r]} for r, c in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, data: dict) -> SkipLog:
        log = cls()
        for reason, entry in data.items():
            log.counts[reason] = int(entry["count"])
            log.examples[reason] = list(entry["examples"])
        return log


class ReferenceDataset(Protocol):
    """Images with concept masks. Implemented by the COCO and folder readers.

    ``concepts`` lists every concept name; ``masks(i, size)`` returns the concept indices
    and (m, H, W) uint8 masks of image i at the image's own size (W, H).
    """

    root: Path
    concepts: list[str]
    skipped: SkipLog

    def __len__(self) -> int: ...

    def image_path(self, index: int) -> Path: ...

    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]: ...

    def identity(self) -> dict: ...


class ImageFiles:
    """Every image file under a folder, recursively, in sorted order: a target dataset.

    Example:
        >>> ImageFiles(Path("/nonexistent"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Target folder '/nonexistent' does not exist.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LaviseError(f"Target folder '{self.root}' does not exist.")
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            raise LaviseError(
                f"Target folder '{self.root}' holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles(root='{self.root}', images={len(self)})"

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def identity(self) -> dict:
        return image_files_identity(self.root, self.paths)


def image_files_identity(root: Path, paths: list[Path]) -> dict:
    """The cache identity of a set of target images: their folder and every file's name,
    size and modification time. Any target dataset over the same files has this identity,
    so the features cached for one are reused by the other."""
    return {"kind": "images", "root": str(Path(root).resolve()), "files": files_digest(paths)}


def relative_name(path: str | Path, root: Path) -> str:
    """An image's name as outputs record it: relative to ``root`` when inside it, else as given.

    Example:
        >>> relative_name("/data/photos/a/1.jpg", Path("/data/photos")), relative_name("/elsewhere/2.jpg", Path("/data"))
        ('a/1.jpg', '/elsewhere/2.jpg')
    """
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
