"""The explainer's inputs: one d-vector per (image, mask) or per (image, filter) pair.

Pure tensor functions. The explainer head pools first, so Exp(F ⊙ M) depends on F and
M only through a pooled d-vector. Two poolings exist (``TrainSettings.pooling``; explain
pools the way the run was trained):

- ``region`` (lavise's default): the mean of each filter inside the mask or weight,
  Σ F_k ⊙ W / Σ W, so a small region and a large one give vectors of one scale;
- ``mean`` (the authors' code): the global average of F_k ⊙ W over the whole grid,
  Σ F_k ⊙ W / hw, which shrinks with the region's area.

Training pools each concept's mask (:func:`masked_mean`; dividing by the mask's area
gives ``region``). To name filter u on an image, the methods differ in the spatial
weight W applied to every filter's map:

    activation         W = 1[F_u > T_u]                    activation masking
    attention          W = F_u (mean: / ‖F_u‖; region: F_u⁺)   the spatial filter attention of the
                                                           authors' code and the paper's prose
    original           W = 1                               no mask: the same for every filter
    cosine-attention   input_k = cos(F_u, F_k) · mean(F_k)  the paper's equation read literally,
                                                           a scalar per filter k

Each is a row of a Gram matrix F·Fᵀ (or of W·Fᵀ). Naming needs filter u only on its p
most activated images, so the functions take (image, filter) pairs and compute just
those rows: the same numbers as the full (d, d) matrix per image at 1/d of the cost.
"""

from __future__ import annotations

import torch

from lavise.regions import active_region
from lavise.settings import METHODS, POOLINGS

__all__ = [
    "METHODS",
    "POOLINGS",
    "activation_masking",
    "cosine_attention",
    "explainer_inputs",
    "masked_mean",
    "original",
    "region_activation_masking",
    "region_attention",
    "spatial_attention",
]

_EPS = 1e-12


def masked_mean(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Global average pool of F ⊙ M: the explainer's input for each (image, mask) pair,
    or for each of several masks per image.

    (n, d, h, w), (n, h, w) -> (n, d); (n, d, h, w), (n, k, h, w) -> (n, k, d)
    """
    return torch.einsum("ndhw,n...hw->n...d", maps, masks.to(maps.dtype)) / (maps.shape[-2] * maps.shape[-1])


def _pair_rows(maps: torch.Tensor, filters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened maps and the target filter's flattened map of each pair.

    (n, d, h, w), (n,) -> (n, d, hw), (n, hw)
    """
    flat = maps.flatten(2)
    target = flat[torch.arange(flat.shape[0], device=flat.device), filters]
    return flat, target


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
    region = active_region(target, thresholds[filters])
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
    region = active_region(target, thresholds[filters])
    return torch.bmm(flat, region.unsqueeze(2)).squeeze(2) / region.sum(dim=1, keepdim=True).clamp_min(1.0)


def explainer_inputs(
    method: str, maps: torch.Tensor, filters: torch.Tensor, thresholds: torch.Tensor, pooling: str
) -> torch.Tensor:
    """Dispatch to one method. (n, d, h, w), (n,), (d,) -> (n, d)

    ``pooling`` must be the one the run's explainer was trained with (``Run.pooling``).
    ``cosine-attention`` and ``original`` pool over the whole grid either way.
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
