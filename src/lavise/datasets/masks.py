"""Mask geometry shared by the readers: boxes to masks, merging per concept, nearest resizing.

Coordinates follow COCO and Visual Genome: x runs along the width (columns), y along the
height (rows), boxes are ``[x, y, w, h]`` in pixels and masks are ``(H, W)``.
"""

from __future__ import annotations

import numpy as np

# What ``clip_boxes`` says about each box.
BOX_INSIDE, BOX_CLIPPED, BOX_EMPTY, BOX_OUTSIDE, BOX_MALFORMED = range(5)


def clip_boxes(boxes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round boxes outwards to whole pixels, clip them to their image, and classify them.

    Args:
        boxes: (B, 4) float ``[x, y, w, h]``.
        sizes: (B, 2) the (width, height) of each box's image.

    Returns:
        (B, 4) int32 ``[x0, y0, x1, y1)`` inside the image, and (B,) int8 status:
        ``BOX_INSIDE``, ``BOX_CLIPPED`` (partly outside, clipped), ``BOX_EMPTY`` (zero
        or negative width or height), ``BOX_OUTSIDE`` (no pixel inside the image) or
        ``BOX_MALFORMED`` (not finite). Only the first two are usable.

    Example:
        >>> corners, status = clip_boxes(np.array([[2.5, 1, 3, 2], [-2, 0, 4, 1]]), np.array([[8, 4], [8, 4]]))
        >>> corners.tolist(), status.tolist()
        ([[2, 1, 6, 3], [0, 0, 2, 1]], [0, 1])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    x, y, w, h = safe.T
    lo = np.floor(np.stack([x, y], axis=1))  # (B, 2)
    hi = np.ceil(np.stack([x + w, y + h], axis=1))  # (B, 2)
    clipped_lo = np.clip(lo, 0, sizes)
    clipped_hi = np.clip(hi, 0, sizes)
    status = np.full(len(boxes), BOX_INSIDE, dtype=np.int8)
    status[((lo < 0) | (hi > sizes)).any(axis=1)] = BOX_CLIPPED
    status[(clipped_hi <= clipped_lo).any(axis=1)] = BOX_OUTSIDE
    status[(w <= 0) | (h <= 0)] = BOX_EMPTY
    status[~finite] = BOX_MALFORMED
    corners = np.concatenate([clipped_lo, clipped_hi], axis=1).astype(np.int32)
    return corners, status


def box_masks(corners: np.ndarray, groups: np.ndarray, count: int, size: tuple[int, int]) -> np.ndarray:
    """Draw boxes as filled masks, the boxes of one group merged into one mask.

    Each box adds +1/-1 at its four corners of a difference array; two running sums
    turn that into the number of boxes covering each pixel, so the cost is one pass
    over the (count, H, W) output whatever the number of boxes.

    Args:
        corners: (B, 4) int ``[x0, y0, x1, y1)`` already inside the image (``clip_boxes``).
        groups: (B,) the mask each box belongs to, in ``[0, count)``.
        count: m, the number of masks.
        size: the image's (W, H).

    Returns:
        (m, H, W) uint8, 1 inside the union of the group's boxes.

    Example:
        >>> box_masks(np.array([[0, 0, 2, 1], [1, 0, 3, 2]]), np.array([0, 0]), 1, (4, 2))[0].tolist()
        [[1, 1, 1, 0], [0, 1, 1, 0]]
    """
    width, height = size
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 4)
    groups = np.asarray(groups, dtype=np.int64)
    cover = np.zeros((count, height + 1, width + 1), dtype=np.int32)
    x0, y0, x1, y1 = corners.T
    np.add.at(cover, (groups, y0, x0), 1)
    np.add.at(cover, (groups, y0, x1), -1)
    np.add.at(cover, (groups, y1, x0), -1)
    np.add.at(cover, (groups, y1, x1), 1)
    np.cumsum(cover, axis=1, out=cover)
    np.cumsum(cover, axis=2, out=cover)
    return (cover[:, :height, :width] > 0).astype(np.uint8)


