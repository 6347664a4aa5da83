"""Visual Genome objects as reference data: boxes merged by synset, rare categories dropped.

The files as distributed: ``objects.json`` (a list of ``{"image_id", "objects": [{"x",
"y", "w", "h", "names" (or "name" in older releases), "synsets"}]}``, hundreds of MB),
``image_data.json`` (``{"image_id", "url", "width", "height"}``) and the images under
``VG_100K/`` and ``VG_100K_2/``.

Preprocessing follows the paper (§4.1): an object's category is its first synset (its
first name when it has none); all boxes of a category in an image become one mask; a
category present in fewer than ``min_images`` images is dropped.

Both JSON files are read with ijson, one image entry at a time, into a compact index of
NumPy arrays (boxes, category of each box, image of each box); the raw structure is never
held. The index is cached as an ``.npz`` under a key of the two files' contents, so a
second run skips the parse. The threshold is applied after loading the index, so changing
it does not parse again.
"""

from __future__ import annotations

import json
import re
from array import array
from pathlib import Path

import numpy as np

from lavise.datasets.base import IMAGE_LOADER, ImageRoot, SkipLog, oriented_masks
from lavise.datasets.masks import (
    BOX_CLIPPED,
    BOX_EMPTY,
    BOX_MALFORMED,
    BOX_OUTSIDE,
    box_masks,
    clip_boxes,
    same_aspect,
    scale_corners,
)
from lavise.errors import LaviseError
from lavise.storage import cache_folder, cached, content_digest, files_digest
from lavise.settings import ReferenceSettings

INDEX_VERSION = 2  # 2: boolean ids and coordinates, and synsets or names that are not lists, are refused
_NUMBER_TYPES = frozenset({int, float})
_CLIP_CHUNK = 1 << 18
_SYNSET = re.compile(r"^(?P<lemma>.+)\.(?P<sense>[a-z]\.\d+)$")
_BOX_REASONS = {
    BOX_CLIPPED: "box parts outside their image (the boxes were clipped)",
    BOX_EMPTY: "boxes of zero area",
    BOX_OUTSIDE: "boxes entirely outside their image",
    BOX_MALFORMED: "boxes with a coordinate that is not a number",
}


