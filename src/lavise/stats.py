"""The statistics of a group comparison: pure NumPy and SciPy on counts.

For shares of qualified images per group and filter: Wilson intervals of one share,
Newcombe's hybrid score interval of a difference, Pearson's chi-square test of
homogeneity with its adjusted residuals (the two-proportion z-test for two groups),
Fisher's exact test, Benjamini–Hochberg q-values, and Stouffer's combination of the
filters' evidence per concept word. Vectorised over filters throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def wilson_interval(k: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion k/n, elementwise.

    (...), (...) -> (...) low, (...) high

    Example:
        >>> low, high = wilson_interval(np.array([0]), np.array([10]))
        >>> float(low[0]), round(float(high[0]), 4)
        (0.0, 0.2775)
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z = _normal_quantile(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_interval(
    k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval for p1 - p2 (his method 10), elementwise.

    (...) ×4 -> (...) low, (...) high
    """
    p1, p2 = np.asarray(k1, np.float64) / n1, np.asarray(k2, np.float64) / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    difference = p1 - p2
    low = difference - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = difference + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return low, high


def homogeneity_test(counts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson's chi-square test that every group has the same share, per filter.

    Also returns the adjusted residual of each group, (k_g − E_g) / sqrt(E_g (1 − n_g/N)
    (1 − K/N)): for two groups, the first group's is the two-proportion z statistic
    (p1 − p2) / sqrt(p̂ (1 − p̂) (1/n1 + 1/n2)), and the chi-square is its square. A
    filter that qualifies no image, or all of them, gets statistic 0 and p-value 1.

    (G, d) qualified counts, (G,) group sizes -> (d,) statistic, (d,) p-value, (G, d) residuals
    """
    from scipy import stats

    counts = np.asarray(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)[:, None]  # (G, 1)
    total = sizes.sum()
    pooled = counts.sum(axis=0, keepdims=True) / total  # (1, d)
    expected = sizes * pooled  # (G, d)
    variance = expected * (1 - sizes / total) * (1 - pooled)  # (G, d)
    degenerate = (pooled <= 0) | (pooled >= 1)  # (1, d)
    safe = np.where(degenerate, 1.0, variance)
    residuals = np.where(degenerate, 0.0, (counts - expected) / np.sqrt(safe))
    # Σ over both columns (qualified, not) of (O − E)² / E = Σ_g (k_g − E_g)² / (E_g (1 − p̂))
    cell = np.where(degenerate, 1.0, expected * (1 - pooled))
    statistic = np.where(degenerate, 0.0, ((counts - expected) ** 2 / cell)).sum(axis=0)
    p_value = stats.chi2.sf(statistic, df=counts.shape[0] - 1)
    return statistic, np.where(degenerate[0], 1.0, p_value), residuals


def fisher_exact_test(k1: np.ndarray, n1: int, k2: np.ndarray, n2: int, *, chunk: int = 256) -> np.ndarray:
    """Two-sided Fisher's exact test of the 2×2 tables [[k1, n1 − k1], [k2, n2 − k2]].

    The p-value sums the hypergeometric probabilities of every table with the same
    margins that is no more likely than the observed one (relative tolerance 1e-7, as
    scipy.stats.fisher_exact), for all filters at once.

    (d,), (d,) -> (d,)
    """
    from scipy import stats

    k1, k2 = np.asarray(k1, dtype=np.int64), np.asarray(k2, dtype=np.int64)
    total = n1 + n2
    support = np.arange(n1 + 1)[None, :]  # (1, n1 + 1)
    p_values = np.empty(len(k1), dtype=np.float64)
    for start in range(0, len(k1), chunk):  # chunks of filters bound the (chunk, n1 + 1) table
        qualified = (k1[start : start + chunk] + k2[start : start + chunk])[:, None]  # (c, 1)
        pmf = stats.hypergeom.pmf(support, total, qualified, n1)  # (c, n1 + 1)
        observed = np.take_along_axis(pmf, k1[start : start + chunk, None], axis=1)  # (c, 1)
        p_values[start : start + chunk] = np.where(pmf <= observed * (1 + 1e-7), pmf, 0.0).sum(axis=1)
    return np.minimum(p_values, 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of independent or positively dependent tests.

    (d,) -> (d,)
    """
    from scipy import stats

    p_values = np.asarray(p_values, dtype=np.float64)
    return stats.false_discovery_control(p_values, method="bh") if len(p_values) else p_values


def concept_evidence(
    filter_words: Sequence[Sequence[str]], residuals: np.ndarray, background: np.ndarray | None = None
) -> tuple[list[str], list[list[int]], np.ndarray]:
    """How much more the filters named by each word differ between groups than filters in general.

    Per word and group: the residuals of the word's m filters, standardised by the mean
    and standard deviation of the residuals over the ``background`` filters, summed and
    divided by √m (Stouffer's combination). A shift that moves every filter (one group's
    images are busier or brighter) cancels out, and a word that names many filters
    because it names nearly any filter scores about 0.

    Args:
        filter_words: for each of the d filters, the words that count as its concepts.
        residuals: (G, d) adjusted residual of each group for each filter.
        background: (d,) bool, the filters the standardisation is over (default: all).

    Returns:
        (words in first-seen order, the filters of each word, (W, G) evidence).
    """
    index: dict[str, int] = {}
    rows, columns = [], []
    for u, words in enumerate(filter_words):
        for word in dict.fromkeys(words):  # a word counts once per filter
            rows.append(index.setdefault(word, len(index)))
            columns.append(u)
    words = list(index)
    incidence = np.zeros((len(words), len(filter_words)), dtype=np.float64)  # (W, d)
    incidence[rows, columns] = 1.0
    members = incidence.sum(axis=1, keepdims=True)  # (W, 1)
    residuals = np.asarray(residuals, dtype=np.float64)  # (G, d)
    chosen = residuals if background is None else residuals[:, np.asarray(background, dtype=bool)]
    if chosen.shape[1] == 0:
        chosen = residuals
    mean, spread = chosen.mean(axis=1), chosen.std(axis=1)  # (G,)
    standardised = (residuals - mean[:, None]) / np.where(spread > 0, spread, 1.0)[:, None]  # (G, d)
    evidence = incidence @ standardised.T / np.sqrt(np.maximum(members, 1))  # (W, G)
    filters = [np.flatnonzero(row).tolist() for row in incidence]
    return words, filters, evidence


def _normal_quantile(confidence: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(0.5 + confidence / 2))