def merge_by_concept(concepts: np.ndarray, masks: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Union the masks that share a concept.

    Args:
        concepts: (r,) concept index of each mask.
        masks: (r, H, W) uint8.

    Returns:
        The k distinct concepts in increasing order and their (k, H, W) uint8 unions.

    Example:
        >>> masks = np.array([[[1, 0]], [[0, 0]], [[0, 1]]], dtype=np.uint8)
        >>> concepts, merged = merge_by_concept(np.array([4, 2, 4]), masks)
        >>> concepts, merged.tolist()
        ([2, 4], [[[0, 0]], [[1, 1]]])
    """
    concepts = np.asarray(concepts, dtype=np.int64)
    if len(concepts) == 0:
        return [], np.zeros((0, *masks.shape[1:]), dtype=np.uint8)
    order = np.argsort(concepts, kind="stable")
    ordered = concepts[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    merged = np.maximum.reduceat(masks[order], starts, axis=0)
    return ordered[starts].tolist(), merged.astype(np.uint8, copy=False)


def resize_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of label maps or masks to a (W, H) size.

    Each output pixel takes the input pixel under its centre, so a label map half the
    image's size (Broden's 112 for 224) lines up with the image.

    Args:
        masks: (..., h, w) any dtype.
        size: the (W, H) wanted.

    Returns:
        (..., H, W), the same dtype.

    Example:
        >>> resize_nearest(np.array([[1, 2], [3, 4]]), (4, 2)).tolist()
        [[1, 1, 2, 2], [3, 3, 4, 4]]
    """
    width, height = size
    in_height, in_width = masks.shape[-2:]
    if (in_width, in_height) == (width, height):
        return masks
    rows = np.minimum(((np.arange(height) + 0.5) * in_height / height).astype(np.int64), in_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * in_width / width).astype(np.int64), in_width - 1)
    return masks[..., rows[:, None], cols[None, :]]


def same_aspect(size: tuple[int, int], recorded: tuple[int, int], *, tolerance: float = 0.02) -> bool:
    """Whether an image file of ``size`` (W, H) is a rescaled copy of a ``recorded`` size.

    Example:
        >>> same_aspect((400, 300), (800, 600)), same_aspect((300, 400), (800, 600))
        (True, False)
    """
    sx, sy = size[0] / max(recorded[0], 1), size[1] / max(recorded[1], 1)
    return abs(sx - sy) <= tolerance * max(sx, sy)


def scale_corners(corners: np.ndarray, size: tuple[int, int], recorded: tuple[int, int]) -> np.ndarray:
    """Box corners given on an image of ``recorded`` (W, H), moved onto one of ``size``.

    Example:
        >>> scale_corners(np.array([[1, 1, 3, 2]]), (8, 4), (4, 2)).tolist()
        [[2, 2, 6, 4]]
    """
    scale = np.array([size[0] / recorded[0], size[1] / recorded[1]] * 2)
    scaled = np.asarray(corners, dtype=np.float64) * scale
    lo = np.floor(scaled[:, :2] + 1e-6)
    hi = np.ceil(scaled[:, 2:] - 1e-6)
    limit = np.array(size, dtype=np.float64)
    out = np.concatenate([np.clip(lo, 0, limit), np.clip(hi, 0, limit)], axis=1).astype(np.int32)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)  # a box never vanishes when shrunk
    out[:, 2:] = np.minimum(out[:, 2:], np.array(size))
    return out


def decode_rle_string(text: str) -> list[int] | None:
    """COCO's compressed RLE string -> its run lengths, or None when it is not one.

    The format of pycocotools' ``rleToString``: each count is a little-endian run of 5-bit
    groups, a character ``48 + group`` with 0x20 set while more groups follow and 0x10
    of the last group its sign; from the fourth count on, a count is stored as its
    difference to the count two before. pycocotools' own decoder reads past the end of a
    string cut inside a count and accepts any character, so masks of garbage are
    uninitialised memory; here a character outside ``'0'..'o'``, a count cut off, or a
    negative run make the string invalid.

    Example:
        >>> decode_rle_string("42102"), decode_rle_string("5"), decode_rle_string("~~"), decode_rle_string("4a")
        ([4, 2, 1, 2, 3], [5], None, None)
    """
    counts: list[int] = []
    position, length = 0, len(text)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                return None  # a count cut off
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def rle_problem(counts: object, height: int, width: int) -> str | None:
    """What is wrong with an RLE's counts for an (height, width) mask, or None when nothing is.

    Example:
        >>> rle_problem([2, 2], 2, 2), rle_problem([3, -1, 2], 2, 2), rle_problem("42102", 3, 4)
        (None, 'a negative count', None)
    """
    if isinstance(counts, str):
        decoded = decode_rle_string(counts)
        if decoded is None:
            return "a compressed counts string that does not decode"
        counts = decoded
    elif not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return "counts that are neither a string nor a list of whole numbers"
    if any(c < 0 for c in counts):
        return "a negative count"
    if sum(counts) != height * width:
        return f"counts summing to {sum(counts)}, not {height}x{width} = {height * width}"
    return None


def rle_mask(counts: str | list[int], height: int, width: int) -> np.ndarray:
    """An RLE (column-major run lengths, zeros first) -> (H, W) uint8 0/1, decoded by pycocotools.

    Only counts that :func:`rle_problem` passed may come here: pycocotools' decoder
    trusts its input (a garbage string reads uninitialised memory), so lavise checks
    the counts first and lets the library do the decoding.

    Example:
        >>> rle_mask([1, 2, 1], 2, 2).tolist()
        [[0, 1], [1, 0]]
    """
    from pycocotools import mask as mask_utils

    if isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    else:
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)