class VisualGenomeDataset:
    """Visual Genome images with one box-union mask per category present.

    Args:
        root: the folder holding ``objects.json`` and ``image_data.json``.
        images: the folder holding ``VG_100K/`` and ``VG_100K_2/`` (default: ``root``).
        min_images: drop categories present in fewer images than this (paper: 100).
        cache_dir: where the parsed index is cached (default: the lavise cache).
        allow_outside_root: read image paths (from the urls of ``image_data.json``) that
            lead outside ``images`` instead of refusing the dataset.

    Example:
        >>> VisualGenomeDataset(Path("/nonexistent"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Visual Genome folder '/nonexistent' has no objects.json.
    """

    def __init__(
        self,
        root: Path,
        *,
        images: Path | None = None,
        min_images: int = ReferenceSettings.min_images,
        cache_dir: Path | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.root = Path(root)
        self.objects_path = self.root / "objects.json"
        self.image_data_path = self.root / "image_data.json"
        for path in (self.objects_path, self.image_data_path):
            if not path.is_file():
                raise LaviseError(f"Visual Genome folder '{self.root}' has no {path.name}.")
        self.images_root = Path(images) if images is not None else self.root
        if not self.images_root.is_dir():
            raise LaviseError(f"Visual Genome image folder '{self.images_root}' does not exist.")
        if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
            raise LaviseError(f"min_images must be a whole number >= 1, got {min_images!r}.")
        self.min_images = min_images
        self._rule = ImageRoot(self.images_root, source=f"'{self.image_data_path}'", allow_outside=allow_outside_root)

        self._digests = {"objects": content_digest(self.objects_path), "image_data": content_digest(self.image_data_path)}
        index = load_or_build_index(
            self.objects_path, self.image_data_path, self._digests,
            cache_folder(cache_dir),
        )
        self.skipped = SkipLog.from_dict(index["skipped"])
        self._select(index)

    def _select(self, index: dict[str, np.ndarray]) -> None:
        """Apply the image threshold, name the categories, and keep images whose file exists."""
        keys, box_image, box_category = index["keys"], index["box_image"], index["box_category"]
        counts = images_per_category(box_image, box_category, len(keys))  # (K,)
        kept = counts >= self.min_images
        if not kept.any():
            best = int(np.argmax(counts)) if len(counts) else None
            most = f" (the most frequent, '{keys[best]}', is in {counts[best]})" if best is not None else ""
            raise LaviseError(
                f"No category of '{self.objects_path}' is present in at least {self.min_images} "
                f"images{most}; lower the threshold (--min-images)."
            )
        for k in np.flatnonzero(~kept)[: self.skipped.examples_kept]:
            self.skipped.examples[f"categories in fewer than {self.min_images} images"].append(str(keys[k]))
        if (~kept).any():
            self.skipped.counts[f"categories in fewer than {self.min_images} images"] += int((~kept).sum())

        names = category_names([str(k) for k in keys[kept]], counts[kept])
        order = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)  # by name
        self.concepts = [names[i] for i in order]
        concept_of_category = np.full(len(keys), -1, dtype=np.int64)
        concept_of_category[np.flatnonzero(kept)[order]] = np.arange(len(order))

        box_concept = concept_of_category[box_category]
        keep_box = box_concept >= 0
        box_image, box_concept, corners = box_image[keep_box], box_concept[keep_box], index["corners"][keep_box]
        annotated = np.zeros(len(index["image_ids"]), dtype=bool)
        annotated[box_image] = True
        for row in np.flatnonzero(~annotated)[: self.skipped.examples_kept]:
            self.skipped.examples["images left without a kept category"].append(str(index["files"][row]))
        if (~annotated).any():
            self.skipped.counts["images left without a kept category"] += int((~annotated).sum())

        present = np.zeros(len(index["image_ids"]), dtype=bool)
        # room for a file found in another folder: "VG_100K_2/" + the name, at most 10 more characters
        files = index["files"].astype(f"<U{index['files'].dtype.itemsize // 4 + 10}")
        for row in np.flatnonzero(annotated):
            where = f"image_id={index['image_ids'][row]}"
            if not self._rule.admits(str(files[row]), where):
                continue  # refused below, unless allowed; such a file is never looked at
            found = self._find_file(str(files[row]))
            if found is not None and found != str(files[row]) and not self._rule.admits(found, where):
                continue
            if found is None:
                self.skipped.add("images whose file is missing", str(files[row]))
            else:
                present[row] = True
                files[row] = found
        self._rule.check()
        if not present.any():
            raise LaviseError(
                f"None of the annotated Visual Genome images exists under '{self.images_root}' "
                f"(e.g. {files[np.flatnonzero(annotated)[0]]}); pass the folder holding VG_100K/ "
                "as --reference-images."
            )
        rows = np.flatnonzero(present)
        new_row = np.full(len(present), -1, dtype=np.int64)
        new_row[rows] = np.arange(len(rows))
        keep_box = present[box_image]
        box_image = new_row[box_image[keep_box]]
        self._box_concepts = box_concept[keep_box].astype(np.int32)
        self._corners = corners[keep_box]
        self._offsets = np.searchsorted(box_image, np.arange(len(rows) + 1))  # boxes are grouped by image
        self._sizes = index["sizes"][rows]
        self._image_ids = index["image_ids"][rows]
        self._files = files[rows]

    def _find_file(self, relative: str) -> str | None:
        """The image's path under the image root; files moved between VG_100K folders are found."""
        if (self.images_root / relative).is_file():
            return relative
        name = Path(relative).name
        for folder in ("VG_100K", "VG_100K_2", ""):
            candidate = f"{folder}/{name}" if folder else name
            if candidate != relative and (self.images_root / candidate).is_file():
                return candidate
        return None

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return (
            f"VisualGenomeDataset(root='{self.root}', images={len(self)}, concepts={len(self.concepts)}, "
            f"min_images={self.min_images})"
        )

    def image_path(self, index: int) -> Path:
        return self.images_root / str(self._files[index])

    def image_concepts(self, index: int) -> list[int]:
        """The concepts annotated in image i, without drawing any mask."""
        start, stop = self._offsets[index], self._offsets[index + 1]
        return np.unique(self._box_concepts[start:stop]).tolist()

    @oriented_masks
    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """Concept indices and (m, H, W) uint8 masks, one per category present.

        ``size`` is the (W, H) of the image file. A file rescaled from the size in
        ``image_data.json`` gets its boxes rescaled too; one of another aspect ratio is
        refused (ValueError), since its boxes would not fit.
        """
        start, stop = self._offsets[index], self._offsets[index + 1]
        corners, concepts = self._corners[start:stop], self._box_concepts[start:stop]
        recorded = (int(self._sizes[index, 0]), int(self._sizes[index, 1]))
        size = (int(size[0]), int(size[1]))
        if size != recorded:
            if not same_aspect(size, recorded):
                raise ValueError(
                    f"image is {size[0]}x{size[1]} but image_data.json says {recorded[0]}x{recorded[1]}"
                )
            corners = scale_corners(corners, size, recorded)
        present, groups = np.unique(concepts, return_inverse=True)
        return present.tolist(), box_masks(corners, groups, len(present), size)

    def identity(self) -> dict:
        return {
            "kind": "visual_genome",
            "loader": IMAGE_LOADER,
            **self._digests,
            "min_images": self.min_images,
            "images": files_digest([self.image_path(i) for i in range(len(self))]),
        }


