"""NetDissect's Broden as reference data: pixel label maps and image-level labels.

The layout as distributed (e.g. ``broden1_224/``):

- ``index.csv``: ``image,split,ih,iw,sh,sw`` then one column per category (``color,
  object,part,material,scene,texture``). A cell holds ``;``-separated items: PNG label
  maps (paths under ``images/``) for pixel categories, label numbers for image-level ones.
- ``label.csv``: ``number,name,category,frequency,coverage,syns``, ``category`` like
  ``object(123);part(4)``.
- ``category.csv`` (``name,first,last,count,frequency``) and ``c_<category>.csv``: read
  only to check that every category it lists has its ``index.csv`` column.
- ``images/``: the images and label maps; a map's label number is ``R + 256 * G`` and it
  may be smaller than its image (``sh, sw`` against ``ih, iw``): it is resized nearest.

Image-level labels (scene, texture) become whole-image masks; a label found in several
maps of one image (or both a map and the image-level list) gets one merged mask.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from lavise.datasets.base import IMAGE_LOADER, BadImage, ImageRoot, SkipLog, open_image, oriented_masks
from lavise.datasets.masks import merge_by_concept, resize_nearest, same_aspect
from lavise.errors import LaviseError
from lavise.storage import content_digest, files_digest

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_SIZE_COLUMNS = ("ih", "iw", "sh", "sw")
_MAX_LABEL = 256 * 256 - 1
# NetDissect marks scene, colour and texture names with a suffix ("street-s", "red-c").
_SUFFIX_CATEGORY = {"s": "scene", "c": "color", "t": "texture"}
_SUFFIX = re.compile(r"^(?P<name>.+)-(?P<mark>[sct])$")
_CATEGORY = re.compile(r"^\s*(?P<name>[^()]+?)\s*(\(\s*\d*\s*\))?\s*$")


class BrodenDataset:
    """Broden images with one mask per label present (object, part, material, colour...).

    Args:
        root: the Broden folder (``index.csv``, ``label.csv``, ``images/``).
        categories: the categories to read, e.g. ``["object", "part"]`` (default: every
            category column of ``index.csv``).
        split: only the images of this ``split`` of ``index.csv`` (default: all).
        allow_outside_root: read image and label-map paths that lead outside ``images/``
            instead of refusing the dataset.

    Example:
        >>> BrodenDataset(Path("/nonexistent"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: Broden folder '/nonexistent' has no index.csv.
    """

    def __init__(
        self, root: Path, *, categories: Sequence[str] | str | None = None, split: str | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.root = Path(root)
        self.index_path = self.root / "index.csv"
        self.label_path = self.root / "label.csv"
        for path in (self.index_path, self.label_path):
            if not path.is_file():
                raise LaviseError(f"Broden folder '{self.root}' has no {path.name}.")
        self.images_root = self.root / "images"
        self.split = split
        self.skipped = SkipLog()
        self._rule = ImageRoot(self.images_root, source=f"'{self.index_path}'", allow_outside=allow_outside_root)

        with _csv_rows(self.index_path) as (header, rows):  # streamed: index.csv may have 10^5 rows
            columns = [c for c in header if c not in INDEX_COLUMNS]
            required = ["image", *_SIZE_COLUMNS] + (["split"] if split is not None else [])
            missing = [c for c in required if c not in header]
            listed = self._listed_categories()
            missing += [c for c in listed if c not in header]
            if missing:
                raise LaviseError(
                    f"'{self.index_path}' has no column {', '.join(repr(c) for c in missing)} "
                    f"(its header: {','.join(header)}; expected image,split,ih,iw,sh,sw and one column "
                    f"per category{' of category.csv' if listed else ''})."
                )
            self.categories = _chosen_categories(categories, columns, self.index_path)

            numbers, raw_names, label_categories = _read_labels(self.label_path)
            wanted = set(self.categories)
            members = [i for i, cats in enumerate(label_categories) if cats & wanted]
            names = label_names(raw_names, label_categories)  # over all labels: names do not depend on the choice
            self.concepts = [names[i] for i in members]
            self._concept_of_label = np.full(int(max(numbers, default=0)) + 1, -1, dtype=np.int64)  # number -> concept
            self._concept_of_label[np.asarray([numbers[i] for i in members], dtype=np.int64)] = np.arange(len(members))
            self._named = np.zeros(len(self._concept_of_label), dtype=bool)
            self._named[np.asarray(numbers, dtype=np.int64)] = True
            self._read_index(rows)
        self._rule.check()
        if not self._images:
            raise LaviseError(
                f"No image of '{self.index_path}' has a label of {', '.join(self.categories)}"
                f"{f' in split {split!r}' if split is not None else ''} and a file under '{self.images_root}'."
            )

    def _listed_categories(self) -> list[str]:
        """The categories category.csv lists (empty when there is no category.csv)."""
        path = self.root / "category.csv"
        if not path.is_file():
            return []
        with _csv_rows(path) as (header, rows):
            if "name" not in header:
                raise LaviseError(f"'{path}' has no 'name' column (its header: {','.join(header)}).")
            return [row["name"].strip() for row in rows if (row.get("name") or "").strip()]

    def _read_index(self, rows: Iterator[dict[str, str]]) -> None:
        """Keep the rows with a file and at least one label of the chosen categories."""
        self._images: list[str] = []
        self._maps: list[tuple[str, ...]] = []
        sizes: list[tuple[int, int, int, int]] = []
        level_concepts: list[int] = []
        level_offsets = [0]
        seen: set[str] = set()
        for line, row in enumerate(rows, start=2):
            image = (row.get("image") or "").strip()
            if self.split is not None and (row.get("split") or "").strip() != self.split:
                continue
            if not image:
                self.skipped.add("index.csv rows without an image", f"line {line}")
                continue
            if image in seen:
                self.skipped.add("images listed twice in index.csv (first kept)", image)
                continue
            seen.add(image)
            try:
                size = tuple(int(row[c]) for c in _SIZE_COLUMNS)
            except (TypeError, ValueError):
                size = (0,)
            if min(size) <= 0 or max(size) >= 2**31:
                self.skipped.add("index.csv rows whose ih, iw, sh or sw is not a positive whole number", f"line {line}")
                continue
            maps, labels = [], []
            for category in self.categories:
                for item in (row.get(category) or "").split(";"):
                    item = item.strip()
                    if not item:
                        continue
                    if item.isdigit():
                        labels.append(int(item))
                    else:
                        maps.append(item)
            concepts = self._image_level_concepts(labels, image)
            if not maps and not concepts:
                continue  # nothing of the chosen categories in this image
            if not all([self._rule.admits(name, f"line {line}") for name in (image, *maps)]):
                continue  # refused once the index is read, unless allowed; never looked at
            if not (self.images_root / image).is_file():
                self.skipped.add("images whose file is missing", image)
                continue
            absent = [m for m in maps if not (self.images_root / m).is_file()]
            if absent:
                self.skipped.add("images whose label map is missing", absent[0])
                continue
            self._images.append(image)
            self._maps.append(tuple(maps))
            sizes.append(size)
            level_concepts.extend(concepts)
            level_offsets.append(len(level_concepts))
        self._sizes = np.array(sizes, dtype=np.int64).reshape(-1, 4)  # ih, iw, sh, sw
        self._level_concepts = np.array(level_concepts, dtype=np.int64)
        self._level_offsets = np.array(level_offsets, dtype=np.int64)

    def _image_level_concepts(self, labels: list[int], image: str) -> list[int]:
        concepts = []
        for number in labels:
            if number >= len(self._named) or not self._named[number]:
                self.skipped.add("image-level labels with no name in label.csv", f"{image}: {number}")
            elif self._concept_of_label[number] < 0:
                self.skipped.add("image-level labels whose label.csv category is not chosen", f"{image}: {number}")
            else:
                concepts.append(int(self._concept_of_label[number]))
        return sorted(set(concepts))

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return (
            f"BrodenDataset(root='{self.root}', images={len(self)}, concepts={len(self.concepts)}, "
            f"categories={','.join(self.categories)})"
        )

    def image_path(self, index: int) -> Path:
        return self.images_root / self._images[index]

    @oriented_masks
    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """Concept indices and (m, H, W) uint8 masks of image i at the file's (W, H).

        Raises ValueError when a label map holds a number label.csv does not name, or
        when the file's aspect ratio is not the one index.csv gives.
        """
        width, height = int(size[0]), int(size[1])
        ih, iw = int(self._sizes[index, 0]), int(self._sizes[index, 1])
        if (width, height) != (iw, ih) and not same_aspect((width, height), (iw, ih)):
            raise ValueError(f"image is {width}x{height} but index.csv says {iw}x{ih}")
        concepts, masks = [], []
        if self._maps[index]:
            labels = np.stack([
                resize_nearest(read_label_map(self.images_root / name), (width, height))
                for name in self._maps[index]
            ])  # (k, H, W)
            numbers, pixel_masks = label_masks(labels)  # (m,), (m, H, W)
            unnamed = (numbers >= len(self._named)) | ~self._named[np.minimum(numbers, len(self._named) - 1)]
            if unnamed.any():
                raise ValueError(
                    f"label map {self._maps[index][0]} holds label numbers with no name in label.csv: "
                    f"{', '.join(str(n) for n in numbers[unnamed][:5])}"
                )
            chosen = self._concept_of_label[numbers]  # -1: a label of another category
            concepts.append(chosen[chosen >= 0])
            masks.append(pixel_masks[chosen >= 0])
        level = self._level_concepts[self._level_offsets[index]:self._level_offsets[index + 1]]
        concepts.append(level)
        masks.append(np.ones((len(level), height, width), dtype=np.uint8))
        return merge_by_concept(np.concatenate(concepts), np.concatenate(masks))

    def identity(self) -> dict:
        files = [self.image_path(i) for i in range(len(self))]
        files += [self.images_root / name for maps in self._maps for name in maps]
        return {
            "kind": "broden",
            "loader": IMAGE_LOADER,
            "index": content_digest(self.index_path),
            "labels": content_digest(self.label_path),
            "categories": list(self.categories),
            "split": self.split,
            "files": files_digest(files),
        }


def read_label_map(path: Path) -> np.ndarray:
    """A Broden label map PNG -> (h, w) int64 label numbers, ``R + 256 * G``.

    Raises ValueError (naming the file) when it cannot be read.
    """
    try:
        with open_image(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, BadImage) as error:
        raise ValueError(f"label map {path.name} is unreadable ({error})") from None
    return rgb[..., 0] + 256 * rgb[..., 1]


def label_masks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, H, W) label numbers (0: unlabelled) -> the m numbers present and (m, H, W) uint8 masks.

    A number's mask is the union of its pixels over the k maps (parts, for instance, come
    in several maps). One scatter, whatever m.

    Example:
        >>> numbers, masks = label_masks(np.array([[[0, 7], [3, 7]], [[3, 0], [0, 0]]]))
        >>> numbers.tolist(), masks.tolist()
        ([3, 7], [[[1, 0], [1, 0]], [[0, 1], [0, 1]]])
    """
    height, width = labels.shape[-2:]
    flat = labels.reshape(-1, height * width)  # (k, H*W)
    labelled = flat > 0
    numbers = np.unique(flat[labelled])
    masks = np.zeros((len(numbers), height * width), dtype=np.uint8)
    masks[np.searchsorted(numbers, flat[labelled]), np.nonzero(labelled)[1]] = 1
    return numbers, masks.reshape(len(numbers), height, width)


def label_names(raw: list[str], categories: list[set[str]]) -> list[str]:
    """Readable, distinct concept names from label.csv names.

    NetDissect's marks are stripped when the label belongs to the marked category:
    ``-s`` scene, ``-c`` colour, ``-t`` texture ("street-s" -> "street"). If that makes
    two labels share a name, the stripped one is tagged with its category ("street
    (scene)"); the tag does not tokenise to a known word, so the word vector is still the
    name's. Names that still clash get their position.

    Example:
        >>> label_names(["street", "street-s", "red-c", "t-shirt"], [{"object"}, {"scene"}, {"color"}, {"object"}])
        ['street', 'street (scene)', 'red', 't-shirt']
    """
    names, tags = [], []
    for name, cats in zip(raw, categories):
        name = name.strip()
        match = _SUFFIX.match(name)
        if match and _SUFFIX_CATEGORY[match["mark"]] in cats:
            names.append(match["name"])
            tags.append(_SUFFIX_CATEGORY[match["mark"]])
        else:
            names.append(name)
            tags.append(None)
    taken = {}
    for i, name in enumerate(names):
        taken.setdefault(name, []).append(i)
    result = list(names)
    for name, members in taken.items():
        if len(members) > 1:
            for i in members:
                if tags[i] is not None:
                    result[i] = f"{name} ({tags[i]})"
    counts: dict[str, int] = {}
    for i, name in enumerate(result):
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > 1:
            result[i] = f"{name} ({counts[name]})"
    return result


@contextlib.contextmanager
def _csv_rows(path: Path) -> Iterator[tuple[list[str], Iterator[dict[str, str]]]]:
    """The header and a stream of the rows of a CSV file; a decoding error names the file."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            yield header, reader
    except (UnicodeDecodeError, csv.Error) as error:
        raise LaviseError(f"'{path}' is not a readable CSV file: {error}") from None


def _read_labels(path: Path) -> tuple[list[int], list[str], list[set[str]]]:
    """label.csv -> numbers, names and the set of categories of each label."""
    with _csv_rows(path) as (header, stream):
        rows = list(stream)  # label.csv is small (about 1,200 labels)
    missing = [c for c in ("number", "name", "category") if c not in header]
    if missing:
        raise LaviseError(
            f"'{path}' has no column {', '.join(repr(c) for c in missing)} (its header: "
            f"{','.join(header)}; expected number,name,category,frequency,coverage,syns)."
        )
    numbers, names, categories = [], [], []
    seen: dict[int, int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            number = int(row["number"])
        except (TypeError, ValueError):
            raise LaviseError(f"'{path}' line {line}: label number {row['number']!r} is not a whole number.") from None
        name = (row.get("name") or "").strip()
        if number <= 0 or name in ("", "-"):
            continue  # 0 and '-' are NetDissect's "unlabelled"
        if number > _MAX_LABEL:
            raise LaviseError(
                f"'{path}' line {line}: label number {number} is over {_MAX_LABEL}, the most a label map "
                "(R + 256 * G) can hold."
            )
        if number in seen:
            raise LaviseError(f"'{path}' lists label number {number} twice (lines {seen[number]} and {line}).")
        seen[number] = line
        cats = set()
        for part in (row.get("category") or "").split(";"):
            match = _CATEGORY.match(part)
            if match and part.strip():
                cats.add(match["name"])
        numbers.append(number)
        names.append(name)
        categories.append(cats)
    if not numbers:
        raise LaviseError(f"'{path}' names no label.")
    return numbers, names, categories


def _chosen_categories(categories: Sequence[str] | str | None, columns: list[str], index_path: Path) -> list[str]:
    if categories is None:
        if not columns:
            raise LaviseError(f"'{index_path}' has no category column after image,split,ih,iw,sh,sw.")
        return list(columns)
    if isinstance(categories, str):
        categories = [c for c in categories.split(",")]
    chosen = list(dict.fromkeys(c.strip() for c in categories if c.strip()))
    unknown = [c for c in chosen if c not in columns]
    if unknown or not chosen:
        raise LaviseError(
            f"Unknown Broden categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(repr(c) for c in unknown) or '(none given)'}; "
            f"'{index_path}' has: {', '.join(columns)}."
        )
    return chosen
