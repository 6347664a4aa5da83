"""How far to trust a filter's first word: a calibrated confidence, and when to abstain.

A filter's p top images each give s nearest words (:mod:`lavise.naming`); its first word
is the ranked winner (:func:`lavise.explain.rank_words`). Four numbers of that vote
predict whether the first word is right (:func:`vote_features`):

- ``agreement``: the share of the p images whose nearest word is the first word;
- ``share``: the share of the p images that have it among their s words;
- ``margin``: the mean, over the images, of the gap between their best and second score;
- ``score``: the mean best score.

A logistic regression maps them to a probability that the first word is right
(:class:`Calibration`). A run's filter survey (:mod:`lavise.survey`) adds two
features, what the reference annotations say of the first word (:func:`label_features`),
and the regression is fitted on those real filters (:func:`calibrate_on_survey`).
Without a survey it is fitted on *simulated filters* made from the reference
data's held-out validation images (:func:`simulated_filters`): p explainer outputs of
which a random share come from one concept and the rest from others, named exactly as
explain names a filter; the first word is right when it names a concept that makes up
at least a fifth of the p outputs. The threshold below which a filter is reported as
having no confident name is the lowest confidence at which the filters the confidence
was fitted on, named at or above it, have a mean confidence of at least
``abstain_precision`` (:func:`threshold_for_expected_precision`; ``threshold_rule``).
Their mean confidence is the precision the fitted probabilities expect of them; it
reads every filter's probability, where the rule lavise 0.5 first had (``observed``,
:func:`threshold_for_precision`: the lowest confidence at which they *were* right that
often) reads one right-or-wrong outcome per filter, and the lowest cut at which a noisy
running precision touches the target is lax: on the 80 held-out images of the demo it
named filters that were right 0.76 of the time on EfficientNet's ``blocks.5.0.bn1``
(development seed 0, 1200 evaluation scenes; 0.85 with the expected rule,
``experiments/abstention_threshold.py``). The same rule is known as controlling the
Bayesian false discovery rate with posterior probabilities (Newton et al., 2004).

:func:`auroc` and :func:`precision_coverage` measure how well a confidence separates
right from wrong first words (``lavise evaluate``). Pure functions on tensors and
arrays; :func:`calibrate` is the one that names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, stats

FEATURES = ("agreement", "share", "margin", "score")
LABEL_FEATURES = ("labelled", "label_iou")  # from the run's filter survey (lavise.survey): real filters only
TRUTH_SHARE = 0.2  # a simulated filter's truth: the concepts of at least this share of its p outputs
COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def vote_features(word_ids: torch.Tensor, scores: torch.Tensor, first: torch.Tensor, words_per_image: int,
                  voting: torch.Tensor | None = None) -> torch.Tensor:
    """The features of :data:`FEATURES` for each filter's vote.

    (f, p·s) word indices and scores, each image's s words best first; (f,) each
    filter's first word; (f, p) the images that vote (None: all) -> (f, 4) float64, the
    means over the voting images (0 for a filter with none)
    """
    f, collected = word_ids.shape
    s = words_per_image
    ids = word_ids.reshape(f, collected // s, s)
    values = scores.reshape(f, collected // s, s).double()
    first = first.reshape(f, 1, 1)
    if voting is not None:
        weights = voting.double() / voting.double().sum(dim=1, keepdim=True).clamp_min(1.0)

    def mean(per_image: torch.Tensor) -> torch.Tensor:
        return per_image.double().mean(dim=1) if voting is None else (per_image.double() * weights).sum(dim=1)

    agreement = mean(ids[:, :, 0] == first[:, :, 0])
    share = mean((ids == first).any(dim=2))
    margin = mean(values[:, :, 0] - values[:, :, 1]) if s > 1 else torch.zeros(f, dtype=torch.float64)
    score = mean(values[:, :, 0])
    return torch.stack([agreement, share, margin, score], dim=1)


def label_features(first: torch.Tensor, label_iou: torch.Tensor, word_of_concept: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """The features of :data:`LABEL_FEATURES`: what the reference annotations say of each first word.

    ``labelled``: 1 when the first word names the filter's concept of highest IoU on the
    reference training images and that IoU exceeds ``threshold`` (it is the filter's
    NetDissect label); ``label_iou``: the IoU of the concept the first word names (the
    highest, when several concepts have that word; 0 when it names none).

    (f,) first word ids (−1: none), (f, C) IoU, (C,) each concept's word id (−1: not in the
    vocabulary) -> (f, 2) float64

    Example:
        >>> iou = torch.tensor([[0.30, 0.05], [0.02, 0.01], [0.10, 0.20]])
        >>> features = label_features(torch.tensor([7, 7, 7]), iou, torch.tensor([7, 8]), 0.04)
        >>> [[round(v, 2) for v in row] for row in features.tolist()]
        [[1.0, 0.3], [0.0, 0.02], [0.0, 0.1]]
    """
    names = _named_concepts(first, word_of_concept)
    own = torch.where(names, label_iou, torch.zeros_like(label_iou)).amax(dim=1)
    best_iou, best = label_iou.max(dim=1)
    labelled = names.gather(1, best.unsqueeze(1)).squeeze(1) & (best_iou > threshold)
    return torch.stack([labelled.double(), own.double()], dim=1)


def named_truth(first: torch.Tensor, truth_iou: torch.Tensor, word_of_concept: torch.Tensor, threshold: float) -> np.ndarray:
    """(f,) whether each first word names one of the filter's ground-truth concepts (IoU above ``threshold``).

    Example:
        >>> named_truth(torch.tensor([7, 8, -1]), torch.tensor([[0.3, 0.0], [0.3, 0.0], [0.3, 0.0]]),
        ...             torch.tensor([7, 8]), 0.04).tolist()
        [True, False, False]
    """
    return (_named_concepts(first, word_of_concept) & (truth_iou > threshold)).any(dim=1).numpy()


def _named_concepts(first: torch.Tensor, word_of_concept: torch.Tensor) -> torch.Tensor:
    """(f, C) whether each filter's first word (−1: none) is concept c's word."""
    return (word_of_concept.unsqueeze(0) == first.unsqueeze(1)) & (first >= 0).unsqueeze(1)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression (scipy's L-BFGS).

    (n, k) standardised features, (n,) 0/1 labels -> ((k,) weights, bias)
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        value = np.mean(np.logaddexp(0.0, z) - y * z) + l2 * (w @ w) / 2
        residual = (1.0 / (1.0 + np.exp(-z)) - y) / len(y)
        return value, np.concatenate([x.T @ residual + l2 * w, [residual.sum()]])

    result = optimize.minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    return result.x[:-1], float(result.x[-1])


def auroc(confidence: Sequence[float], right: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``confidence`` for telling right from wrong (ties count half).

    None when all are right or all wrong. The Mann-Whitney U statistic over n₁·n₀ pairs.

    Example:
        >>> auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False])
        0.75
    """
    values = np.asarray(confidence, dtype=np.float64)
    labels = np.asarray(right, dtype=bool)
    positives, negatives = values[labels], values[~labels]
    if not len(positives) or not len(negatives):
        return None
    u = stats.mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return float(u / (len(positives) * len(negatives)))


