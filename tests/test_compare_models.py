"""compare-models: matching filters of two explained runs and counting their concepts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lavise.compare_models import compare_models, mutual_best_matches, peak_correlation, profile_similarity, word_profiles
from lavise.datasets import LaviseWarning
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.models import Preprocessing, TargetModel
from lavise.settings import ExplainSettings, ModelComparisonSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

def test_matching_functions_by_hand():
    words, profiles = word_profiles([[{"word": "dog", "count": 3}, {"word": "cat", "count": 4}], [], [{"word": "cat", "count": 1}]])
    assert words == ["dog", "cat"] and profiles.tolist() == [[3, 4], [0, 0], [0, 1]]
    similarity = profile_similarity(profiles, profiles)
    assert similarity[0, 2] == pytest.approx(0.8) and similarity[1].abs().sum() == 0
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(30, 4, generator=generator)
    b = torch.cat([a[:, [2, 0]] * 3 + 1, torch.ones(30, 1)], dim=1)  # b0 ~ a2, b1 ~ a0, b2 constant
    correlation = peak_correlation(a, b)
    expected = np.corrcoef(a.T.numpy(), b[:, :2].T.numpy())[:4, 4:]
    np.testing.assert_allclose(correlation[:, :2].numpy(), expected, atol=1e-12)
    assert correlation[:, 2].abs().max() < 1e-6
    assert sorted(mutual_best_matches(correlation)) == [(0, 1), (2, 0)]




# --- compare-models ------------------------------------------------------------------------


class _Permuted(nn.Module):
    """The tiny network with the filters of its explained layer in another order."""

    def __init__(self, net: nn.Module, order: list[int]) -> None:
        super().__init__()
        self.features = nn.Sequential(*[m for m in net.features])
        conv = self.features[2]
        with torch.no_grad():
            conv.weight.copy_(conv.weight[order].clone())
            conv.bias.copy_(conv.bias[order].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_compare_models_matches_filters_and_counts_concepts(explained, tiny_model, coco, grouped, compute, tmp_path):
    from copy import deepcopy

    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import TrainSettings

    order = [3, 7, 0, 5, 1, 6, 2, 4]
    permuted = TargetModel.from_module(_Permuted(deepcopy(tiny_model.module), order), Preprocessing(64, 64), name="tiny-permuted")
    other = train(permuted, "features.3", open_reference(coco), tmp_path / "other", settings=TrainSettings(epochs=2),
                  compute=compute, cache_dir=tmp_path / "cache")
    explain(other, grouped, settings=ExplainSettings(top_images=5, vocabulary_size=500), compute=compute, model=permuted,
            cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)  # same naming on both sides: no warning
        result = compare_models(explained, other, target=grouped, compute=compute, model_a=tiny_model, model_b=permuted,
                                cache_dir=tmp_path / "cache", out=tmp_path / "models",
                                settings=ModelComparisonSettings(words_per_filter=2, matches=8))
    # filter b_j is filter a_order[j]: matching by activations recovers the permutation
    active = {f["filter"] for f in json.loads((explained.path / "explanations.json").read_text())["filters"] if f["active"]}
    assert {(m.a, m.b) for m in result.matches} == {(order[j], j) for j in range(8) if order[j] in active}
    assert all(m.correlation == pytest.approx(1.0) for m in result.matches)
    # concept counts, by a loop over the explanations
    for key, run in (("a", explained), ("b", other)):
        filters = json.loads((run.path / "explanations.json").read_text())["filters"]
        expected = {}
        for f in filters:
            for w in f["words"][:2]:
                expected.setdefault(w["word"], []).append(f["filter"])
        assert result.concepts[key] == expected
    assert set(result.shared) == set(result.concepts["a"]) & set(result.concepts["b"])
    assert set(result.unique["a"]) == set(result.concepts["a"]) - set(result.concepts["b"])
    data = json.loads((tmp_path / "models" / "models.json").read_text())
    assert data["runs"]["a"]["concepts"] == len(result.concepts["a"]) and data["matched_by"] == "peak-activation correlation"
    assert (tmp_path / "models" / "models.csv").read_text().startswith("rank,filter_a,filter_b")

    # a run against itself, by words: every named filter matches itself perfectly
    itself = compare_models(explained, explained)
    named = [f["filter"] for f in json.loads((explained.path / "explanations.json").read_text())["filters"] if f["words"]]
    assert result.path is not None and itself.path is None
    assert itself.unique == {"a": [], "b": []}
    assert all(m.similarity == pytest.approx(1.0) and set(m.words_a) == set(m.words_b) for m in itself.matches)
    assert {m.a for m in itself.matches} <= set(named)


def test_compare_models_warns_about_unlike_naming(explained, tiny_model, grouped, compute, tmp_path, coco):
    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import TrainSettings

    other = train(tiny_model, "features.3", open_reference(coco), tmp_path / "other", settings=TrainSettings(epochs=1, seed=4),
                  compute=compute, cache_dir=tmp_path / "cache")
    explain(other, grouped, settings=ExplainSettings(method="attention", top_images=6, vocabulary_size=500),
            compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    with pytest.warns(LaviseWarning, match="explained with different method, naming settings"):
        compare_models(explained, other)
    with pytest.raises(LaviseError, match="words_per_filter must be at least 1"):
        compare_models(explained, other, settings=ModelComparisonSettings(words_per_filter=0))
