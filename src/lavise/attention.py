"""The explainer's inputs: pooled masked features, filter attention and masking baselines.

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

import torch
import torch.nn.functional as F

METHODS = ("attention", "cosine-attention", "activation", "original")
_EPS = 1e-12


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize soft masks to the feature grid by area averaging.

    A cell's value is the share of it the mask covers, so an object smaller than one
    cell keeps a small positive weight instead of vanishing.

    (m, H, W) -> (m, h, w)
    """
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), grid).squeeze(1)


def masked_mean(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Global average pool of F ⊙ M: the explainer's input for each (image, mask) pair.

    (n, d, h, w), (n, h, w) -> (n, d)
    """
    return torch.einsum("ndhw,nhw->nd", maps, masks.to(maps.dtype)) / (maps.shape[-2] * maps.shape[-1])


def region_mean(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each filter inside a region: Σ F ⊙ W / Σ W.

    Unlike :func:`masked_mean` it does not shrink with the region's area, so a small
    region and a large one give vectors of the same scale.

    (n, d, h, w), (n, h, w) -> (n, d)
    """
    weights = weights.to(maps.dtype)
    total = weights.flatten(1).sum(dim=1).clamp_min(_EPS).unsqueeze(1)  # (n, 1)
    return torch.einsum("ndhw,nhw->nd", maps, weights) / total


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
