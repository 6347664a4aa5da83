"""What every dataset reader shares: loading images safely, counting what was skipped, target images.

A reference dataset pairs images with concepts and masks; a target dataset is just
images. Readers stream: they keep an index of file names and annotations, and load one
image (and its masks) at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from lavise.errors import LaviseError, LaviseWarning
from lavise.storage import files_digest

# What load_rgb does to a file, in every dataset's identity: features cached by an older
# loader (before EXIF orientation was applied) are rebuilt, not reused.
IMAGE_LOADER = "rgb, exif-oriented"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


EXIF_ORIENTATION = 0x0112
# The numpy equivalent of Pillow's transpose for each EXIF orientation (2-8), on (..., H, W).
_ORIENT = {
    2: lambda a: a[..., :, ::-1],  # mirrored left-right
    3: lambda a: a[..., ::-1, ::-1],  # upside down
    4: lambda a: a[..., ::-1, :],  # mirrored top-bottom
    5: lambda a: np.swapaxes(a, -1, -2),  # Image.Transpose.TRANSPOSE
    6: lambda a: np.rot90(a, -1, axes=(-2, -1)),  # Image.Transpose.ROTATE_270
    7: lambda a: np.rot90(np.swapaxes(a, -1, -2), 2, axes=(-2, -1)),  # Image.Transpose.TRANSVERSE
    8: lambda a: np.rot90(a, 1, axes=(-2, -1)),  # Image.Transpose.ROTATE_90
}
_PIL_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, whatever its mode (grey, CMYK, palette, RGBA, 16-bit), upright.

    The EXIF orientation is applied (as a photo viewer, and torchvision's
    ``decode_image(apply_exif_orientation=True)``, show it): a phone photo stored on its
    side is seen upright by the model. Reference masks are drawn in the stored pixels'
    coordinates and turned the same way (:func:`oriented_masks`), so they stay aligned.

    Raises BadImage for missing, unreadable, truncated files and decompression bombs.
    """
    with _as_bad_image(), open_image(path) as image:
        orientation = _orientation(image)
        image.load()  # decode now, so truncation is caught here
        return _upright(_as_rgb(image), orientation)


def image_size(path: Path) -> tuple[int, int]:
    """The (W, H) of an image as :func:`load_rgb` returns it (orientation applied), from its header.

    Raises BadImage as load_rgb does, except that nothing is decoded (truncation shows later).
    """
    with _as_bad_image(), open_image(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) >= 5 else (width, height)


@contextlib.contextmanager
def _as_bad_image() -> Iterator[None]:
    """Pillow's and the file system's errors, as a BadImage saying why."""
    try:
        yield
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"unreadable ({error})") from None


