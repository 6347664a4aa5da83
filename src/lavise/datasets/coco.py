"""COCO-format instance annotations (polygons, RLE and crowd regions).

Every field is checked when the file is opened: an image or category entry of the wrong
shape refuses the file (a LaviseError naming the entry and what is wrong), since guessing
would pair masks with the wrong image or concept; one bad annotation is skipped and
counted. Polygons are drawn by pycocotools; RLE masks are decoded here, after their
counts were checked (pycocotools' decoder reads garbage strings into uninitialised memory).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from lavise.datasets.base import IMAGE_LOADER, ImageRoot, SkipLog, oriented_masks, printable
from lavise.datasets.masks import rle_mask, rle_problem
from lavise.errors import LaviseError, LaviseWarning
from lavise.storage import content_digest, files_digest

_POLYGON, _RLE, _BOX = 0, 1, 2
_POLYGON_LIMIT = 2.0**24
_NUMBER_TYPES = frozenset({int, float})


class CocoDataset:
    """Images and instance masks from a COCO instances JSON and its image folder.

    All instances of one category in an image are merged into one mask: LaViSE pairs a
    concept with the region it covers, not with each instance. Crowd regions count too.
    Categories of the same name (different ids) are one concept, with a warning.

    Args:
        annotations: path of the instances JSON (e.g. ``instances_val2017.json``).
        images: the folder holding the files named in ``images[].file_name``.
        allow_outside_root: read files named outside ``images`` (``..``, absolute paths)
            instead of refusing the file.
    """

    def __init__(self, annotations: Path, images: Path, *, allow_outside_root: bool = False) -> None:
        self.annotations_path = Path(annotations)
        self.root = Path(images)
        if not self.annotations_path.is_file():
            raise LaviseError(f"COCO annotation file '{self.annotations_path}' does not exist.")
        if not self.root.is_dir():
            raise LaviseError(f"COCO image folder '{self.root}' does not exist.")
        where = f"'{self.annotations_path}'"
        try:
            data = json.loads(self.annotations_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LaviseError(f"{where} is not valid JSON: {error}") from None
        check_top_level(data, where)
        self.skipped = SkipLog()
        self._images = check_images(data["images"], where)
        names, concept_of_category, merged = check_categories(data["categories"], where)
        if merged:
            warnings.warn(merged_names_message(where, merged), LaviseWarning, stacklevel=2)
        self.concepts = names
        self._annotations = index_annotations(data["annotations"], self._images, concept_of_category, self.skipped)

        rule = ImageRoot(self.root, source=f"COCO annotation file {where}", allow_outside=allow_outside_root)
        self._image_ids = []
        for image_id in sorted(self._images):
            info = self._images[image_id]
            if image_id not in self._annotations:
                continue  # images without annotations teach the explainer nothing
            if not rule.admits(info["file_name"], f"image id {image_id}"):
                continue
            if not (self.root / info["file_name"]).is_file():
                self.skipped.add("annotated images whose file is missing", info["file_name"])
                continue
            self._image_ids.append(image_id)
        rule.check()
        if not self._image_ids:
            raise LaviseError(f"No annotated image of {where} exists under '{self.root}'.")

    def __len__(self) -> int:
        return len(self._image_ids)

    def __repr__(self) -> str:
        return (
            f"CocoDataset(annotations='{self.annotations_path}', root='{self.root}', "
            f"images={len(self)}, concepts={len(self.concepts)})"
        )

    def image_path(self, index: int) -> Path:
        return self.root / self._images[self._image_ids[index]]["file_name"]

    def image_concepts(self, index: int) -> list[int]:
        """The concepts annotated in image i, without decoding any mask."""
        return sorted({concept for concept, _, _ in self._annotations[self._image_ids[index]]})

    def recorded_size(self, index: int) -> tuple[int, int] | None:
        """The (W, H) the JSON gives image i, or None when it gives none."""
        info = self._images[self._image_ids[index]]
        return None if info["width"] is None else (info["width"], info["height"])

    @oriented_masks
    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """Concept indices and (m, H, W) uint8 0/1 masks, one per category present.

        ``size`` is the (W, H) of the image file; a file whose size differs from the
        JSON's width and height would misalign every mask, so it is refused (ValueError).
        An image entry without width and height takes the file's.
        """
        info = self._images[self._image_ids[index]]
        size = (int(size[0]), int(size[1]))
        width, height = (info["width"], info["height"]) if info["width"] is not None else size
        if (width, height) != size:
            raise ValueError(f"image is {size[0]}x{size[1]} but the annotations say {width}x{height}")
        merged: dict[int, np.ndarray] = {}
        for concept, kind, shape in self._annotations[self._image_ids[index]]:
            mask = _draw(kind, shape, height, width)
            merged[concept] = np.maximum(merged[concept], mask) if concept in merged else mask
        concepts = sorted(merged)
        if not concepts:
            return [], np.zeros((0, height, width), dtype=np.uint8)
        return concepts, np.stack([merged[c] for c in concepts]).astype(np.uint8)

    def identity(self) -> dict:
        return {
            "kind": "coco",
            "loader": IMAGE_LOADER,
            "annotations": content_digest(self.annotations_path),
            "images": files_digest([self.image_path(i) for i in range(len(self))]),
        }


# --- checking the file, entry by entry -------------------------------------------------


def check_top_level(data: object, where: str) -> None:
    """An object with lists ``images``, ``annotations`` and ``categories``."""
    if not isinstance(data, dict):
        raise LaviseError(
            f"{where} is not a COCO instances file: its top level is {_kind(data)}, expected an object "
            "with images, annotations and categories."
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise LaviseError(f"{where} is not a COCO instances file: no {', '.join(missing)}.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise LaviseError(f"{where}: '{key}' is {_kind(data[key])}, expected a list.")


def check_images(entries: list, where: str) -> dict[int, dict]:
    """Image id -> ``{"file_name", "width", "height"}`` (width and height both None when absent).

    Refuses (LaviseError) an entry that is not an object, an id that is not a whole
    number or is listed twice, a missing or empty file name, a width or height that is
    not a positive whole number or given without the other, and two ids naming one file.
    """
    images: dict[int, dict] = {}
    entry_of: dict[int, int] = {}
    file_of: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = f"images[{i}]"
        if not isinstance(entry, dict):
            raise LaviseError(f"{where}: {name} is {_kind(entry)}, expected an object.")
        image_id = entry.get("id")
        if not _whole(image_id):
            raise LaviseError(f"{where}: {name} {_has('id', entry)}, expected a whole number.")
        name = f"{name} (id {image_id})"
        if image_id in entry_of:
            raise LaviseError(
                f"{where}: image id {image_id} is listed twice (images[{entry_of[image_id]}] and images[{i}]); "
                "each image needs its own id, or annotations would be paired with the wrong file."
            )
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise LaviseError(f"{where}: {name} {_has('file_name', entry)}, expected a file name.")
        key = os.path.normpath(file_name)
        if key in file_of:
            raise LaviseError(
                f"{where}: images with ids {file_of[key]} and {image_id} both name the file {file_name!r}; "
                "one file needs one entry, or each id would hold only part of its annotations."
            )
        width, height = entry.get("width"), entry.get("height")
        if (width is None) != (height is None):
            given, absent = ("width", "height") if height is None else ("height", "width")
            raise LaviseError(f"{where}: {name} has a {given} but no {absent}; give both or neither.")
        for field, value in (("width", width), ("height", height)):
            if value is not None and not (_whole(value) and value > 0):
                raise LaviseError(f"{where}: {name} {_has(field, entry)}, expected a positive whole number.")
        entry_of[image_id] = i
        file_of[key] = image_id
        images[image_id] = {
            "file_name": file_name,
            "width": None if width is None else int(width),
            "height": None if height is None else int(height),
        }
    return images


def check_categories(entries: list, where: str) -> tuple[list[str], dict[int, int], dict[str, list[int]]]:
    """The concept names, category id -> concept, and the names shared by several ids.

    Refuses an entry that is not an object, an id that is not a whole number or is
    listed twice (its annotations would train another concept), and a name that is
    missing, not a string or empty.

    Categories whose names are equal (ignoring case and spacing) become one concept,
    named as the lowest id spells it, and are returned for a warning. They are merged
    rather than refused: such files are common (datasets merged from several sources),
    and one name has one word vector, so as two concepts they could not be told apart
    and the explainer would be trained to find one vector both present and absent.
    """
    by_id: dict[int, str] = {}
    entry_of: dict[int, int] = {}
    for i, entry in enumerate(entries):
        name = f"categories[{i}]"
        if not isinstance(entry, dict):
            raise LaviseError(f"{where}: {name} is {_kind(entry)}, expected an object.")
        category_id = entry.get("id")
        if not _whole(category_id):
            raise LaviseError(f"{where}: {name} {_has('id', entry)}, expected a whole number.")
        if category_id in entry_of:
            raise LaviseError(
                f"{where}: category id {category_id} is listed twice (categories[{entry_of[category_id]}] "
                f"and categories[{i}]); each category needs its own id."
            )
        label = entry.get("name")
        if not isinstance(label, str) or not label.strip():
            raise LaviseError(f"{where}: {name} (id {category_id}) {_has('name', entry)}, expected a non-empty name.")
        entry_of[category_id] = i
        by_id[category_id] = " ".join(label.split())
    concept_of_name: dict[str, int] = {}
    names: list[str] = []
    ids_of: dict[str, list[int]] = {}
    concept_of_category = {}
    for category_id in sorted(by_id):
        key = by_id[category_id].casefold()
        if key not in concept_of_name:
            concept_of_name[key] = len(names)
            names.append(by_id[category_id])
        concept_of_category[category_id] = concept_of_name[key]
        ids_of.setdefault(names[concept_of_name[key]], []).append(category_id)
    return names, concept_of_category, {n: ids for n, ids in ids_of.items() if len(ids) > 1}


def merged_names_message(where: str, merged: dict[str, list[int]]) -> str:
    shown = ", ".join(f"'{name}' (ids {', '.join(str(i) for i in ids)})" for name, ids in list(merged.items())[:5])
    count = sum(len(ids) for ids in merged.values())
    return (
        f"{where}: {count} categories share {len(merged)} name{'s' if len(merged) > 1 else ''}, each merged "
        f"into one concept: {shown}{' ...' if len(merged) > 5 else ''}."
    )


def index_annotations(
    entries: list, images: dict[int, dict], concept_of_category: dict[int, int], skipped: SkipLog
) -> dict[int, list[tuple[int, int, object]]]:
    """Image id -> its (concept, kind, shape) annotations; unusable ones are counted in ``skipped``.

    ``kind`` is polygon (shape: the list of polygons), RLE (shape: the counts) or box
    (shape: ``[x, y, w, h]``, for annotations without a segmentation).
    """
    index: dict[int, list[tuple[int, int, object]]] = {}
    for i, ann in enumerate(entries):
        if not isinstance(ann, dict):
            skipped.add("annotations that are not objects", f"annotations[{i}]")
            continue
        name = f"id={ann['id']}" if "id" in ann else f"annotations[{i}]"
        reason, kind, shape = _annotation_problem(ann, images, concept_of_category)
        if reason is not None:
            skipped.add(reason, shape if isinstance(shape, str) else name)
            continue
        index.setdefault(ann["image_id"], []).append((concept_of_category[ann["category_id"]], kind, shape))
    return index


def _annotation_problem(ann: dict, images: dict[int, dict], concept_of_category: dict[int, int]):
    """(reason, None, example) for an unusable annotation, else (None, kind, shape)."""
    if "category_id" not in ann:
        return "annotations without a category_id", None, None
    if "image_id" not in ann:
        return "annotations without an image_id", None, None
    category_id, image_id = ann["category_id"], ann["image_id"]
    if not _whole(category_id) or category_id not in concept_of_category:
        return "annotations of unknown categories", None, f"category_id={category_id!r}"
    if not _whole(image_id) or image_id not in images:
        return "annotations of unknown images", None, f"image_id={image_id!r}"
    segmentation = ann.get("segmentation")
    if segmentation is None or segmentation == [] or segmentation == {}:
        box = ann.get("bbox")
        if box is None or box == []:
            return "annotations without a mask or box", None, None
        if not _valid_box(box):
            return "annotations with a malformed box (not four finite numbers x, y, w, h with w, h > 0)", None, None
        return None, _BOX, [float(v) for v in box]
    if isinstance(segmentation, list):
        if not _valid_polygons(segmentation):
            return "annotations with a malformed segmentation", None, None
        return None, _POLYGON, segmentation
    if not isinstance(segmentation, dict):
        return "annotations with a malformed segmentation", None, None
    size = segmentation.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(v) and v > 0 for v in size)):
        return "annotations with a malformed segmentation", None, None
    info = images[image_id]
    if info["width"] is not None and list(size) != [info["height"], info["width"]]:
        return "annotations whose RLE size differs from their image's height and width", None, None
    if rle_problem(segmentation.get("counts"), int(size[0]), int(size[1])) is not None:
        return "annotations with a malformed segmentation", None, None
    return None, _RLE, (segmentation["counts"], int(size[0]), int(size[1]))


def _draw(kind: int, shape, height: int, width: int) -> np.ndarray:
    """One annotation's (H, W) uint8 0/1 mask."""
    if kind == _BOX:
        return _box_mask(shape, width, height)
    if kind == _RLE:
        counts, rle_height, rle_width = shape
        if (rle_height, rle_width) != (height, width):  # checked here when the JSON gave no size
            raise ValueError(f"a mask (RLE) is {rle_height}x{rle_width} but the image is {height}x{width}")
        return rle_mask(counts, height, width)
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects(shape, height, width))
    return (mask_utils.decode(rle) > 0).astype(np.uint8)