def images_per_category(box_image: np.ndarray, box_category: np.ndarray, count: int) -> np.ndarray:
    """How many distinct images hold each category: (B,), (B,) -> (K,) int64.

    Example:
        >>> images_per_category(np.array([0, 0, 1, 2]), np.array([1, 1, 1, 0]), 3).tolist()
        [1, 2, 0]
    """
    pairs = np.unique(box_image.astype(np.int64) * max(count, 1) + box_category)
    return np.bincount(pairs % max(count, 1), minlength=count)


def category_names(keys: list[str], counts: np.ndarray) -> list[str]:
    """Readable, distinct names: a synset's lemma ('hot_dog.n.01' -> 'hot dog').

    When two categories would share a name, the one in the most images keeps it and the
    others get their sense ('bank (n.09)') or, for a category without a synset, '(no
    synset)'. The tag does not tokenise to a known word, so the word vector of a tagged
    name is still its lemma's.

    Example:
        >>> category_names(["bank.n.01", "bank.n.09", "dog.n.01", "bank"], np.array([5, 9, 3, 1]))
        ['bank (n.01)', 'bank', 'dog', 'bank (no synset)']
    """
    plain, tags = [], []
    for key in keys:
        match = _SYNSET.match(key)
        if match:
            plain.append(match["lemma"].replace("_", " "))
            tags.append(match["sense"])
        else:
            plain.append(key)
            tags.append("no synset")
    names = list(plain)
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(plain):
        by_name.setdefault(name, []).append(i)
    for name, members in by_name.items():
        if len(members) > 1:
            members.sort(key=lambda i: (-int(counts[i]), keys[i]))
            for i in members[1:]:
                names[i] = f"{name} ({tags[i]})"
    return names


def load_or_build_index(objects: Path, image_data: Path, digests: dict, cache_dir: Path) -> dict[str, np.ndarray]:
    """The parsed index of the two files, from the cache when it was made from the same contents."""

    def build():
        index = build_index(objects, image_data)
        return {name: value for name, value in index.items() if name != "skipped"}, {"skipped": index["skipped"]}

    parts = {"product": "visual-genome-index", "version": INDEX_VERSION, **digests}
    arrays, facts = cached(cache_dir, "visual-genome", parts, build, suffix=".npz")
    return {**arrays, "skipped": facts["skipped"]}