def image_orientation(path: Path) -> int:
    """The EXIF orientation (1-8) of an image file, 1 when it has none or cannot be read."""
    try:
        with open_image(path) as image:
            return _orientation(image)
    except (BadImage, OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return 1


def orient_masks(masks: np.ndarray, orientation: int) -> np.ndarray:
    """(..., H, W) masks in stored pixel coordinates -> the same turned as EXIF ``orientation`` says.

    Example:
        >>> orient_masks(np.array([[1, 2, 3], [4, 5, 6]]), 6).tolist()  # a quarter turn clockwise
        [[4, 1], [5, 2], [6, 3]]
    """
    turn = _ORIENT.get(int(orientation))
    return masks if turn is None else np.ascontiguousarray(turn(masks))


def oriented_masks(masks):
    """Decorate a reader's ``masks(index, size)``: ``size`` is the image as :func:`load_rgb`
    gives it (orientation applied), and the masks come back in that frame.

    Annotations (COCO, Visual Genome, Broden, manifest boxes and mask files) are drawn
    in the stored pixels' coordinates, as pycocotools and every annotation tool of the
    datasets read the file: the reader draws them at the stored size, then they are
    turned like the image, so a photo with an Orientation tag is seen upright with its
    masks in place. Tools that show the photo upright while annotating record its upright
    size: a reader with ``recorded_size(index)`` (COCO's width and height) whose size is
    the upright one, for a quarter turn that swaps width and height, gets its masks drawn
    upright as they are.
    """

    @functools.wraps(masks)
    def wrapper(self, index: int, size: tuple[int, int]):
        orientation = image_orientation(self.image_path(index))
        if orientation == 1:
            return masks(self, index, size)
        recorded = getattr(self, "recorded_size", None)
        if orientation >= 5 and size[0] != size[1] and recorded is not None and recorded(index) == tuple(size):
            return masks(self, index, size)  # annotated on the upright image, as its size says
        stored = (int(size[1]), int(size[0])) if orientation >= 5 else (int(size[0]), int(size[1]))
        concepts, drawn = masks(self, index, stored)
        return concepts, orient_masks(drawn, orientation)

    return wrapper


def open_image(path: Path) -> Image.Image:
    """``Image.open``, with a decompression bomb (Pillow refuses it) a BadImage, not a crash."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise BadImage(
            f"over Pillow's decompression-bomb limit ({error} Raise PIL.Image.MAX_IMAGE_PIXELS to read it.)"
        ) from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation known when the file is opened, before decoding: 1 (upright) to 8.

    A PNG's ``getexif`` decodes the whole image to look for an eXIf chunk placed after
    the pixels; only one before them (where writers put it) is read, so that the size of
    an image is known from its header alone and agrees with what load_rgb gives.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: Pillow raises many kinds; the pixels may be fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1.0)
        image = Image.fromarray(((array - array.min()) * 255 / span).astype(np.uint8))
    return image.convert("RGB")


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    method = _PIL_ORIENT.get(orientation)
    return image if method is None else image.transpose(method)


def printable(text: object) -> str:
    """Text safe to print and to write as UTF-8: a file name's undecodable bytes become ``\\xff``.

    Example:
        >>> printable(os.fsdecode(b"bad\\xff.png"))
        'bad\\\\xff.png'
    """
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class SkipLog:
    """Counts skipped items by reason, keeping a few examples of each."""

    examples_kept: int = 5
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, item: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.examples_kept:
            self.examples[reason].append(printable(item))

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

    Symbolic links that lead nowhere (dangling, or a loop) are counted in a warning.

    Example:
        >>> ImageFiles(Path("/nonexistent"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Target folder '/nonexistent' does not exist.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        require_folder(self.root, "Target folder")
        self.skipped = SkipLog()
        self.paths = sorted(image_files(self.root, self.skipped, self.root))
        if self.skipped:
            self.skipped.warn(f"target {printable(self.root)}")
        if not self.paths:
            raise LaviseError(
                f"Target folder '{printable(self.root)}' holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles(root='{printable(self.root)}', images={len(self)})"

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def identity(self) -> dict:
        return image_files_identity(self.root, self.paths)


BROKEN_LINKS = "broken symbolic links"


def require_folder(path: Path, what: str) -> None:
    """Refuse a folder argument that is missing or is a file, saying which."""
    if path.is_dir():
        return
    if path.exists() or path.is_symlink():
        kind = "is a file, not a folder" if path.is_file() else (
            "is a broken symbolic link" if path.is_symlink() and not path.exists() else "is not a folder"
        )
        raise LaviseError(f"{what} '{printable(path)}' {kind}.")
    raise LaviseError(f"{what} '{printable(path)}' does not exist.")


def image_files(folder: Path, skipped: SkipLog, root: Path) -> list[Path]:
    """The image files under ``folder``, recursively; broken symbolic links are counted in
    ``skipped`` (named relative to ``root``) instead of vanishing."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
        elif path.is_symlink() and not path.exists():  # dangling, or a loop
            skipped.add(BROKEN_LINKS, relative_name(path, root))
    return found


def resolve_inside(root: Path, name: str | Path) -> Path | None:
    """``root / name`` with symbolic links resolved, when it lies inside ``root`` (resolved); else None.

    The one path rule of every reader: an annotation file or list names images inside
    its dataset's image folder. ``..`` parts, absolute paths elsewhere and links that
    lead out all fail it. Only names are resolved; no file is opened, and the answer
    does not say whether a file exists.

    Example:
        >>> resolve_inside(Path("/data"), "a/../b.jpg"), resolve_inside(Path("/data"), "../etc/passwd")
        (PosixPath('/data/b.jpg'), None)
    """
    resolved = _inside(os.path.realpath(root), name)
    return None if resolved is None else Path(resolved)


def _inside(base: str, name: str | Path) -> str | None:
    """The resolved ``base / name`` when inside ``base`` (itself resolved), else None."""
    resolved = os.path.realpath(os.path.join(base, os.fspath(name)))
    if resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep):
        return resolved
    return None


class ImageRoot:
    """The folder a reader's image paths must lie in, and the paths seen outside it.

    A reader asks :meth:`admits` before it looks at a file; a path outside the root is
    recorded and never looked at (so no message says whether it exists); :meth:`check`
    then refuses the dataset, naming the count and examples, unless the user allowed
    paths outside the root (``allow_outside_root``).

    Example:
        >>> rule = ImageRoot(Path("/data"), source="'list.csv'")
        >>> rule.admits("a.jpg", "line 2"), rule.admits("/etc/passwd", "line 3")
        (True, False)
        >>> rule.check()
        Traceback (most recent call last):
        lavise.errors.LaviseError: 'list.csv' names 1 image path outside the image folder '/data' (e.g. /etc/passwd (line 3)); paths must lie inside it (symbolic links resolved). Move the files there, or pass --allow-outside-root if the paths are meant. No image was read.
    """

    def __init__(self, root: Path, *, source: str, allow_outside: bool = False) -> None:
        self.root = Path(root)
        self.source = source
        self.allow_outside = bool(allow_outside)
        self.outside = SkipLog()
        self._base = os.path.realpath(self.root)

    def admits(self, name: str | Path, where: str = "") -> bool:
        """Whether the reader may look at ``root / name``."""
        if _inside(self._base, name) is not None:
            return True
        self.outside.add("outside", f"{name} ({where})" if where else str(name))
        return self.allow_outside

    def check(self) -> None:
        """Refuse the dataset when a path lay outside the root, unless that was allowed."""
        count = self.outside.counts.get("outside", 0)
        if count and not self.allow_outside:
            raise LaviseError(
                f"{self.source} names {count} image path{'s' if count > 1 else ''} outside the image folder "
                f"'{printable(self.root)}' (e.g. {', '.join(self.outside.examples['outside'])}); paths must lie "
                "inside it (symbolic links resolved). Move the files there, or pass --allow-outside-root "
                "if the paths are meant. No image was read."
            )


def image_files_identity(root: Path, paths: list[Path]) -> dict:
    """The cache identity of a set of target images: their folder and every file's name,
    size and modification time. Any target dataset over the same files has this identity,
    so the features cached for one are reused by the other."""
    return {"kind": "images", "loader": IMAGE_LOADER, "root": str(Path(root).resolve()), "files": files_digest(paths)}


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