def _valid_polygons(segmentation: list) -> bool:
    """Lists of at least 3 (x, y) points, every coordinate a finite number below 2^24 in size
    (pycocotools turns them into C ints: larger ones would overflow)."""
    return all(
        isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
        # inline, as COCO has tens of millions of coordinates: NaN fails the comparison, bool its type
        and all(type(v) in _NUMBER_TYPES and -_POLYGON_LIMIT < v < _POLYGON_LIMIT for v in polygon)
        for polygon in segmentation
    )


def _valid_box(box: object) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box) and box[2] > 0 and box[3] > 0


def _number(value: object) -> bool:
    """A finite number (a JSON integer of any size, or a float that is not NaN or infinite)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _whole(value: object) -> bool:
    """A whole number (``640`` or ``640.0``; not ``True``, ``"640"`` or ``6.5``)."""
    return _number(value) and (isinstance(value, int) or value.is_integer())


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _has(field: str, entry: dict) -> str:
    """'has no NAME' or 'has NAME VALUE (a KIND)', for a message."""
    if field not in entry:
        return f"has no '{field}'"
    value = entry[field]
    shown = printable(json.dumps(value))
    return f"has '{field}' {shown if len(shown) <= 40 else shown[:37] + '...'} ({_kind(value)})"


def _box_mask(bbox: list[float], width: int, height: int) -> np.ndarray:
    """A filled (H, W) mask of an [x, y, w, h] box, clipped to the image."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = int(min(max(math.floor(x), 0), width)), int(min(max(math.floor(y), 0), height))
    x1 = int(max(min(math.ceil(x + w) if math.isfinite(x + w) else width, width), 0))
    y1 = int(max(min(math.ceil(y + h) if math.isfinite(y + h) else height, height), 0))
    mask[y0:y1, x0:x1] = 1
    return mask
