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

    def state(self) -> dict[str, torch.Tensor]:
        """What another tally needs to merge this one in (:meth:`merge`)."""
        if self._pending:
            self._merge()
        if self.top is None:
            return {"count": torch.tensor([self.count])}
        return {"count": torch.tensor([self.count]), "top": self.top, "minimum": self.minimum}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Fold in another tally's :meth:`state` (of the same quantile and positions bound).

        Exact: the merged tally equals one that had seen both tallies' maps, in any order.
        """
        self.count += int(state["count"][0])
        if "top" not in state:
            return
        device = state["top"].device if self.top is None else self.top.device
        top, minimum = state["top"].to(device), state["minimum"].to(device)
        self.minimum = minimum if self.minimum is None else torch.minimum(self.minimum, minimum)
        self._pending.append(top)
        self._merge()

    @property
    def maximum(self) -> torch.Tensor | None:
        """(d,) each filter's largest value so far."""
        if self._pending:
            self._merge()
        return None if self.top is None else self.top[:, 0]

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


class QuantileRefiner:
    """:func:`quantile_thresholds` in bounded memory, over several passes, for sets whose
    :class:`ThresholdTally` would not fit: 0.5 % of every position of every image.

    Each pass histograms, per filter, the values inside the current interval (first
    [min, max], known from the tally's extremes or a first pass) into ``bins`` bins; the
    bins holding the two order statistics the interpolation needs become the next
    interval. Once the values left fit ``budget_values`` (summed over filters), a last
    pass collects them and the thresholds are exact: the same as quantile_thresholds.
    A value belongs to the interval of a level when it falls in the chosen bins of every
    level before, computed the same way each pass, so no value is lost at a bin edge.
    Histograms and collected values merge over ranks (:meth:`state`, :meth:`merge`).
    """

    def __init__(self, quantile: float, minimum: torch.Tensor, maximum: torch.Tensor, count: int,
                 budget_values: int, bins: int = 2048) -> None:
        _check_quantile(quantile)
        self.quantile, self.count, self.bins, self.budget = quantile, count, bins, max(1, budget_values)
        self.minimum, self.maximum = minimum.double(), maximum.double()
        position = (1 - quantile) * (count - 1)
        self.low, self.frac = math.floor(position), position - math.floor(position)
        self.high = min(self.low + 1, count - 1)
        self.levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.below = torch.zeros(len(minimum), dtype=torch.int64)  # values under the current interval
        self.interval = (self.minimum.clone(), self.maximum.clone())
        self.collecting = False
        self._reset()

    def _reset(self) -> None:
        d = len(self.minimum)
        self.histogram = torch.zeros(d, self.bins, dtype=torch.int64)
        self.smallest = torch.full((d, self.bins), float("inf"), dtype=torch.float64)  # per bin, its values' range
        self.largest = torch.full((d, self.bins), -float("inf"), dtype=torch.float64)
        self.collected: list[dict[str, torch.Tensor]] = []  # distinct (filter, value) pairs and their counts

    def _bin(self, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        width = (hi - lo).clamp_min(1e-300).unsqueeze(1)
        return ((values.double() - lo.unsqueeze(1)) / width * self.bins).floor().clamp(0, self.bins - 1).long()

    def _inside(self, values: torch.Tensor) -> torch.Tensor:
        """(d, n) whether each value lies in the chosen bins of every level so far."""
        inside = torch.ones_like(values, dtype=torch.bool)
        for lo, hi, first, last in self.levels:
            b = self._bin(values, lo, hi)
            inside &= (b >= first.unsqueeze(1)) & (b <= last.unsqueeze(1))
        return inside

    def add(self, maps: torch.Tensor) -> None:
        """Count a batch of maps in this pass. (n, d, h, w)"""
        values = maps.transpose(0, 1).flatten(1).cpu()  # (d, n·h·w)
        inside = self._inside(values)
        if self.collecting:
            filters = torch.arange(values.shape[0]).unsqueeze(1).expand_as(values)
            self.collected.append(_distinct(filters[inside], values[inside].double(), None))
            return
        lo, hi = self.interval
        b = self._bin(values, lo, hi)
        b = torch.where(inside, b, torch.full_like(b, self.bins))  # out of the interval: a bin past the end
        d = values.shape[0]
        counts = torch.zeros(d, self.bins + 1, dtype=torch.int64).scatter_add_(1, b, torch.ones_like(b))
        self.histogram += counts[:, : self.bins]
        v = values.double()
        self.smallest = torch.minimum(self.smallest, torch.full((d, self.bins + 1), float("inf"), dtype=torch.float64)
                                      .scatter_reduce(1, b, v, "amin")[:, : self.bins])
        self.largest = torch.maximum(self.largest, torch.full((d, self.bins + 1), -float("inf"), dtype=torch.float64)
                                     .scatter_reduce(1, b, v, "amax")[:, : self.bins])

    def state(self) -> dict[str, torch.Tensor]:
        if self.collecting:
            return _distinct(*_joined(self.collected))
        return {"histogram": self.histogram, "smallest": self.smallest, "largest": self.largest}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        if "histogram" in state:
            self.histogram += state["histogram"]
            self.smallest = torch.minimum(self.smallest, state["smallest"])
            self.largest = torch.maximum(self.largest, state["largest"])
        else:
            self.collected.append(state)

    def next_pass(self) -> bool:
        """End a pass (after every rank's state is merged in); True when another pass is needed.

        Refining stops when the values left fit the budget, or after four levels (2048⁴
        narrower than the first interval: the values left are all but equal, and are
        collected as distinct values with their counts, so ties cost nothing).
        """
        if self.collecting:
            return False
        cumulative = self.histogram.cumsum(dim=1)  # (d, B)
        target_low = (self.low - self.below).unsqueeze(1)
        target_high = (self.high - self.below).unsqueeze(1)
        first = (cumulative <= target_low).sum(dim=1).clamp(max=self.bins - 1)
        last = (cumulative <= target_high).sum(dim=1).clamp(max=self.bins - 1)
        before = torch.where(first > 0, cumulative.gather(1, (first - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        kept = cumulative.gather(1, last.unsqueeze(1)).squeeze(1) - before
        lo, hi = self.interval
        self.levels.append((lo, hi, first, last))
        width = (hi - lo) / self.bins
        self.interval = (lo + first.double() * width, lo + (last + 1).double() * width)
        self.below = self.below + before
        # a filter whose chosen bins hold one value, however often, needs a single distinct value
        single = (first == last) & (self.smallest.gather(1, first.unsqueeze(1)) == self.largest.gather(1, first.unsqueeze(1))).squeeze(1)
        kept = torch.where(single, 1, kept)
        self.collecting = int(kept.sum()) <= self.budget or len(self.levels) >= 4
        self._reset()
        return True

    def thresholds(self) -> torch.Tensor:
        """(d,) T_u, after the collecting pass."""
        d = len(self.minimum)
        pairs = _distinct(*_joined(self.collected))
        filters, values, counts = pairs["filters"], pairs["values"], pairs["counts"]  # by filter, then value
        ends = counts.cumsum(0)
        starts_of_filter = torch.searchsorted(filters, torch.arange(d))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), ends])[starts_of_filter]  # values before each filter

        def ascending(rank: torch.Tensor) -> torch.Tensor:
            """The value of ascending rank ``rank`` (within the collected values) of each filter."""
            position = torch.searchsorted(ends, offsets + rank, right=True)
            return values[position.clamp(max=max(len(values) - 1, 0))]

        lower = ascending(self.low - self.below)
        upper = ascending(self.high - self.below)
        level = (lower + self.frac * (upper - lower)).float()
        maximum, minimum = self.maximum.float(), self.minimum.float()
        saturated = (level >= maximum) & (maximum > minimum)
        below_maximum = torch.nextafter(maximum, torch.tensor(-float("inf")))
        return torch.where(saturated, below_maximum, level)


def _joined(parts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not parts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return (torch.cat([p["filters"] for p in parts]), torch.cat([p["values"] for p in parts]),
            torch.cat([p["counts"] for p in parts]))


def _distinct(filters: torch.Tensor, values: torch.Tensor, counts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The distinct (filter, value) pairs, sorted by filter then value, and how many of each."""
    if counts is None:
        counts = torch.ones(len(values), dtype=torch.int64)
    if not len(values):
        return {"filters": filters.long(), "values": values.double(), "counts": counts.long()}
    pairs = torch.stack([filters.double(), values.double()], dim=1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)  # sorted lexicographically
    total = torch.zeros(len(unique), dtype=torch.int64).index_add_(0, inverse, counts.long())
    return {"filters": unique[:, 0].long(), "values": unique[:, 1], "counts": total}


def top_images(maps: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` images with the highest peak activation of each filter.

    Ties go to the earlier image, so the choice does not depend on how the images were
    batched or split among processes (:class:`RunningTopK` makes the same choice).

    (N, d, h, w) -> (d, count) image indices, most activated first
    """
    return _stable_top(peak_activations(maps).T, torch.arange(maps.shape[0]).expand(maps.shape[1], -1), count)[1]


def _stable_top(values: torch.Tensor, indices: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``count`` largest values, ties broken by the smaller index.

    (r, n) values, (r, n) indices -> (r, count) values and indices, largest first
    """
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :count]
    return values.gather(1, order), indices.gather(1, order)


class RunningTopK:
    """Each filter's ``count`` images of highest peak activation, over batches of images.

    The streaming twin of :func:`top_images`, with the same tie rule (the earlier image
    wins), so the result is the same whatever the batches and however the images were
    split among processes (:meth:`merge`).
    """

    def __init__(self, filters: int, count: int) -> None:
        self.count = count
        self.values = torch.full((filters, 0), -float("inf"))
        self.indices = torch.zeros((filters, 0), dtype=torch.int64)

    def add(self, peaks: torch.Tensor, images: torch.Tensor) -> None:
        """Count a batch: (n, d) peaks of images with (n,) indices."""
        values = torch.cat([self.values, peaks.T.to(self.values)], dim=1)
        indices = torch.cat([self.indices, images.to(torch.int64).expand(peaks.shape[1], -1)], dim=1)
        self.values, self.indices = _stable_top(values, indices, self.count)

    def state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        values = torch.cat([self.values, state["values"].to(self.values)], dim=1)
        indices = torch.cat([self.indices, state["indices"].to(self.indices)], dim=1)
        self.values, self.indices = _stable_top(values, indices, self.count)

    def result(self) -> torch.Tensor:
        """(d, k) image indices, most activated first (k = min(count, images seen))."""
        return self.indices

    def members(self) -> set[int]:
        """Every image that is among some filter's top images now."""
        return set(self.indices.flatten().tolist())


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

