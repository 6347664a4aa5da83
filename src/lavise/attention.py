"""The explainer's inputs: pooled masked features, filter attention and masking baselines,
and the thresholds T_u that define a filter's active region.

Pure tensor functions. Every explainer input is a d-vector: the explainer pools first,
so Exp(F ⊙ M) depends on F and M only through mean_hw(F ⊙ M). For a target filter u the
methods differ only in the spatial weight w (h·w values) applied to every filter's map:

    attention          w = F_u / ‖F_u‖                 input_k = <F_k, F_u> / (‖F_u‖·hw)
    activation         w = 1[F_u > T_u]                input_k = mean(F_k ⊙ 1[F_u > T_u])
    original           w = 1                           input_k = mean(F_k)
    cosine-attention   (a scalar per k, the paper's equation)
                                                       input_k = cos(F_u, F_k) · mean(F_k)

``attention`` is the spatial form of the authors' code and the paper's prose;
``cosine-attention`` is the paper's equation taken literally. Each is a row of a Gram
matrix F·Fᵀ (or of M·Fᵀ). Explaining needs filter u only on its p most activated
images, so the functions take (image, filter) pairs and compute just those rows: the
same numbers as the full (d, d) matrix per image at 1/d of the cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lavise.errors import LaviseError

METHODS = ("attention", "cosine-attention", "activation", "original")
_EPS = 1e-12


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



def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize soft masks to the feature grid by area averaging.

    A cell's value is the share of it the mask covers, so an object smaller than one
    cell keeps a small positive weight instead of vanishing.

    (m, H, W) -> (m, h, w)
    """
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), grid).squeeze(1)


def masked_mean(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Global average pool of F ⊙ M: the explainer's input for each (image, mask) pair,
    or for each of several masks per image.

    (n, d, h, w), (n, h, w) -> (n, d); (n, d, h, w), (n, k, h, w) -> (n, k, d)
    """
    return torch.einsum("ndhw,n...hw->n...d", maps, masks.to(maps.dtype)) / (maps.shape[-2] * maps.shape[-1])


def region_mean(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each filter inside a region: Σ F ⊙ W / Σ W.

    Unlike :func:`masked_mean` it does not shrink with the region's area, so a small
    region and a large one give vectors of the same scale.

    (n, d, h, w), (n, h, w) -> (n, d)
    """
    weights = weights.to(maps.dtype)
    total = weights.flatten(1).sum(dim=1).clamp_min(_EPS).unsqueeze(1)  # (n, 1)
    return torch.einsum("ndhw,nhw->nd", maps, weights) / total


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
    """:func:`quantile_thresholds` over maps that arrive in batches (a reference set too
    large to hold): each filter's largest values and its minimum.

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


def _pair_rows(maps: torch.Tensor, filters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened maps and the target filter's flattened map of each pair.

    (n, d, h, w), (n,) -> (n, d, hw), (n, hw)
    """
    flat = maps.flatten(2)
    target = flat[torch.arange(flat.shape[0], device=flat.device), filters]
    return flat, target


def _active_region(target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1[F_u > T_u] for each pair, in the maps' dtype. (n, hw), (n,) -> (n, hw)"""
    return (target > thresholds.unsqueeze(1)).to(target.dtype)


def spatial_attention(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """input_k = <F_k, F_u> / (‖F_u‖ · hw) for each pair (image n, filter u = filters[n]).

    (n, d, h, w), (n,) -> (n, d)
    """
    flat, target = _pair_rows(maps, filters)
    norms = target.norm(dim=1, keepdim=True).clamp_min(_EPS)  # (n, 1)
    return torch.bmm(flat, target.unsqueeze(2)).squeeze(2) / (norms * flat.shape[2])


def cosine_attention(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """input_k = cos(F_u, F_k) · mean(F_k): the paper's equation, a scalar per filter k.

    (n, d, h, w), (n,) -> (n, d)
    """
    flat, target = _pair_rows(maps, filters)
    dots = torch.bmm(flat, target.unsqueeze(2)).squeeze(2)  # (n, d)
    norms = flat.norm(dim=2)  # (n, d)
    target_norms = target.norm(dim=1, keepdim=True)  # (n, 1)
    cosine = dots / (norms * target_norms).clamp_min(_EPS)
    return cosine * flat.mean(dim=2)


def activation_masking(maps: torch.Tensor, filters: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """input_k = mean(F_k ⊙ 1[F_u > T_u]): every filter pooled under u's active region.

    (n, d, h, w), (n,), (d,) -> (n, d)
    """
    flat, target = _pair_rows(maps, filters)
    region = _active_region(target, thresholds[filters])
    return torch.bmm(flat, region.unsqueeze(2)).squeeze(2) / flat.shape[2]


def original(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """input_k = mean(F_k): no mask, the same for every filter.

    (n, d, h, w), (n,) -> (n, d)
    """
    return maps.flatten(2).mean(dim=2)


def region_attention(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """input_k = <F_k, F_u⁺> / Σ F_u⁺: every filter averaged under u's map as soft weights.

    (n, d, h, w), (n,) -> (n, d)
    """
    flat, target = _pair_rows(maps, filters)
    weights = target.clamp_min(0)
    return torch.bmm(flat, weights.unsqueeze(2)).squeeze(2) / weights.sum(dim=1, keepdim=True).clamp_min(_EPS)


def region_activation_masking(maps: torch.Tensor, filters: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """input_k = mean of F_k over u's active region {F_u > T_u} (not over the whole map).

    (n, d, h, w), (n,), (d,) -> (n, d)
    """
    flat, target = _pair_rows(maps, filters)
    region = _active_region(target, thresholds[filters])
    return torch.bmm(flat, region.unsqueeze(2)).squeeze(2) / region.sum(dim=1, keepdim=True).clamp_min(1.0)


POOLINGS = ("mean", "region")


def explainer_inputs(
    method: str, maps: torch.Tensor, filters: torch.Tensor, thresholds: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """Dispatch to one method. (n, d, h, w), (n,), (d,) -> (n, d)

    ``pooling`` must match how the run's explainer was trained: ``mean`` averages the
    masked map over the whole grid (the authors' code), ``region`` over the mask.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling '{pooling}'; valid: {', '.join(POOLINGS)}.")
    if pooling == "region" and method == "attention":
        return region_attention(maps, filters)
    if pooling == "region" and method == "activation":
        return region_activation_masking(maps, filters, thresholds)
    if method == "attention":
        return spatial_attention(maps, filters)
    if method == "cosine-attention":
        return cosine_attention(maps, filters)
    if method == "activation":
        return activation_masking(maps, filters, thresholds)
    if method == "original":
        return original(maps, filters)
    raise ValueError(f"Unknown method '{method}'; valid: {', '.join(METHODS)}.")


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