def threshold_for_precision(confidence: Sequence[float], right: Sequence[bool], target: float) -> float:
    """The lowest confidence t such that the filters with confidence >= t are right at
    least ``target`` of the time; above every confidence when no t reaches it.

    Example:
        >>> threshold_for_precision([0.9, 0.8, 0.7, 0.6], [True, True, False, True], 0.75)
        0.6
        >>> threshold_for_precision([0.9, 0.8, 0.7, 0.6], [True, True, False, True], 0.9)
        0.8
    """
    return _lowest_cut(confidence, np.asarray(right, dtype=bool), target)


def threshold_for_expected_precision(confidence: Sequence[float], target: float) -> float:
    """The lowest confidence t such that the filters with confidence >= t have a mean
    confidence of at least ``target``: the precision a calibrated confidence expects of
    them; above every confidence when no t reaches it.

    Example:
        >>> threshold_for_expected_precision([0.99, 0.95, 0.8, 0.5], 0.9)
        0.8
    """
    return _lowest_cut(confidence, np.asarray(confidence, dtype=np.float64), target)


def _lowest_cut(confidence: Sequence[float], credit: np.ndarray, target: float) -> float:
    """The lowest confidence t at which the filters at or above it have a mean ``credit``
    (1 for a right first word, or its probability) of at least ``target``."""
    values = np.asarray(confidence, dtype=np.float64)
    if target <= 0:
        return -np.inf
    order = np.argsort(-values, kind="stable")
    sorted_values, hits = values[order], np.cumsum(credit[order])
    precision = hits / np.arange(1, len(values) + 1)
    # a cut may only fall between different values: the last index of each run of ties
    last_of_value = np.r_[sorted_values[1:] != sorted_values[:-1], True]
    good = np.nonzero((precision >= target) & last_of_value)[0]
    return float(sorted_values[good[-1]]) if len(good) else float(np.nextafter(values.max(initial=0.0), np.inf))


