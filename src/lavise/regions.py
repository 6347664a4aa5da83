"""Where a filter is active: the thresholds T_u, and regions of feature maps and masks.

Pure tensor functions, shared by training (activation-region rows), naming (activation
masking), evaluation (IoU against masks) and the report (regions drawn on thumbnails):

- a filter's peak on an image is its maximum over positions (:func:`peak_activations`);
- T_u is the level that filter u exceeds with probability ``quantile`` over every
  position of every image (NetDissect's top 0.5 %): :func:`quantile_thresholds` over
  maps held at once, :class:`ThresholdTally` over maps that arrive in batches;
- on the feature grid, u's active region is {F_u > T_u} (:func:`active_region`);
- on an image or mask grid, it is u's map upsampled bilinearly and thresholded at T_u
  (:func:`upsampled_regions`);
- concept masks meet the feature grid by area averaging (:func:`masks_to_grid`), and
  a concept's training regions are the active regions of the filters strongest inside
  its mask (:func:`strongest_regions`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lavise.errors import LaviseError


def _check_quantile(quantile: float) -> None:
    if not 0 < quantile < 1:
        raise LaviseError(f"quantile must be in (0, 1), got {quantile}.")


def _thresholds_from_top(top: torch.Tensor, count: int, quantile: float, minimum: torch.Tensor) -> torch.Tensor:
    """T_u from each filter's largest values, sorted descending, of ``count`` in all.

    ``top`` must hold at least count − ⌊(1 − quantile)(count − 1)⌋ values per filter;
    ``minimum`` is each filter's smallest value. (d, k), (d,) -> (d,)
    """
    position = (1 - quantile) * (count - 1)
    low, frac = math.floor(position), position - math.floor(position)
    high = min(low + 1, count - 1)
    lower, upper = top[:, count - 1 - low], top[:, count - 1 - high]
    level = lower + frac * (upper - lower)
    saturated = (level >= top[:, 0]) & (top[:, 0] > minimum)
    below_maximum = torch.nextafter(top[:, 0], torch.tensor(-float("inf"), dtype=top.dtype, device=top.device))
    return torch.where(saturated, below_maximum, level)


def quantile_thresholds(maps: torch.Tensor, quantile: float = 0.005, *, chunk: int = 64) -> torch.Tensor:
    """T_u such that filter u exceeds it with probability ``quantile`` over all positions.

    The (1 − quantile) quantile with linear interpolation, as numpy.quantile computes
    it, per filter over every position of every image.

    A filter that sits at its maximum on more than ``quantile`` of the positions (a
    ReLU6 filter saturated at 6, say) has its quantile *at* that maximum, and nothing
    exceeds it: every region {F_u > T_u} would be empty, so the filter would be named
    from all-zero inputs and never reach ground truth or qualify an image. For such a
    filter T_u is the largest float below its maximum, so its region is where it
    saturates. Constant filters keep T_u = their value (an empty region).

    (N, d, h, w) -> (d,)
    """
    _check_quantile(quantile)
    n, d = maps.shape[0], maps.shape[1]
    count = n * maps.shape[2] * maps.shape[3]
    keep = count - math.floor((1 - quantile) * (count - 1))
    thresholds = torch.empty(d, dtype=maps.dtype, device=maps.device)
    for start in range(0, d, chunk):  # chunks of filters bound the memory of the copy
        values = maps[:, start : start + chunk].transpose(0, 1).reshape(-1, count)
        top = torch.topk(values, keep, dim=1, sorted=True).values  # descending
        thresholds[start : start + chunk] = _thresholds_from_top(top, count, quantile, values.amin(dim=1))
    return thresholds


class ThresholdTally:
    """:func:`quantile_thresholds` over maps that arrive in batches (a dataset too large
    to hold): each filter's largest values and its minimum.

    ``positions`` bounds how many positions (images × h × w) will be added; it sets how
    many values are kept per filter, about ``quantile`` of them. The result equals
    quantile_thresholds of all the batches concatenated. Once ``keep`` values are held,
    a batch contributes only what exceeds each filter's smallest kept value (an equal
    value would not change the kept values), and those are merged in when they add up
    to ``keep`` more, so each value is sorted about once rather than once per batch.
    """

    def __init__(self, quantile: float, positions: int) -> None:
        _check_quantile(quantile)
        self.quantile = quantile
        self.keep = max(1, math.ceil(quantile * positions) + 2)
        self.count = 0
        self.top: torch.Tensor | None = None  # (d, ≤ keep) descending
        self.minimum: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_width = 0

    def add(self, maps: torch.Tensor) -> None:
        """Count a batch of maps. (n, d, h, w)"""
        values = maps.transpose(0, 1).flatten(1)  # (d, n·h·w)
        low = values.amin(dim=1)
        self.minimum = low if self.minimum is None else torch.minimum(self.minimum, low)
        self.count += values.shape[1]
        if self.top is not None and self.top.shape[1] == self.keep:
            above = int((values > self.top[:, -1:]).sum(dim=1).max())  # the most any filter brings
            if above == 0:
                return
            values = values.topk(above, dim=1).values
        self._pending.append(values)
        self._pending_width += values.shape[1]
        if self.top is None or self.top.shape[1] < self.keep or self._pending_width >= self.keep:
            self._merge()

    def _merge(self) -> None:
        merged = torch.cat(([] if self.top is None else [self.top]) + self._pending, dim=1)
        self.top = merged.topk(min(self.keep, merged.shape[1]), dim=1, sorted=True).values
        self._pending, self._pending_width = [], 0

    def thresholds(self) -> torch.Tensor:
        """(d,) T_u of everything added."""
        if self.top is None:
            raise LaviseError("No feature maps were counted, so there are no thresholds.")
        if self._pending:
            self._merge()
        needed = self.count - math.floor((1 - self.quantile) * (self.count - 1))
        if needed > self.top.shape[1]:
            raise LaviseError(f"More positions were added ({self.count}) than the tally was sized for.")
        return _thresholds_from_top(self.top, self.count, self.quantile, self.minimum)


def peak_activations(maps: torch.Tensor) -> torch.Tensor:
    """Each filter's maximum over the positions of each image: what ranks a filter's top
    images, and what qualifies an image when it exceeds T_u.

    (N, d, h, w) -> (N, d)
    """
    return maps.flatten(2).amax(dim=2)


def active_region(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1[F_u > T_u] on the feature grid, in the maps' dtype.

    (n, ...) maps, (n,) one threshold per row -> (n, ...)
    """
    return (maps > thresholds.reshape(-1, *([1] * (maps.dim() - 1)))).to(maps.dtype)


