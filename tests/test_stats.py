"""The statistics of group comparison, checked against loops, scipy and published examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from lavise.groups import group_counts
from lavise.regions import peak_activations
from lavise.stats import benjamini_hochberg, concept_evidence, fisher_exact_test, homogeneity_test, newcombe_interval, wilson_interval

# --- the mathematics, checked against loops and scipy -------------------------------------


def test_peaks_and_group_counts_equal_loops():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(9, 5, 3, 4, generator=generator)
    peaks = peak_activations(maps)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    thresholds = torch.rand(5, generator=generator)
    counts = group_counts(peaks > thresholds, labels, 3)
    for n in range(9):
        for u in range(5):
            assert peaks[n, u] == max(float(v) for v in maps[n, u].flatten())
    for g in range(3):
        for u in range(5):
            expected = sum(1 for n in range(9) if labels[n] == g and float(maps[n, u].max()) > float(thresholds[u]))
            assert counts[g, u] == expected


def test_wilson_interval_equals_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1), (250, 1000)]:
        for confidence in (0.9, 0.95, 0.99):
            low, high = wilson_interval(np.array([k]), np.array([n]), confidence)
            expected = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert low[0] == pytest.approx(expected.low, abs=1e-12)
            assert high[0] == pytest.approx(expected.high, abs=1e-12)


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 − 48/80, method 10.
    low, high = newcombe_interval(np.array([56]), np.array([70]), np.array([48]), np.array([80]))
    assert low[0] == pytest.approx(0.0524, abs=1e-4) and high[0] == pytest.approx(0.3339, abs=1e-4)
    # it always holds the observed difference, also at the edges
    k1, k2 = np.array([0, 5, 20, 0]), np.array([0, 0, 3, 20])
    low, high = newcombe_interval(k1, np.full(4, 20), k2, np.full(4, 20))
    difference = k1 / 20 - k2 / 20
    assert np.all(low <= difference) and np.all(difference <= high) and np.all(low >= -1) and np.all(high <= 1)


def test_homogeneity_test_equals_scipy_and_the_z_test():
    counts = np.array([[12, 0, 30, 5, 40], [3, 0, 28, 15, 40], [7, 0, 10, 9, 40]])
    sizes = np.array([40, 50, 45])
    counts[1, 4], counts[2, 4] = 50, 45  # filter 4 qualifies every image
    statistic, p_values, residuals = homogeneity_test(counts, sizes)
    for u in range(5):
        table = np.stack([counts[:, u], sizes - counts[:, u]], axis=1)
        if table[:, 0].sum() in (0, sizes.sum()):
            assert statistic[u] == 0 and p_values[u] == 1 and np.all(residuals[:, u] == 0)
            continue
        chi2, p, _, expected = stats.chi2_contingency(table, correction=False)
        assert statistic[u] == pytest.approx(chi2) and p_values[u] == pytest.approx(p)
        # Haberman's adjusted residuals of the "qualified" column
        total = sizes.sum()
        adjusted = (table[:, 0] - expected[:, 0]) / np.sqrt(
            expected[:, 0] * (1 - sizes / total) * (1 - table[:, 0].sum() / total)
        )
        np.testing.assert_allclose(residuals[:, u], adjusted)
    # two groups: the first residual is the pooled two-proportion z statistic
    two = counts[:2, :4]
    _, p_two, z = homogeneity_test(two, sizes[:2])
    for u in (0, 2, 3):
        p1, p2 = two[0, u] / 40, two[1, u] / 50
        pooled = (two[0, u] + two[1, u]) / 90
        expected_z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / 40 + 1 / 50))
        assert z[0, u] == pytest.approx(expected_z) and z[1, u] == pytest.approx(-expected_z)
        assert p_two[u] == pytest.approx(2 * stats.norm.sf(abs(expected_z)))


def test_fisher_exact_test_equals_scipy():
    rng = np.random.default_rng(0)
    n1, n2 = 23, 31
    k1 = np.concatenate([rng.integers(0, n1 + 1, 40), [0, n1, 0, 11]])
    k2 = np.concatenate([rng.integers(0, n2 + 1, 40), [0, n2, n2, 15]])
    got = fisher_exact_test(k1, n1, k2, n2, chunk=7)
    for u in range(len(k1)):
        expected = stats.fisher_exact([[k1[u], n1 - k1[u]], [k2[u], n2 - k2[u]]]).pvalue
        assert got[u] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_benjamini_hochberg_equals_its_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001, 0.04, 0.9])
    m = len(p)
    expected = np.empty(m)
    for i in range(m):  # q_i = min over j with p_j >= p_i of p_j · m / rank_j
        expected[i] = min(min(1.0, p[j] * m / (np.sum(p <= p[j]))) for j in range(m) if p[j] >= p[i])
    np.testing.assert_allclose(benjamini_hochberg(p), expected)


def test_concept_evidence_by_hand():
    words = [["dog", "cat"], ["dog"], ["car"], [], ["dog", "dog"]]  # a word counts once per filter
    residuals = np.array([[4.0, 2.0, -3.0, 0.0, 3.0], [-4.0, -2.0, 3.0, 0.0, -3.0]])
    named = np.array([True, True, True, False, True])
    found, members, evidence = concept_evidence(words, residuals, named)
    assert found == ["dog", "cat", "car"] and members == [[0, 1, 4], [0], [2]]
    mean, spread = residuals[0, named].mean(), residuals[0, named].std()  # 1.5, 2.693
    assert evidence[0, 0] == pytest.approx(((4 - mean) + (2 - mean) + (3 - mean)) / spread / np.sqrt(3))
    assert evidence[2, 0] == pytest.approx((-3 - mean) / spread) and evidence[2, 1] == pytest.approx(-evidence[2, 0])
