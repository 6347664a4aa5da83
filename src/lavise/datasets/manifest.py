"""A manifest of (image, concept[, box | mask]) rows in CSV or JSON Lines: any other dataset.

CSV: a header with ``image`` and ``concept`` and optionally ``box`` (``"x y w h"`` or
``"x,y,w,h"``), ``mask`` (a PNG whose non-zero pixels are the region), and ``width`` and
``height`` of the image. JSON Lines: one object per line with the same keys, ``box`` a
list ``[x, y, w, h]``. Paths are relative
to ``images`` (default: the manifest's folder). A row with neither box nor mask labels
the whole image. Several rows of one concept in one image are merged into one mask.

The sizes of images with boxes come from ``width`` and ``height`` when given, else from
the file headers (no pixel is decoded), so boxes outside their image are found, and
counted, when the manifest is opened; a file whose size is not the one declared is
refused when its masks are drawn.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from array import array
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from lavise.datasets.base import IMAGE_LOADER, BadImage, ImageRoot, SkipLog, open_image, oriented_masks
from lavise.datasets.masks import (
    BOX_CLIPPED,
    BOX_EMPTY,
    BOX_MALFORMED,
    BOX_OUTSIDE,
    box_masks,
    clip_boxes,
    merge_by_concept,
    resize_nearest,
    same_aspect,
)
from lavise.errors import LaviseError
from lavise.storage import content_digest, files_digest

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
BAD_SIZE = (0, 0)  # a width and height given, but not both positive whole numbers
_NUMBERS = re.compile(r"[\s,;]+")
_BOX_REASONS = {
    BOX_CLIPPED: "box parts outside their image (the boxes were clipped)",
    BOX_EMPTY: "boxes of zero area",
    BOX_OUTSIDE: "boxes entirely outside their image",
    BOX_MALFORMED: "boxes with a coordinate that is not a number",
}
_WHOLE, _BOX, _MASK = 0, 1, 2


class ManifestDataset:
    """Images and concept regions listed row by row in a CSV or JSON Lines file.

    Args:
        manifest: a ``.csv`` or ``.jsonl`` file.
        images: the folder relative image paths start from (default: the manifest's).
        allow_outside_root: read image and mask paths that lead outside ``images``
            instead of refusing the manifest.

    Example:
        >>> ManifestDataset(Path("/nonexistent.csv"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Manifest '/nonexistent.csv' does not exist.
    """

    def __init__(self, manifest: Path, *, images: Path | None = None, allow_outside_root: bool = False) -> None:
        self.manifest_path = Path(manifest)
        if not self.manifest_path.is_file():
            raise LaviseError(f"Manifest '{self.manifest_path}' does not exist.")
        suffix = self.manifest_path.suffix.lower()
        if suffix not in MANIFEST_SUFFIXES:
            raise LaviseError(
                f"Manifest '{self.manifest_path}' is neither CSV nor JSON Lines "
                f"(its name must end in {', '.join(MANIFEST_SUFFIXES)})."
            )
        self.root = Path(images) if images is not None else self.manifest_path.parent
        if not self.root.is_dir():
            raise LaviseError(f"Manifest image folder '{self.root}' does not exist.")
        self.skipped = SkipLog()
        rows = _csv_rows(self.manifest_path) if suffix == ".csv" else _jsonl_rows(self.manifest_path, self.skipped)
        self._rule = ImageRoot(self.root, source=f"Manifest '{self.manifest_path}'", allow_outside=allow_outside_root)
        self._index(rows)

    def _index(self, rows) -> None:
        """Validate the rows and keep them as arrays grouped by image."""
        image_of: dict[str, int] = {}
        images: list[str] = []
        concept_of: dict[str, int] = {}
        masks: list[str] = []
        mask_of: dict[str, int] = {}
        # One entry per row, in compact arrays: a manifest may hold millions of rows.
        row_line, row_image, row_concept, row_kind, row_mask = (array("q") for _ in range(5))
        row_box = array("d")
        missing_images: set[str] = set()
        declared: dict[int, tuple[int, int]] = {}  # image -> (W, H) given by the manifest
        for line, image, concept, box, mask, size in rows:
            where = f"line {line}"
            image = os.path.normpath(image.strip()) if isinstance(image, str) and image.strip() else ""
            concept = " ".join(concept.split()) if isinstance(concept, str) else ""
            if not image or not concept:
                self.skipped.add("rows without an image or a concept", where)
                continue
            if size == BAD_SIZE:  # the row is kept: its image's size is read from the file
                self.skipped.add("declared sizes that are not a positive whole width and height (the file's was used)", where)
                size = None
            if box is not None and mask is not None:
                self.skipped.add("rows with both a box and a mask", where)
                continue
            parsed = _parse_box(box) if box is not None else None
            if box is not None and parsed is None:
                self.skipped.add("rows whose box is not four numbers x, y, w, h", where)
                continue
            if mask is not None and not isinstance(mask, str):
                self.skipped.add("rows whose mask is not a file name", where)
                continue
            mask = os.path.normpath(mask.strip()) if isinstance(mask, str) and mask.strip() else None
            if not self._rule.admits(image, where) or (mask is not None and not self._rule.admits(mask, where)):
                continue  # refused below, unless allowed; such a file is never looked at
            if image not in image_of:
                if image in missing_images or not (self.root / image).is_file():
                    missing_images.add(image)
                    self.skipped.add("rows whose image file is missing", where)
                    continue
                image_of[image] = len(images)
                if size is not None:
                    declared[len(images)] = size
                images.append(image)
            if mask is not None and mask not in mask_of:
                if not (self.root / mask).is_file():
                    self.skipped.add("rows whose mask file is missing", where)
                    continue
                mask_of[mask] = len(masks)
                masks.append(mask)
            row_line.append(line)
            row_image.append(image_of[image])
            row_concept.append(concept_of.setdefault(concept, len(concept_of)))
            row_kind.append(_WHOLE if parsed is None and mask is None else (_BOX if parsed is not None else _MASK))
            row_mask.append(mask_of[mask] if mask is not None else -1)
            row_box.extend(parsed if parsed is not None else (0.0, 0.0, 0.0, 0.0))
        self._rule.check()
        if not row_image:
            raise LaviseError(
                f"Manifest '{self.manifest_path}' has no usable row"
                + (f": {'; '.join(self.skipped.lines())}" if self.skipped else ".")
            )
        columns = [np.frombuffer(a, dtype=np.int64) for a in (row_image, row_concept, row_kind, row_mask)]
        boxes_all = np.frombuffer(row_box, dtype=np.float64).reshape(-1, 4)
        first = first_occurrences(np.column_stack([*columns, boxes_all.view(np.int64)]))  # (R,) bool
        lines = np.frombuffer(row_line, dtype=np.int64)
        for line in lines[~first][: self.skipped.examples_kept]:
            self.skipped.examples["rows listed twice (first kept)"].append(f"line {line}")
        if (~first).any():
            self.skipped.counts["rows listed twice (first kept)"] += int((~first).sum())
        row_image, row_concept, row_kind, row_mask = (c[first] for c in columns)
        row_box = boxes_all[first]

        image_rows = row_image
        kinds = row_kind.astype(np.int8)
        corners = np.zeros((len(row_box), 4), dtype=np.int32)
        sizes = np.zeros((len(images), 2), dtype=np.int64)  # (W, H) of images with boxes; 0: not read
        boxed = kinds == _BOX
        if boxed.any():
            for i in np.unique(image_rows[boxed]):
                sizes[i] = declared.get(int(i)) or _image_size(self.root / images[i])
            known = boxed & (sizes[image_rows, 0] > 0)  # unreadable files are counted when loaded
            corners[known], status = clip_boxes(row_box[known], sizes[image_rows[known]])
            keep = np.ones(len(kinds), dtype=bool)
            for code, reason in _BOX_REASONS.items():
                bad = np.flatnonzero(known)[status == code]
                for b in bad[: self.skipped.examples_kept]:
                    self.skipped.examples[reason].append(f"{images[image_rows[b]]}: {row_box[b].tolist()}")
                if len(bad):
                    self.skipped.counts[reason] += len(bad)
                if code != BOX_CLIPPED:
                    keep[bad] = False
        else:
            keep = np.ones(len(kinds), dtype=bool)

        # Group by image; concepts numbered in name order.
        names = sorted(concept_of)
        renumber = np.empty(len(names), dtype=np.int64)
        renumber[[concept_of[n] for n in names]] = np.arange(len(names))
        order = np.argsort(image_rows[keep], kind="stable")
        rows_kept = np.flatnonzero(keep)[order]
        self.concepts = names
        self._row_concept = renumber[row_concept[rows_kept]]
        self._row_kind = kinds[rows_kept]
        self._row_mask = row_mask[rows_kept]
        self._corners = corners[rows_kept]
        kept_images = image_rows[rows_kept]
        present = np.unique(kept_images)
        new_index = np.full(len(images), -1, dtype=np.int64)
        new_index[present] = np.arange(len(present))
        self._images = [images[i] for i in present]
        self._sizes = sizes[present]
        self._offsets = np.searchsorted(new_index[kept_images], np.arange(len(present) + 1))
        self._masks = masks
        if not self._images:
            raise LaviseError(f"Manifest '{self.manifest_path}' has no usable row: {'; '.join(self.skipped.lines())}")

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return (
            f"ManifestDataset(manifest='{self.manifest_path}', root='{self.root}', images={len(self)}, "
            f"concepts={len(self.concepts)})"
        )

    def image_path(self, index: int) -> Path:
        return self.root / self._images[index]

    @oriented_masks
    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """Concept indices and (m, H, W) uint8 masks of image i at the file's (W, H).

        Raises ValueError when a box's image changed size since the manifest was opened,
        or when a mask file is unreadable or of another aspect ratio than its image.
        """
        width, height = int(size[0]), int(size[1])
        rows = slice(self._offsets[index], self._offsets[index + 1])
        concepts, kinds = self._row_concept[rows], self._row_kind[rows]
        masks = np.ones((len(concepts), height, width), dtype=np.uint8)
        boxed = np.flatnonzero(kinds == _BOX)
        if len(boxed):
            recorded = (int(self._sizes[index, 0]), int(self._sizes[index, 1]))
            if recorded != (width, height):
                raise ValueError(
                    f"image is {width}x{height} but its manifest width and height (or its file when the "
                    f"manifest was read) gave {recorded[0]}x{recorded[1]}"
                )
            masks[boxed] = box_masks(self._corners[rows][boxed], np.arange(len(boxed)), len(boxed), (width, height))
        for row in np.flatnonzero(kinds == _MASK):
            masks[row] = self._mask_file(int(self._row_mask[rows][row]), (width, height))
        return merge_by_concept(concepts, masks)

    def _mask_file(self, mask: int, size: tuple[int, int]) -> np.ndarray:
        path = self.root / self._masks[mask]
        try:
            with open_image(path) as image:
                pixels = np.asarray(image.convert("L"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, BadImage) as error:
            raise ValueError(f"mask {self._masks[mask]} is unreadable ({error})") from None
        mask_size = (pixels.shape[1], pixels.shape[0])
        if mask_size != size and not same_aspect(size, mask_size):
            raise ValueError(f"mask {self._masks[mask]} is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}")
        return resize_nearest((pixels > 0).astype(np.uint8), size)

    def identity(self) -> dict:
        return {
            "kind": "manifest",
            "loader": IMAGE_LOADER,
            "manifest": content_digest(self.manifest_path),
            "root": str(self.root.resolve()),
            "files": files_digest([self.image_path(i) for i in range(len(self))] + [self.root / m for m in self._masks]),
        }


def _csv_rows(path: Path):
    """(line, image, concept, box, mask, declared size) per data row of a CSV manifest."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise LaviseError(f"Manifest '{path}' cannot be read: {error}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in ("image", "concept") if c not in header]
        if missing:
            raise LaviseError(
                f"Manifest '{path}' has no column {', '.join(repr(c) for c in missing)} "
                f"(its header: {','.join(header) or 'empty'}; expected image,concept and optionally box or mask)."
            )
        try:
            for line, row in enumerate(reader, start=2):
                box = (row.get("box") or "").strip() or None
                mask = (row.get("mask") or "").strip() or None
                yield line, row.get("image"), row.get("concept"), box, mask, _parse_size(row.get("width"), row.get("height"))
        except (UnicodeDecodeError, csv.Error) as error:
            raise LaviseError(f"Manifest '{path}' is not a readable CSV file: {error}") from None


def _jsonl_rows(path: Path, skipped: SkipLog):
    """(line, image, concept, box, mask, declared size) per line of a JSON Lines manifest."""
    try:
        handle = open(path, encoding="utf-8-sig")
    except OSError as error:
        raise LaviseError(f"Manifest '{path}' cannot be read: {error}") from None
    with handle:
        try:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    skipped.add("lines that are not valid JSON", f"line {line}")
                    continue
                if not isinstance(row, dict):
                    skipped.add("lines that are not a JSON object", f"line {line}")
                    continue
                box = row.get("box")
                mask = row.get("mask")
                yield (line, row.get("image"), row.get("concept"), box if box not in (None, "", []) else None,
                       mask if mask not in (None, "") else None,
                       _parse_size(row.get("width"), row.get("height")))
        except UnicodeDecodeError as error:
            raise LaviseError(f"Manifest '{path}' is not UTF-8 text: {error}") from None


def first_occurrences(rows: np.ndarray) -> np.ndarray:
    """(R, c) integer rows -> (R,) bool, True where a row has not appeared earlier.

    Example:
        >>> first_occurrences(np.array([[1, 2], [3, 4], [1, 2]])).tolist()
        [True, True, False]
    """
    _, first = np.unique(rows, axis=0, return_index=True)
    keep = np.zeros(len(rows), dtype=bool)
    keep[first] = True
    return keep


def _parse_box(box: object) -> tuple[float, float, float, float] | None:
    """``"x y w h"``, ``"x,y,w,h"`` or ``[x, y, w, h]`` -> four floats, else None."""
    if isinstance(box, str):
        parts = [p for p in _NUMBERS.split(box.strip().strip("[]()")) if p]
    elif isinstance(box, (list, tuple)):
        parts = list(box)
    else:
        return None
    if len(parts) != 4:
        return None
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        return None
    if any(isinstance(p, bool) for p in parts) or not all(math.isfinite(v) for v in values):
        return None
    return values


def _parse_size(width: object, height: object) -> tuple[int, int] | None:
    """A declared (W, H) of whole positive numbers; None when neither is given (the file's
    header is read), ``BAD_SIZE`` when they are given but are not both such numbers.

    Example:
        >>> _parse_size("64", 48.0), _parse_size("", None), _parse_size(64, None), _parse_size("64", "-1")
        ((64, 48), None, (0, 0), (0, 0))
    """
    given = [v for v in (width, height) if v is not None and str(v).strip()]
    if not given:
        return None
    size = []
    for value in (width, height):
        try:
            number = float(str(value).strip()) if not isinstance(value, bool) else math.nan
        except ValueError:
            return BAD_SIZE
        if not (math.isfinite(number) and number.is_integer() and 0 < number < 2**31):  # sizes are int64 below
            return BAD_SIZE
        size.append(int(number))
    return size[0], size[1]


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file header, or (0, 0) when it cannot be read."""
    try:
        with open_image(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, BadImage):
        return (0, 0)