def precision_coverage(confidence: Sequence[float], right: Sequence[bool],
                       coverages: Sequence[float] = COVERAGES) -> list[dict]:
    """Precision@1 of the most confident filters at each coverage (share of the filters named).

    Example:
        >>> precision_coverage([0.9, 0.2, 0.6, 0.4], [True, False, True, False], (0.5, 1.0))
        [{'coverage': 0.5, 'filters': 2, 'precision@1': 1.0}, {'coverage': 1.0, 'filters': 4, 'precision@1': 0.5}]
    """
    values = np.asarray(confidence, dtype=np.float64)
    labels = np.asarray(right, dtype=bool)[np.argsort(-values, kind="stable")]
    rows = []
    for coverage in coverages:
        named = max(1, int(round(coverage * len(labels)))) if len(labels) else 0
        rows.append({"coverage": coverage, "filters": named,
                     "precision@1": float(labels[:named].mean()) if named else None})
    return rows


@dataclass
class Calibration:
    """A logistic map from vote features to the probability that the first word is right.

    Attributes:
        mean, scale: (k,) standardisation of the features (``facts["features"]``, the four of
            :data:`FEATURES` when absent).
        weights, bias: the regression.
        threshold: filters below it have no confident name.
        facts: how it was fitted (on what, the features, their right share, AUROC, target).
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    facts: dict

    def confidence(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """(f, k) features -> (f,) probability that each first word is right."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ self.weights + self.bias)))

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {name: torch.from_numpy(np.asarray(getattr(self, name), dtype=np.float64))
                   for name in ("mean", "scale", "weights")}
        return tensors, {"bias": self.bias, "threshold": self.threshold, **self.facts}

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.facts.get("features", FEATURES))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], facts: dict) -> Calibration:
        rest = {k: v for k, v in facts.items() if k not in ("bias", "threshold")}
        return cls(*(tensors[name].numpy() for name in ("mean", "scale", "weights")), float(facts["bias"]),
                   float(facts["threshold"]), rest)


def simulated_filters(concepts: torch.Tensor, count: int, top: int, generator: torch.Generator) -> tuple[torch.Tensor, list[set[int]]]:
    """Rows of ``count`` simulated filters, and each one's true concepts.

    Each draws a concept c and a purity α uniform in [0, 1]: max(1, round(α·p)) rows of
    c (with replacement when c has fewer) and the rest from the other concepts' rows.
    Its truth is the concepts of at least :data:`TRUTH_SHARE` of its rows.

    (n,) concept of each output row -> (count, p) row indices, count sets of concepts
    """
    present = torch.unique(concepts)
    rows_of = {int(c): torch.nonzero(concepts == c).flatten() for c in present.tolist()}
    others_of = {int(c): torch.nonzero(concepts != c).flatten() for c in present.tolist()}
    chosen = present[torch.randint(len(present), (count,), generator=generator)]
    purity = torch.rand(count, generator=generator)
    filters, truths = [], []
    for c, alpha in zip(chosen.tolist(), purity.tolist()):
        own = rows_of[c]
        k = max(1, round(alpha * top))
        mine = own[torch.randint(len(own), (k,), generator=generator)]
        others = others_of[c]
        if len(others) and k < top:
            rest = others[torch.randint(len(others), (top - k,), generator=generator)]
        else:
            rest = own[torch.randint(len(own), (top - k,), generator=generator)]
        rows = torch.cat([mine, rest])[torch.randperm(top, generator=generator)]
        filters.append(rows)
        members, counts = torch.unique(concepts[rows], return_counts=True)
        truths.append({int(m) for m, n in zip(members.tolist(), counts.tolist()) if n >= TRUTH_SHARE * top})
    return torch.stack(filters), truths


NameVotes = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # see calibrate