def build_index(objects: Path, image_data: Path) -> dict:
    """Parse ``image_data.json`` and ``objects.json`` into compact arrays, streaming both.

    Returns a dict of arrays: ``image_ids`` (I,), ``sizes`` (I, 2) width and height,
    ``files`` (I,) paths under the image root, ``keys`` (K,) category keys (synset, or
    name without one), ``box_image`` (B,) row of each box's image (non-decreasing),
    ``box_category`` (B,) and ``corners`` (B, 4) int32 ``[x0, y0, x1, y1)`` clipped to the
    image; and ``skipped``, a :class:`SkipLog` as a dict.
    """
    skipped = SkipLog()
    info: dict[int, tuple[int, int, str]] = {}
    with open(image_data, "rb") as handle:
        for entry in _stream(handle, image_data):
            image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
            width, height = (entry.get("width"), entry.get("height")) if isinstance(entry, dict) else (None, None)
            if not _id(image_id) or not _positive_int(width) or not _positive_int(height):
                skipped.add("image_data.json entries without an image_id, width and height", _short(entry))
            elif image_id in info:
                skipped.add("images listed twice in image_data.json (first kept)", f"image_id={image_id}")
            else:
                info[image_id] = (int(width), int(height), _image_file(entry, image_id))
    if not info:
        raise LaviseError(
            f"'{image_data}' lists no image with an image_id, width and height "
            "(expected a JSON list of {\"image_id\", \"url\", \"width\", \"height\"})."
        )

    rows: dict[int, int] = {}
    keys: dict[str, int] = {}
    box_image, box_category, raw = array("i"), array("i"), array("f")
    with open(objects, "rb") as handle:
        for entry in _stream(handle, objects):
            image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
            if not _id(image_id) or image_id not in info:
                skipped.add("objects.json entries of images not in image_data.json", f"image_id={image_id}")
                continue
            if image_id in rows:
                skipped.add("images listed twice in objects.json (first kept)", f"image_id={image_id}")
                continue
            row = rows[image_id] = len(rows)
            objects = entry.get("objects")
            if objects is not None and not isinstance(objects, list):
                skipped.add("objects.json entries whose objects is not a list", f"image_id={image_id}")
                objects = None
            for obj in objects or []:
                key = _category_key(obj)
                if key is None:
                    skipped.add("objects without a synset or name", f"image_id={image_id}")
                    continue
                box = [obj.get("x"), obj.get("y"), obj.get("w"), obj.get("h")]
                if not all(type(v) in _NUMBER_TYPES for v in box):  # not true, "12" or null
                    skipped.add("objects without a numeric x, y, w, h", f"image_id={image_id}")
                    continue
                box_image.append(row)
                box_category.append(keys.setdefault(key, len(keys)))
                raw.extend(box)
    if not rows:
        raise LaviseError(
            f"'{objects}' has no entry for any image of '{image_data}' "
            "(expected a JSON list of {\"image_id\", \"objects\": [...]})."
        )

    ids = np.fromiter(rows, dtype=np.int64, count=len(rows))
    sizes = np.array([info[i][:2] for i in ids], dtype=np.int32).reshape(-1, 2)
    box_image_np = np.frombuffer(box_image, dtype=np.int32)
    raw_boxes = np.frombuffer(raw, dtype=np.float32).reshape(-1, 4)
    corners = np.empty((len(raw_boxes), 4), dtype=np.int32)
    status = np.empty(len(raw_boxes), dtype=np.int8)
    for start in range(0, len(raw_boxes), _CLIP_CHUNK):  # bounded temporaries for millions of boxes
        part = slice(start, start + _CLIP_CHUNK)
        corners[part], status[part] = clip_boxes(raw_boxes[part], sizes[box_image_np[part]])
    for code, reason in _BOX_REASONS.items():
        for b in np.flatnonzero(status == code)[: skipped.examples_kept]:
            skipped.examples[reason].append(f"image_id={ids[box_image_np[b]]}")
        if (status == code).any():
            skipped.counts[reason] += int((status == code).sum())
    usable = status <= BOX_CLIPPED
    return {
        "image_ids": ids,
        "sizes": sizes,
        "files": np.array([info[i][2] for i in ids], dtype=str).reshape(-1),
        "keys": np.array(list(keys), dtype=str).reshape(-1),
        "box_image": box_image_np[usable],
        "box_category": np.frombuffer(box_category, dtype=np.int32)[usable],
        "corners": corners[usable],
        "skipped": skipped.to_dict(),
    }


def _stream(handle, path: Path):
    """The items of a top-level JSON list, one at a time; errors name the file."""
    import ijson

    try:
        yield from ijson.items(handle, "item", use_float=True)
    except ijson.JSONError as error:
        raise LaviseError(f"'{path}' is not a valid JSON list of entries: {error}") from None


def _category_key(obj: object) -> str | None:
    """The first synset, else the first name (lower-cased, spaces collapsed)."""
    if not isinstance(obj, dict):
        return None
    synsets = obj.get("synsets") or []
    if isinstance(synsets, list) and synsets and isinstance(synsets[0], str) and synsets[0].strip():
        return synsets[0].strip()
    names = obj.get("names") or ([obj["name"]] if obj.get("name") else [])
    if isinstance(names, list) and names and isinstance(names[0], str) and names[0].strip():
        return " ".join(names[0].lower().split())
    return None


def _image_file(entry: dict, image_id: int) -> str:
    """``VG_100K/1.jpg`` from the url's last two parts; ``VG_100K/<id>.jpg`` without a url."""
    url = entry.get("url")
    if isinstance(url, str) and "/" in url:
        folder, name = url.rstrip("/").split("/")[-2:]
        return f"{folder}/{name}"
    return f"VG_100K/{image_id}.jpg"


def _id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    """A whole number from 1 to 2^31 - 1 (sizes are kept as int32)."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value < 2**31
        and float(value).is_integer()
    )


def _short(entry: object) -> str:
    text = json.dumps(entry, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
