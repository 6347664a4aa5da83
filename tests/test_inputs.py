"""The explainer inputs of every method against literal loops over the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lavise.inputs import METHODS, explainer_inputs, masked_mean

N, D, H, W = 3, 6, 5, 4


@pytest.fixture
def maps() -> torch.Tensor:
    """Non-negative maps, sparse like ReLU outputs, with one filter dead on one image."""
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(N, D, H, W, generator=generator, dtype=torch.float64).clamp_min(0)
    values[1, 4] = 0.0  # filter 4 never fires on image 1
    return values


@pytest.fixture
def thresholds(maps) -> torch.Tensor:
    # between the smallest and largest value of each filter, so the region is partial
    generator = torch.Generator().manual_seed(8)
    return torch.rand(D, generator=generator, dtype=torch.float64) * maps.amax(dim=(0, 2, 3)) * 0.8


def _cells(f: torch.Tensor) -> list[float]:
    return [float(f[y, x]) for y in range(f.shape[0]) for x in range(f.shape[1])]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _literal(method: str, maps: torch.Tensor, thresholds: torch.Tensor, i: int, u: int) -> list[float]:
    """input_k for every filter k, for target filter u on image i, straight from the text."""
    hw = maps.shape[2] * maps.shape[3]
    fu = _cells(maps[i, u])
    norm_u = math.sqrt(_dot(fu, fu))
    out = []
    for k in range(maps.shape[1]):
        fk = _cells(maps[i, k])
        mean_k = sum(fk) / hw
        if method == "attention":  # <F_k, F_u> / (||F_u|| * h * w)
            value = _dot(fk, fu) / (norm_u * hw) if norm_u > 0 else 0.0
        elif method == "cosine-attention":  # cos(F_u, F_k) * mean(F_k)
            norm_k = math.sqrt(_dot(fk, fk))
            cosine = _dot(fk, fu) / (norm_k * norm_u) if norm_k > 0 and norm_u > 0 else 0.0
            value = cosine * mean_k
        elif method == "activation":  # mean(F_k * 1[F_u > T_u])
            value = sum(a * (1.0 if b > float(thresholds[u]) else 0.0) for a, b in zip(fk, fu)) / hw
        elif method == "original":  # mean(F_k)
            value = mean_k
        else:
            raise AssertionError(method)
        out.append(value)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_batched_inputs_equal_the_literal_definitions(method, maps, thresholds):
    active = (maps > thresholds[None, :, None, None]).double().mean(dim=(2, 3))  # (N, D)
    assert ((active > 0) & (active < 1)).sum() >= N * D // 2  # regions are partial, not trivial
    pairs = [(i, u) for i in range(N) for u in range(D)]
    images = torch.tensor([i for i, _ in pairs])
    filters = torch.tensor([u for _, u in pairs])
    for dtype in (torch.float64, torch.float32):
        batched = explainer_inputs(method, maps[images].to(dtype), filters, thresholds.to(dtype), pooling="mean")
        assert batched.shape == (len(pairs), D) and batched.dtype == dtype
        expected = torch.tensor([_literal(method, maps, thresholds, i, u) for i, u in pairs], dtype=dtype)
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_pairs_are_independent_of_their_batch(method, maps, thresholds):
    """Any subset and order of (image, filter) pairs gives the same rows."""
    images = torch.tensor([2, 0, 2, 1])
    filters = torch.tensor([5, 0, 1, 4])
    together = explainer_inputs(method, maps[images], filters, thresholds, pooling="mean")
    for row in range(4):
        alone = explainer_inputs(method, maps[images[row : row + 1]], filters[row : row + 1], thresholds, pooling="mean")
        torch.testing.assert_close(together[row : row + 1], alone)


def test_methods_differ_where_they_should(maps, thresholds):
    images, filters = torch.tensor([0, 0]), torch.tensor([0, 1])
    results = {m: explainer_inputs(m, maps[images], filters, thresholds, pooling="mean") for m in METHODS}
    # only "original" ignores the target filter
    torch.testing.assert_close(results["original"][0], results["original"][1])
    for method in ("attention", "cosine-attention", "activation"):
        assert not torch.allclose(results[method][0], results[method][1]), method
    # the dead filter gives zeros under attention, not NaN
    dead = explainer_inputs("attention", maps[torch.tensor([1])], torch.tensor([4]), thresholds, pooling="mean")
    assert torch.equal(dead, torch.zeros_like(dead))


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown method 'gradcam'"):
        explainer_inputs("gradcam", torch.zeros(1, 2, 2, 2), torch.tensor([0]), torch.zeros(2), pooling="mean")


def test_masked_mean_is_the_mean_of_the_product(maps):
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(N, H, W, generator=generator, dtype=torch.float64)
    result = masked_mean(maps, masks)
    assert result.shape == (N, D)
    for n in range(N):
        for k in range(D):
            product = _cells(maps[n, k] * masks[n])
            assert float(result[n, k]) == pytest.approx(sum(product) / (H * W), abs=1e-12)
    # a mask of ones is the plain average pool; an empty one gives zero
    torch.testing.assert_close(masked_mean(maps, torch.ones(N, H, W)), maps.mean(dim=(2, 3)))
    assert torch.equal(masked_mean(maps, torch.zeros(N, H, W)), torch.zeros(N, D, dtype=maps.dtype))


def _literal_region(method: str, maps: torch.Tensor, thresholds: torch.Tensor, i: int, u: int) -> list[float]:
    """Region pooling, literally: the weighted mean of F_k under u's region (or u's map)."""
    fu = _cells(maps[i, u])
    if method == "activation":
        weights = [1.0 if b > float(thresholds[u]) else 0.0 for b in fu]
    else:  # attention: u's map, rectified, as soft weights
        weights = [max(b, 0.0) for b in fu]
    total = sum(weights)
    out = []
    for k in range(maps.shape[1]):
        fk = _cells(maps[i, k])
        out.append(_dot(fk, weights) / total if total > 0 else 0.0)
    return out


@pytest.mark.parametrize("method", ["attention", "activation"])
def test_region_pooling_matches_the_literal_weighted_mean(method, maps, thresholds):
    filters = torch.tensor([0, 4, 2])
    images = torch.tensor([0, 1, 2])
    batched = explainer_inputs(method, maps[images], filters, thresholds, pooling="region")
    for n in range(3):
        expected = torch.tensor(_literal_region(method, maps, thresholds, int(images[n]), int(filters[n])), dtype=maps.dtype)
        assert torch.allclose(batched[n], expected, atol=1e-10), (method, n)


def test_region_pooling_does_not_shrink_with_the_region():
    maps = torch.ones(2, 3, 4, 4)
    maps[0, 0, :1, :1] = 5.0  # a one-cell region
    maps[1, 0, :, :2] = 5.0  # a half-map region
    filters, thresholds = torch.tensor([0, 0]), torch.tensor([2.0, 2.0, 2.0])
    region = explainer_inputs("activation", maps, filters, thresholds, pooling="region")
    mean = explainer_inputs("activation", maps, filters, thresholds, pooling="mean")
    assert torch.allclose(region[0], region[1])  # both regions hold the same values
    assert mean[1, 1] == pytest.approx(8 * mean[0, 1])  # the whole-grid mean scales with the area
    with pytest.raises(ValueError, match="pooling"):
        explainer_inputs("activation", maps, filters, thresholds, pooling="max")