def upsampled_regions(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where maps upsampled bilinearly to ``size`` exceed their thresholds.

    ``thresholds`` broadcasts against the first two axes: (c,), one per channel, or
    (n, c), one per map.

    (n, c, h, w), (c,) or (n, c) -> (n, c, H, W) bool
    """
    upsampled = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return upsampled > thresholds.float()[..., None, None]


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize soft masks to the feature grid by area averaging.

    A cell's value is the share of it the mask covers, so an object smaller than one
    cell keeps a small positive weight instead of vanishing.

    (m, H, W) -> (m, h, w)
    """
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), grid).squeeze(1)


def strongest_regions(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor, count: int) -> torch.Tensor:
    """Activation regions inside a concept's mask, shaped like explain's inputs.

    For each (image, mask) pair: the ``count`` filters whose mean inside the mask (the
    cells it covers at least half of) is highest, and for each the cells of the mask
    where that filter exceeds its T_u. Pooling the features over such a region gives a
    training row like the input activation masking makes at inference. A region may be
    empty (the filter peaks elsewhere, or the mask covers no cell by half).

    (n, d, h, w), (n, h, w) mask coverage, (d,), count -> (n, count, h, w) 0/1 in the maps' dtype
    """
    n, d, h, w = maps.shape
    flat = maps.flatten(2)  # (n, d, hw)
    inside = (masks >= 0.5).flatten(1)  # (n, hw)
    cells = inside.to(maps.dtype)
    inside_mean = torch.bmm(flat, cells.unsqueeze(2)).squeeze(2) / cells.sum(dim=1, keepdim=True).clamp_min(1.0)
    strongest = inside_mean.topk(min(count, d), dim=1).indices  # (n, k)
    target = flat.gather(1, strongest.unsqueeze(2).expand(-1, -1, h * w))  # (n, k, hw)
    region = (target > thresholds[strongest].unsqueeze(2)) & inside.unsqueeze(1)
    return region.reshape(n, -1, h, w).to(maps.dtype)