def calibrate(outputs: torch.Tensor, concepts: torch.Tensor, concept_words: Sequence[str], name_votes: NameVotes,
              words: Sequence[str], *, top: int, words_per_image: int, target: float, seed: int,
              count: int = 2000, rule: str = "expected") -> Calibration:
    """Fit the confidence on simulated filters of the reference outputs.

    Args:
        outputs: (n, D) explainer outputs on held-out reference rows.
        concepts: (n,) each row's concept, an index into ``concept_words``.
        concept_words: the concepts as the vocabulary spells them (normalised).
        name_votes: names simulated filters as explain names filters: (f, p, D) outputs ->
            (f, p·s) word ids and scores, and (f,) each one's first word.
        words: the vocabulary's words.
        top, words_per_image: p and s of the naming.
        target: the precision named filters should reach (``abstain_precision``).
        seed: of the simulated filters.
        rule: how the threshold is chosen (:func:`fitted_calibration`).
    """
    generator = torch.Generator().manual_seed(seed)
    rows, truths = simulated_filters(concepts, count, top, generator)
    ids, scores, first = name_votes(outputs[rows])
    features = vote_features(ids, scores, first, words_per_image).numpy()
    right = np.array([words[w] in {concept_words[c] for c in truth} for w, truth in zip(first.tolist(), truths)])
    calibration = fitted_calibration(features, right, target, rule)
    calibration.facts = {
        "fitted_on": "simulated filters", "features": list(FEATURES), "simulated_filters": count,
        "reference_rows": len(outputs), **calibration.facts, "seed": seed,
    }
    return calibration


def calibrate_on_survey(features: np.ndarray, right: np.ndarray, *, target: float, held_out_images: int,
                        rule: str = "expected") -> Calibration:
    """Fit the confidence on the run's real filters (:mod:`lavise.survey`).

    (f, 6) features of :data:`FEATURES` and :data:`LABEL_FEATURES` of the surveyed filters
    that have words and a ground-truth concept on the held-out reference images (as
    evaluate scores only such filters), and (f,) whether each first word names one.
    """
    calibration = fitted_calibration(features, right, target, rule)
    calibration.facts = {"fitted_on": "reference filters", "features": list(FEATURES + LABEL_FEATURES),
                         "filters": int(len(right)), "held_out_images": held_out_images, **calibration.facts}
    return calibration


def threshold_text(facts: dict) -> str:
    """How a calibration's threshold was chosen, in words (the CLI summary, the report).

    Example:
        >>> threshold_text({"fitted_on": "reference filters", "threshold_rule": "expected", "abstain_precision": 0.9})
        "where the run's filters surveyed on held-out reference images, named at or above it, average a confidence of 90 %"
    """
    fitted_on = ("the run's filters surveyed on held-out reference images" if facts.get("fitted_on") == "reference filters"
                 else "simulated filters of the reference data's held-out images")
    target = f"{facts['abstain_precision']:.0%}".replace("%", " %")
    if facts.get("threshold_rule", "observed") == "expected":  # calibrations before the rule was an option: observed
        return f"where {fitted_on}, named at or above it, average a confidence of {target}"
    return f"where {fitted_on}, named at or above it, were right {target} of the time"


def fitted_calibration(features: np.ndarray, right: np.ndarray, target: float, rule: str = "expected") -> Calibration:
    """The logistic confidence of (n, k) features for (n,) right first words, and its
    abstention threshold for precision ``target``; ``facts`` hold how well it fits.

    ``rule``: ``observed`` takes the lowest confidence at which the filters at or above it
    were right ``target`` of the time (:func:`threshold_for_precision`); ``expected`` the
    lowest at which their mean confidence is ``target`` (:func:`threshold_for_expected_precision`),
    which reads the fitted probabilities rather than each filter's one right-or-wrong outcome.
    """
    features, right = np.asarray(features, dtype=np.float64), np.asarray(right, dtype=bool)
    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale[scale == 0] = 1.0
    if right.all() or not right.any():  # nothing to tell apart: a constant confidence
        weights, bias = np.zeros(features.shape[1]), float(np.log((right.mean() + 1e-3) / (1 - right.mean() + 1e-3)))
    else:
        weights, bias = fit_logistic((features - mean) / scale, right)
    calibration = Calibration(mean, scale, weights, bias, 0.0, {})
    confidence = calibration.confidence(features)
    if rule == "observed":
        calibration.threshold = threshold_for_precision(confidence, right, target)
    elif rule == "expected":
        calibration.threshold = threshold_for_expected_precision(confidence, target)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    calibration.facts = {"right_share": float(right.mean()), "auroc": auroc(confidence, right),
                         "abstain_precision": target, "threshold_rule": rule,
                         "named_share": float((confidence >= calibration.threshold).mean())}
    return calibration
