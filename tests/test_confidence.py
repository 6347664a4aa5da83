"""The confidence of a first word: its features, the logistic fit, the threshold, AUROC and coverage."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lavise.confidence import (
    Calibration, auroc, calibrate, fit_logistic, precision_coverage, simulated_filters, threshold_for_expected_precision,
    threshold_for_precision, vote_features,
)
from lavise.explain import explain
from lavise.naming import nearest_words
from lavise.settings import ExplainSettings


def test_vote_features_by_their_definitions():
    # two filters, p = 2 images, s = 2 words each: ids and scores, best first
    ids = torch.tensor([[3, 1, 3, 2], [5, 6, 7, 5]])
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.6], [0.7, 0.6, 0.4, 0.3]])
    features = vote_features(ids, scores, torch.tensor([3, 5]), 2)
    expected = [[1.0, 1.0, (0.4 + 0.2) / 2, (0.9 + 0.8) / 2],  # agreement, share, margin, score
                [0.5, 1.0, (0.1 + 0.1) / 2, (0.7 + 0.4) / 2]]
    torch.testing.assert_close(features, torch.tensor(expected, dtype=torch.float64))


def test_vote_features_are_means_over_the_voting_images():
    # p = 3 images, s = 2: image 1 does not vote, so the features are those of images 0 and 2
    ids = torch.tensor([[3, 1, 7, 3, 3, 2]])
    scores = torch.tensor([[0.9, 0.5, 0.99, 0.1, 0.8, 0.6]])
    voting = torch.tensor([[True, False, True]])
    features = vote_features(ids, scores, torch.tensor([3]), 2, voting)
    torch.testing.assert_close(features, vote_features(ids[:, [0, 1, 4, 5]], scores[:, [0, 1, 4, 5]], torch.tensor([3]), 2))
    torch.testing.assert_close(features, torch.tensor([[1.0, 1.0, 0.3, 0.85]], dtype=torch.float64))
    assert vote_features(ids, scores, torch.tensor([3]), 2, torch.zeros(1, 3, dtype=torch.bool)).abs().sum() == 0


def test_auroc_counts_pairs_ordered_right():
    rng = np.random.default_rng(0)
    values, right = rng.random(40).round(1), rng.random(40) < 0.4  # rounded: ties happen
    pairs = [(a, b) for a, b in product(values[right], values[~right])]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auroc(values, right) == pytest.approx(expected)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_the_threshold_is_the_lowest_that_keeps_the_precision():
    rng = np.random.default_rng(1)
    values, right = rng.random(200).round(2), rng.random(200) < 0.6
    for target in (0.5, 0.7, 0.9):
        t = threshold_for_precision(values, right, target)
        named = values >= t
        assert not named.any() or right[named].mean() >= target
        lower = [v for v in np.unique(values) if v < t]  # no lower cut keeps the precision
        assert all(right[values >= v].mean() < target for v in lower)
    assert threshold_for_precision([0.3, 0.2], [False, False], 0.9) > 0.3  # nothing qualifies: none named
    assert threshold_for_precision([0.3, 0.2], [False, False], 0.0) == -np.inf


def test_the_expected_threshold_is_the_lowest_whose_named_filters_average_the_target():
    rng = np.random.default_rng(3)
    values = rng.random(300).round(2)  # rounded: ties happen, and a cut never splits them
    for target in (0.6, 0.8, 0.9):
        t = threshold_for_expected_precision(values, target)
        assert values[values >= t].mean() >= target
        assert all(values[values >= v].mean() < target for v in np.unique(values) if v < t)
    assert threshold_for_expected_precision([0.5, 0.4], 0.9) > 0.5  # no filter is sure enough: none named


def test_precision_coverage_takes_the_most_confident_first():
    rows = precision_coverage([0.1, 0.9, 0.8, 0.3], [False, True, False, True], (0.25, 0.5, 1.0))
    assert [(r["filters"], r["precision@1"]) for r in rows] == [(1, 1.0), (2, 0.5), (4, 0.5)]


def test_the_logistic_fit_learns_a_separable_rule():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).astype(float)
    weights, bias = fit_logistic(x, y, l2=1e-4)
    assert weights[0] > 0 > weights[1] and abs(bias) < 1
    assert np.mean(((x @ weights + bias) > 0) == y) > 0.97


def test_simulated_filters_mix_one_concept_with_others():
    concepts = torch.arange(10).repeat_interleave(20)
    rows, truths = simulated_filters(concepts, 300, 25, torch.Generator().manual_seed(0))
    assert rows.shape == (300, 25) and int(rows.max()) < len(concepts)
    for filter_rows, truth in zip(rows, truths):
        members, counts = torch.unique(concepts[filter_rows], return_counts=True)
        assert truth == {int(m) for m, n in zip(members, counts) if n >= 5}
    assert 0.3 < np.mean([len(t) > 0 for t in truths]) < 0.95  # pure and mixed filters both occur


def test_the_calibration_tells_clear_votes_from_noise():
    # words are the unit axes; concept c's outputs lie near axis c, more or less noisily
    generator = torch.Generator().manual_seed(3)
    words = torch.eye(8)
    concepts = torch.arange(8).repeat_interleave(40)
    noise = torch.rand(len(concepts), 1, generator=generator) * 2
    outputs = words[concepts] + noise * torch.randn(len(concepts), 8, generator=generator)

    def name_votes(filter_outputs):
        f, p, _ = filter_outputs.shape
        ids, scores = nearest_words(filter_outputs.flatten(0, 1), words, 2)
        ids, scores = ids.reshape(f, -1), scores.reshape(f, -1)
        first = torch.mode(ids[:, ::2], dim=1).values
        return ids, scores, first

    calibration = calibrate(outputs, concepts, [str(i) for i in range(8)], name_votes, [str(i) for i in range(8)],
                            top=25, words_per_image=2, target=0.9, seed=0, count=600)  # p = 25, the default
    assert calibration.facts["auroc"] > 0.8
    clear = vote_features(torch.tensor([[1, 2] * 10]), torch.tensor([[0.9, 0.1] * 10]), torch.tensor([1]), 2)
    muddled = vote_features(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 2, 3, 4, 5, 6, 7, 0, 1, 3, 5, 6, 0]]),
                            torch.tensor([[0.3, 0.28] * 10]), torch.tensor([1]), 2)  # 1 is nearest on one image of ten
    assert calibration.confidence(clear)[0] > calibration.threshold > calibration.confidence(muddled)[0]
    again = Calibration.from_tensors(*calibration.to_tensors())
    assert again.confidence(clear)[0] == pytest.approx(calibration.confidence(clear)[0])


def test_explain_records_confidences_and_abstains_below_the_threshold(tmp_path, tiny_run, tiny_model, targets, compute):
    settings = ExplainSettings(top_images=3)
    result = explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    threshold = data["naming"]["calibration"]["threshold"]
    for f, saved in zip(result.filters, data["filters"]):
        assert 0.0 <= f.confidence <= 1.0 and saved["confidence"] == f.confidence
        assert f.named == (f.confidence >= threshold) == saved["named"]
    assert list(tiny_run.path.glob("confidence-*.safetensors"))  # the calibration is cached in the run
    # abstain_precision 0 names every filter; the words do not depend on it
    every = explain(tiny_run, targets, settings=ExplainSettings(top_images=3, abstain_precision=0.0), compute=compute,
                    model=tiny_model, cache_dir=tmp_path / "cache", write=False)
    assert all(f.named for f in every.filters)
    assert [f.words for f in every.filters] == [f.words for f in result.filters]


def test_runs_from_before_confidences_are_named_by_cosine_with_a_warning(tmp_path, tiny_run, tiny_model, targets,
                                                                          compute):
    from lavise.errors import LaviseWarning

    (tiny_run.path / "reference_outputs.safetensors").unlink()
    with pytest.warns(LaviseWarning, match="trained before lavise 0.5"):
        result = explain(tiny_run, targets, settings=ExplainSettings(top_images=3), compute=compute, model=tiny_model,
                         cache_dir=tmp_path / "cache")
    assert all(f.confidence is None and f.named for f in result.filters)
    assert result.extra["naming"]["retrieval"] == "cosine"
    cosine = explain(tiny_run, targets, settings=ExplainSettings(top_images=3, retrieval="cosine"), compute=compute,
                     model=tiny_model, cache_dir=tmp_path / "cache", write=False)
    assert [f.words for f in cosine.filters] == [f.words for f in result.filters]


def test_aligned_retrieval_maps_the_seen_concepts_onto_their_outputs():
    from lavise.retrieval import alignment, mean_outputs

    generator = torch.Generator().manual_seed(4)
    vectors = F.normalize(torch.randn(30, 6, generator=generator), dim=1)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator)).Q
    concepts = torch.arange(30).repeat_interleave(5)
    outputs = vectors[concepts] @ rotation.T + 0.01 * torch.randn(150, 6, generator=generator)
    means = mean_outputs(outputs, concepts, 30)
    mapping = alignment(vectors, means, 1e-3)
    mapped = F.normalize(vectors @ mapping.T, dim=1)
    assert torch.equal((means @ mapped.T).argmax(dim=1), torch.arange(30))
    torch.testing.assert_close(mapping, rotation, atol=0.05, rtol=0)
