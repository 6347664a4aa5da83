"""COCO-format instance annotations (polygons, RLE and crowd regions), read with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from lavise.datasets.base import SkipLog
from lavise.errors import LaviseError
from lavise.storage import content_digest, files_digest


class CocoDataset:
    """Images and instance masks from a COCO instances JSON and its image folder.

    All instances of one category in an image are merged into one mask: LaViSE pairs a
    concept with the region it covers, not with each instance. Crowd regions count too.

    Args:
        annotations: path of the instances JSON (e.g. ``instances_val2017.json``).
        images: the folder holding the files named in ``images[].file_name``.
    """

    def __init__(self, annotations: Path, images: Path) -> None:
        from pycocotools.coco import COCO

        self.annotations_path = Path(annotations)
        self.root = Path(images)
        if not self.annotations_path.is_file():
            raise LaviseError(f"COCO annotation file '{self.annotations_path}' does not exist.")
        if not self.root.is_dir():
            raise LaviseError(f"COCO image folder '{self.root}' does not exist.")
        try:
            data = json.loads(self.annotations_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LaviseError(f"'{self.annotations_path}' is not valid JSON: {error}") from None
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise LaviseError(
                f"'{self.annotations_path}' is not a COCO instances file: no {', '.join(missing)}."
            )
        self.skipped = SkipLog()
        data = self._drop_bad_annotations(data)
        self._coco = COCO()
        self._coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self._coco.createIndex()

        categories = sorted(self._coco.cats.values(), key=lambda c: c["id"])
        self.concepts = [str(c["name"]) for c in categories]
        self._concept_of_category = {c["id"]: i for i, c in enumerate(categories)}
        self._image_ids = []
        for image_id in sorted(self._coco.imgs):
            info = self._coco.imgs[image_id]
            if not self._coco.getAnnIds(imgIds=[image_id]):
                continue  # images without annotations teach the explainer nothing
            if not (self.root / info["file_name"]).is_file():
                self.skipped.add("annotated images whose file is missing", info["file_name"])
                continue
            self._image_ids.append(image_id)
        if not self._image_ids:
            raise LaviseError(
                f"No annotated image of '{self.annotations_path}' exists under '{self.root}'."
            )

    def _drop_bad_annotations(self, data: dict) -> dict:
        category_ids = {c["id"] for c in data["categories"]}
        image_ids = {i["id"] for i in data["images"]}
        sizes = {i["id"]: (i.get("height"), i.get("width")) for i in data["images"]}
        kept = []
        for ann in data["annotations"]:
            if ann.get("category_id") not in category_ids:
                self.skipped.add("annotations of unknown categories", f"category_id={ann.get('category_id')}")
            elif ann.get("image_id") not in image_ids:
                self.skipped.add("annotations of unknown images", f"image_id={ann.get('image_id')}")
            elif not ann.get("segmentation") and not ann.get("bbox"):
                self.skipped.add("annotations without a mask or box", f"id={ann.get('id')}")
            elif ann.get("segmentation") and not _valid_segmentation(ann["segmentation"], sizes[ann["image_id"]]):
                # pycocotools raises on these (or misplaces the mask) when decoding
                self.skipped.add("annotations with a malformed segmentation", f"id={ann.get('id')}")
            else:
                kept.append(ann)
        return {**data, "annotations": kept}

    def __len__(self) -> int:
        return len(self._image_ids)

    def __repr__(self) -> str:
        return (
            f"CocoDataset(annotations='{self.annotations_path}', root='{self.root}', "
            f"images={len(self)}, concepts={len(self.concepts)})"
        )

    def image_path(self, index: int) -> Path:
        return self.root / self._coco.imgs[self._image_ids[index]]["file_name"]

    def image_concepts(self, index: int) -> list[int]:
        """The concepts annotated in image i, without decoding any mask."""
        anns = self._coco.loadAnns(self._coco.getAnnIds(imgIds=[self._image_ids[index]]))
        return sorted({self._concept_of_category[a["category_id"]] for a in anns})

    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """Concept indices and (m, H, W) uint8 masks, one per category present.

        ``size`` is the (W, H) of the image file; a file whose size differs from the
        JSON's width and height would misalign every mask, so it is refused.
        """
        image_id = self._image_ids[index]
        info = self._coco.imgs[image_id]
        if info.get("width") is None or info.get("height") is None:
            # Some exporters leave the size out: the file's own size is all there is to go by
            # (pycocotools needs it to draw polygons).
            info["width"], info["height"] = int(size[0]), int(size[1])
        width, height = int(info["width"]), int(info["height"])
        if (width, height) != tuple(size):
            raise ValueError(
                f"image is {size[0]}x{size[1]} but the annotations say {width}x{height}"
            )
        anns = self._coco.loadAnns(self._coco.getAnnIds(imgIds=[image_id]))
        for ann in anns:
            rle = ann.get("segmentation")
            if isinstance(rle, dict) and list(rle.get("size") or []) != [height, width]:
                raise ValueError(f"a mask (RLE) is {rle.get('size')} but the image is {height}x{width}")
        merged: dict[int, np.ndarray] = {}
        for ann in anns:
            if ann.get("segmentation"):
                mask = self._coco.annToMask(ann)
            else:  # a box only
                mask = _box_mask(ann["bbox"], width, height)
            concept = self._concept_of_category[ann["category_id"]]
            merged[concept] = np.maximum(merged[concept], mask) if concept in merged else mask
        concepts = sorted(merged)
        if not concepts:
            return [], np.zeros((0, height, width), dtype=np.uint8)
        return concepts, np.stack([merged[c] for c in concepts]).astype(np.uint8)

    def identity(self) -> dict:
        return {
            "kind": "coco",
            "annotations": content_digest(self.annotations_path),
            "images": files_digest([self.image_path(i) for i in range(len(self))]),
        }


def _valid_segmentation(segmentation: object, size: tuple[object, object]) -> bool:
    """Polygons: lists of at least 3 (x, y) points; RLE: a dict of the image's size."""
    if isinstance(segmentation, list):
        return all(
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)
            for polygon in segmentation
        )
    if isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        rle_size = list(segmentation.get("size") or [])
        # Without the image's size in the JSON, the RLE's is checked against the file later.
        size_fits = rle_size == list(size) if None not in size else (
            len(rle_size) == 2 and all(isinstance(v, int) and v > 0 for v in rle_size)
        )
        return size_fits and (
            isinstance(counts, str) or (isinstance(counts, list) and all(isinstance(c, int) for c in counts))
        )
    return False


def _box_mask(bbox: list[float], width: int, height: int) -> np.ndarray:
    """A filled (H, W) mask of an [x, y, w, h] box, clipped to the image."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
    x1, y1 = min(int(np.ceil(x + w)), width), min(int(np.ceil(y + h)), height)
    mask[y0:y1, x0:x1] = 1
    return mask
