"""Thresholds T_u, the streaming tally, and regions on the feature grid, against what they mean."""

from __future__ import annotations

import pytest
import torch

from lavise.errors import LaviseError
from lavise.regions import ThresholdTally, masks_to_grid, quantile_thresholds, strongest_regions


def test_masks_to_grid_area_semantics():
    masks = torch.zeros(2, 10, 8)
    masks[0, :5, :4] = 1  # exactly the top-left cell of a 2x2 grid
    masks[1, 0, 0] = 1  # one pixel of 20 in a cell
    grid = masks_to_grid(masks, (2, 2))
    torch.testing.assert_close(grid[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(grid[1], torch.tensor([[1 / 20, 0.0], [0.0, 0.0]]))
    # uint8 masks are accepted and the total area is kept
    as_bytes = masks_to_grid(masks.to(torch.uint8), (2, 2))
    torch.testing.assert_close(as_bytes, grid)
    torch.testing.assert_close(grid.sum(dim=(1, 2)) * 20, masks.sum(dim=(1, 2)))


def test_strongest_regions_by_hand():
    """Filters ranked by their mean inside the mask; regions are their active cells inside it."""
    maps = torch.tensor([[
        [[5.0, 0.0], [0.0, 0.0]],  # filter 0: mean 5/3 inside the mask
        [[1.0, 1.0], [1.0, 1.0]],  # filter 1: mean 1
        [[0.0, 4.0], [9.0, 4.0]],  # filter 2: mean 8/3 inside; its 9 lies outside the mask
    ]])
    coverage = torch.tensor([[[1.0, 1.0], [0.4, 0.6]]])  # inside: the cells covered at least half
    thresholds = torch.tensor([1.0, 0.5, 3.0])
    regions = strongest_regions(maps, coverage, thresholds, 2)
    expected = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # filter 2, then filter 0
    assert torch.equal(regions, expected)
    assert strongest_regions(maps, coverage, thresholds, 5).shape == (1, 3, 2, 2)  # at most d regions
    assert strongest_regions(maps, coverage * 0.3, thresholds, 2).sum() == 0  # no cell covered by half: empty


@pytest.mark.parametrize("quantile", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("batch", [1, 4, 11])
def test_threshold_tally_equals_quantile_thresholds(quantile, batch):
    """Merging batches keeps exactly what the thresholds of all the maps at once need."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.randn(23, 7, 3, 5, generator=generator).clamp_min(0)  # ties at 0
    maps[:, 1] = maps[:, 1].clamp(max=0.2)  # saturated on most positions
    maps[:, 2] = 1.5  # constant
    maps[:, 3] = maps[:, 3].round()  # many ties
    tally = ThresholdTally(quantile, positions=maps.shape[0] * 15 + 40)  # a generous bound is fine
    for part in maps.split(batch):
        tally.add(part)
    assert torch.equal(tally.thresholds(), quantile_thresholds(maps, quantile))


def test_threshold_tally_refuses_what_it_cannot_do():
    with pytest.raises(LaviseError, match="quantile must be in"):
        ThresholdTally(1.0, positions=10)
    with pytest.raises(LaviseError, match="No feature maps"):
        ThresholdTally(0.1, positions=10).thresholds()
    tally = ThresholdTally(0.5, positions=4)  # sized for 4 positions
    tally.add(torch.rand(5, 2, 2, 2))  # 20
    with pytest.raises(LaviseError, match="sized for"):
        tally.thresholds()


@pytest.mark.parametrize("bins,budget", [(4, 5), (16, 40), (2048, 10**6)])
def test_quantile_refiner_is_exact_in_passes(bins, budget):
    """Histogram passes narrow down to the same T_u as sorting every value, ties and saturation included."""
    from lavise.regions import QuantileRefiner

    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(200, 6, 3, 5, generator=generator).clamp_min(0).round(decimals=1)
    maps[:, 2] = 1.5  # constant
    maps[:, 3] = maps[:, 3].clamp(max=0.2)  # saturated
    maps[:, 4] = torch.randn(200, 3, 5, generator=generator)  # no ties
    values = maps.transpose(0, 1).flatten(1)
    refiner = QuantileRefiner(0.005, values.amin(dim=1), values.amax(dim=1), values.shape[1], budget_values=budget, bins=bins)
    passes = 0
    while True:
        for part in maps.split(17):
            refiner.add(part)
        passes += 1
        if not refiner.next_pass():
            break
    assert torch.equal(refiner.thresholds(), quantile_thresholds(maps, 0.005))
    assert 2 <= passes <= 5
