"""Naming filters: thresholds, top images, nearest words, ranking, and explain end to end."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lavise.datasets import LaviseWarning, load_rgb, open_reference
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import explain, rank_words
from lavise.datasets.base import SkipLog
from lavise.naming import FilterScan, nearest_words
from lavise.regions import top_images
from lavise.models import Preprocessing, TargetModel, layer_reader, preprocess_image
from lavise.regions import quantile_thresholds
from lavise.runs import train
from lavise.settings import METHODS, ExplainSettings, TrainSettings
from lavise.vocabulary import candidate_vocabulary

# Small vocabularies leave some concept names out; that warning is tested on its own.
pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

# --- pure functions ----------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.005, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("chunk", [64, 7])
def test_quantile_thresholds_equal_numpy(quantile, chunk):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 70, 3, 4, generator=generator, dtype=torch.float64).clamp_min(0)  # d > 64
    got = quantile_thresholds(maps, quantile, chunk=chunk)
    values = maps.transpose(0, 1).reshape(70, -1).numpy()
    expected = np.quantile(values, 1 - quantile, axis=1, method="linear")
    assert got.shape == (70,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_a_saturated_filter_keeps_a_region_where_it_saturates():
    """ReLU6 filters at 6 on more than the quantile's share of positions: '> 6' is never true."""
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(4, 3, 5, 5, generator=generator) * 5  # (N, d, h, w), below 6 everywhere
    maps[:, 0, :2, :2] = 6.0  # filter 0 saturates on 16 % of positions
    maps[:, 2] = 6.0  # filter 2 is constant
    thresholds = quantile_thresholds(maps, 0.05)
    assert thresholds[0] < 6.0 and (maps[:, 0] > thresholds[0]).sum() == 16  # exactly the saturated cells
    assert thresholds[0] == torch.nextafter(torch.tensor(6.0), torch.tensor(0.0))
    expected = np.quantile(maps[:, 1].flatten().numpy(), 0.95)
    np.testing.assert_allclose(float(thresholds[1]), expected, rtol=1e-6)  # ordinary filters: the quantile
    assert thresholds[2] == 6.0 and not (maps[:, 2] > thresholds[2]).any()  # constant: no region


def test_quantile_thresholds_float32_and_single_position():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 65, 2, 2, generator=generator)
    expected = np.quantile(maps.transpose(0, 1).reshape(65, -1).double().numpy(), 0.995, axis=1)
    np.testing.assert_allclose(quantile_thresholds(maps).numpy(), expected, rtol=1e-6)
    one = torch.tensor([[[[3.0]], [[-1.0]]]])  # one image, 1x1 grid: the value itself
    assert quantile_thresholds(one, 0.2).tolist() == [3.0, -1.0]


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.5])
def test_quantile_must_be_inside_zero_one(quantile):
    with pytest.raises(LaviseError, match="quantile must be in"):
        quantile_thresholds(torch.zeros(1, 1, 2, 2), quantile)


def test_top_images_are_those_of_highest_peak():
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(10, 5, 3, 3, generator=generator)
    maps[4, 1, 2, 2] = 5.0  # a single strong peak beats a high mean
    maps[7, 1] = 0.99
    chosen = top_images(maps, 3)
    assert chosen.shape == (5, 3)
    peaks = maps.flatten(2).amax(dim=2).numpy()  # (N, d)
    for u in range(5):
        assert chosen[u].tolist() == list(np.argsort(-peaks[:, u])[:3])
    assert chosen[1, 0] == 4


def test_nearest_words_equal_brute_force_cosine():
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(10, 8, generator=generator) * 4
    vocabulary = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    ids, sims = nearest_words(queries, vocabulary, 4, chunk=3)  # chunks smaller than the queries
    assert ids.shape == sims.shape == (10, 4)
    for q in range(10):
        cosines = [float(F.cosine_similarity(queries[q], vocabulary[v], dim=0)) for v in range(50)]
        order = sorted(range(50), key=lambda v: -cosines[v])[:4]
        assert ids[q].tolist() == order
        np.testing.assert_allclose(sims[q].numpy(), [cosines[v] for v in order], atol=1e-5)


def _ranked(word_ids, sims, top, *, s=1, ranking="frequency"):
    return [[(r.word, r.count) for r in words]
            for words in rank_words(word_ids, sims, top, words_per_image=s, ranking=ranking)]


def test_rank_words_by_frequency_by_hand():
    word_ids = torch.tensor(
        [
            [3, 1, 3, 2, 1, 5],  # counts 3:2 (Σ1.7), 1:2 (Σ1.1), 2:1, 5:1
            [4, 0, 0, 4, 7, 7],  # all counts 2: Σ 7:1.8 > 0:0.4 > 4:0.2
            [9, 8, 9, 8, 6, 6],  # all counts 2, equal sums: word order decides
        ]
    )
    sims = torch.tensor(
        [
            [0.9, 0.5, 0.8, 0.7, 0.6, 0.1],
            [0.1, 0.2, 0.2, 0.1, 0.9, 0.9],
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        ]
    )
    assert _ranked(word_ids, sims, 3) == [
        [(3, 2), (1, 2), (2, 1)],
        [(7, 2), (0, 2), (4, 2)],
        [(6, 2), (8, 2), (9, 2)],
    ]
    assert _ranked(word_ids, sims, 1) == [[(3, 2)], [(7, 2)], [(6, 2)]]
    assert _ranked(word_ids, sims, 10)[0] == [(3, 2), (1, 2), (2, 1), (5, 1)]
    # frequency beats similarity
    assert _ranked(torch.tensor([[1, 2, 2]]), torch.tensor([[0.99, 0.1, 0.1]]), 2) == [[(2, 2), (1, 1)]]


def test_first_choice_ranks_each_images_nearest_word_first():
    # Three images, s = 3 words each, nearest first. Word 7 is every image's second or
    # third word (count 3) but nobody's first; 1 is the first of two images, 2 of one.
    word_ids = torch.tensor([[1, 7, 8, 1, 8, 7, 2, 7, 9]])
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.9, 0.8, 0.7, 0.9, 0.8, 0.7]])
    frequency = rank_words(word_ids, sims, 5, words_per_image=3, ranking="frequency")[0]
    first = rank_words(word_ids, sims, 5, words_per_image=3, ranking="first-choice")[0]
    assert [r.word for r in frequency] == [7, 1, 8, 2, 9]
    assert [r.word for r in first] == [1, 2, 7, 8, 9]
    assert [(r.count, r.first) for r in first] == [(2, 2), (1, 1), (3, 0), (2, 0), (1, 0)]
    # with one word per image both rankings agree
    single = word_ids[:, ::3]
    assert rank_words(single, sims[:, ::3], 3, words_per_image=1, ranking="first-choice") == rank_words(
        single, sims[:, ::3], 3, words_per_image=1, ranking="frequency")


def test_only_voting_images_count():
    # Two filters, p = 3 images, s = 2 words. Filter 0 fires on images 0 and 2 only: the
    # words of image 1 (9, 9's neighbour 8) would win the vote but have no say. Filter 1
    # fires on none of its images and gets no words.
    ids = torch.tensor([[1, 2, 9, 8, 1, 3], [4, 5, 4, 5, 4, 5]])
    sims = torch.tensor([[0.9, 0.5, 0.99, 0.98, 0.8, 0.4], [0.9, 0.1, 0.9, 0.1, 0.9, 0.1]])
    voting = torch.tensor([[True, False, True], [False, False, False]])
    for ranking in ("first-choice", "frequency"):
        ranked = rank_words(ids, sims, 5, words_per_image=2, ranking=ranking, voting=voting)
        alone = rank_words(ids[:1, [0, 1, 4, 5]], sims[:1, [0, 1, 4, 5]], 5, words_per_image=2, ranking=ranking)
        assert ranked[0] == alone[0]
        assert [(r.word, r.count, r.first) for r in ranked[0]] == [(1, 2, 2), (2, 1, 0), (3, 1, 0)]
        assert ranked[1] == []
    everyone = rank_words(ids, sims, 5, words_per_image=2, ranking="first-choice", voting=torch.ones(2, 3, dtype=torch.bool))
    assert everyone == rank_words(ids, sims, 5, words_per_image=2, ranking="first-choice")
    with pytest.raises(ValueError, match="does not match"):
        rank_words(ids, sims, 5, words_per_image=2, ranking="first-choice", voting=voting[:, :2])


def test_a_filter_fires_on_the_top_images_whose_peak_exceeds_its_threshold():
    scan = FilterScan(thresholds=torch.tensor([0.5, 2.0]), chosen=torch.tensor([[4, 1, 0], [2, 3, 0]]),
                      peaks=torch.tensor([[3.0, 0.6, 0.5], [2.0, 2.0, 1.0]]), active=torch.tensor([True, True]),
                      images=5, skipped=SkipLog(), kept=None)
    assert scan.firing(torch.tensor([0, 1])).tolist() == [[True, True, False], [False, False, False]]
    assert scan.firing(torch.tensor([1])).tolist() == [[False, False, False]]


def test_rank_words_refuses_bad_arguments():
    ids, sims = torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6)
    with pytest.raises(LaviseError, match="Unknown ranking 'votes'"):
        rank_words(ids, sims, 3, words_per_image=3, ranking="votes")
    with pytest.raises(ValueError, match="not whole images"):
        rank_words(ids, sims, 3, words_per_image=4, ranking="frequency")


# --- explain end to end ------------------------------------------------------------------

P, S, X = 3, 5, 4


def _maps(model: TargetModel, layer: str, folder: Path) -> tuple[list[Path], torch.Tensor]:
    """The layer's maps of every image in the folder, computed here without the cache."""
    paths = sorted(folder.glob("*.png"))
    images = torch.stack([preprocess_image(load_rgb(p), model.preprocessing) for p in paths])
    with layer_reader(model.module, layer) as read, torch.no_grad():
        return paths, read(images)


def test_explain_end_to_end(tmp_path, tiny_run, tiny_model, targets, compute):
    # the words from the explainer alone (label_first=0: the run's reference labels reorder none; tests/test_survey.py)
    settings = ExplainSettings(top_images=P, words_per_image=S, top_words=X, label_first=0)
    result = explain(tiny_run.path, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    out = tiny_run.path / "explanations.json"
    assert result.path == out
    data = json.loads(out.read_text())
    assert {"model", "layer", "method", "filters"} <= set(data)
    assert (data["model"], data["layer"], data["method"]) == ("tiny", "features.3", "activation")
    filters = data["filters"]
    assert [f["filter"] for f in filters] == list(range(8))

    paths, maps = _maps(tiny_model, "features.3", targets)
    names = [p.name for p in paths]
    peaks = maps.flatten(2).amax(dim=2)  # (N, d)
    for f in filters:
        assert isinstance(f["filter"], int) and f["active"] is True
        words = f["words"]
        assert 1 <= len(words) <= X
        assert all(isinstance(w["word"], str) and isinstance(w["count"], int) for w in words)
        assert all(isinstance(w["first"], int) for w in words)
        keys = [(w["first"], w["count"]) for w in words]
        assert keys == sorted(keys, reverse=True)  # first choices, then frequency
        assert sum(w["count"] for w in words) <= P * S and max(w["count"] for w in words) <= P
        assert sum(w["first"] for w in words) <= P  # one first choice per image
        assert len({w["word"] for w in words}) == len(words)
        assert isinstance(f["top_images"], list) and len(f["top_images"]) == P
        assert all(isinstance(name, str) and (targets / name).is_file() for name in f["top_images"])
        # the P highest peaks, most activated first (equal peaks may come in any order)
        peak = peaks[:, f["filter"]]
        chosen = [names.index(name) for name in f["top_images"]]
        others = [i for i in range(len(names)) if i not in chosen]
        assert len(set(chosen)) == P
        assert peak[chosen].tolist() == sorted(peak[chosen].tolist(), reverse=True)
        assert float(peak[chosen].min()) >= float(peak[others].max())

    # the words, recomputed here from the definitions of the defaults: activation masking
    # pooled inside the region (the run was trained with region pooling), head, and aligned
    # retrieval over the visual vocabulary with the run's concept names: every word mapped
    # by the ridge regression A = (M^T V + I)(V^T V + I)^-1 from the seen concepts' unit
    # word vectors V to their mean unit reference outputs M
    assert tiny_run.pooling == "region" and settings.retrieval == "aligned"
    levels = load_file(str(tiny_run.path / "thresholds.safetensors"))["thresholds"]
    word_vectors = load_word_vectors()
    vocabulary = candidate_vocabulary(word_vectors, concepts=tiny_run.split["seen"] + tiny_run.split["unseen"])
    assert "traffic light" in vocabulary.words
    saved = load_file(str(tiny_run.path / "reference_outputs.safetensors"))
    seen = tiny_run.split["seen"]
    v = torch.stack([F.normalize(word_vectors.phrase_vector(c), dim=0) for c in seen]).double()
    m = torch.stack([F.normalize(F.normalize(saved["outputs"][saved["concepts"] == c], dim=1).sum(dim=0), dim=0)
                     for c in range(len(seen))]).double()
    eye = torch.eye(v.shape[1], dtype=torch.float64)
    mapping = ((m.T @ v + eye) @ torch.linalg.inv(v.T @ v + eye)).float()
    aligned = F.normalize(vocabulary.unit_vectors @ mapping.T, dim=1)
    head = tiny_run.head.eval()
    for f in filters:
        u = f["filter"]
        votes: Counter = Counter()
        firsts: Counter = Counter()
        firing = 0
        for name in f["top_images"]:
            fm = maps[names.index(name)].flatten(1)  # (d, hw)
            region = fm[u] > levels[u]
            if not region.any():  # the filter does not fire here: the image has no say
                continue
            firing += 1
            inputs = fm[:, region].sum(dim=1) / int(region.sum())
            with torch.no_grad():
                scores = F.normalize(head(inputs[None]), dim=1)[0] @ aligned.T
            nearest = [vocabulary.words[i] for i in torch.argsort(scores, descending=True)[:S].tolist()]
            votes.update(nearest)
            firsts[nearest[0]] += 1
        assert f["firing_images"] == firing
        reported = {w["word"]: (w["first"], w["count"]) for w in f["words"]}
        assert all((firsts[word], votes[word]) == key for word, key in reported.items())
        left_out = [(firsts[word], c) for word, c in votes.items() if word not in reported]
        assert not left_out or min(reported.values()) >= max(left_out)

    # the CSV holds the same words, in rank order
    with (tiny_run.path / "explanations.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["filter", "rank", "word", "count", "first", "confidence", "named", "firing_images", "label",
                       "label_iou"]
    expected_rows = [[str(f["filter"]), str(r + 1), w["word"], str(w["count"]), str(w["first"]), str(f["confidence"]),
                      str(int(f["named"])), str(f["firing_images"]), f["label"] or "", str(f["label_iou"])]
                     for f in filters for r, w in enumerate(f["words"])]
    assert rows[1:] == expected_rows

    # thresholds: the per-filter quantile of the maps
    thresholds = load_file(str(tiny_run.path / "thresholds.safetensors"))["thresholds"]
    assert thresholds.shape == (8,)
    expected = np.quantile(maps.transpose(0, 1).reshape(8, -1).double().numpy(), 1 - settings.quantile, axis=1)
    np.testing.assert_allclose(thresholds.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([f["threshold"] for f in filters], thresholds.numpy(), rtol=1e-6)
    # what was used is recorded
    assert data["settings"]["top_images"] == P and data["target"]["images"] == 12
    assert data["vocabulary"]["kind"] == "visual" and data["vocabulary"]["words"] == len(vocabulary)
    assert data["naming"]["retrieval"] == "aligned" and data["naming"]["calibration"]["simulated_filters"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(tmp_path, tiny_run, tiny_model, targets, compute, method):
    settings = ExplainSettings(method=method, top_images=2, words_per_image=3, top_words=3, vocabulary_size=2000)
    result = explain(tiny_run.path, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    assert data["method"] == result.method == method
    assert len(data["filters"]) == 8
    assert all(1 <= len(f["words"]) <= 3 for f in data["filters"])


def test_methods_give_different_inputs_but_original_ignores_the_filter(tmp_path, tiny_run, tiny_model, targets, compute):
    def words(method):
        settings = ExplainSettings(method=method, top_images=1, words_per_image=5, top_words=5, vocabulary_size=2000,
                                   label_first=0)  # the explainer's words alone: per-filter labels would reorder them
        result = explain(tiny_run.path, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache", write=False)
        return result

    original = words("original")
    # with one image per filter, "original" names two filters alike when they share the image
    by_image: dict[str, list] = {}
    for f in original.filters:
        by_image.setdefault(f.top_images[0], []).append(f.words)
    assert any(len(group) > 1 for group in by_image.values())
    for group in by_image.values():
        assert all(w == group[0] for w in group)
    assert not (tiny_run.path / "explanations.json").exists()  # write=False writes nothing


def test_dead_filter_gets_no_words(tmp_path, coco, targets, tiny_net_type, compute):
    torch.manual_seed(0)
    net = tiny_net_type()
    with torch.no_grad():
        net.features[2].weight[5] = 0.0
        net.features[2].bias[5] = 0.0  # filter 5 of features.3 is ReLU(0) = 0 everywhere
    model = TargetModel.from_module(net, Preprocessing(64, 64), name="tiny-dead")
    run = train(model, "features.3", open_reference(coco), tmp_path / "run", settings=TrainSettings(epochs=1), compute=compute, cache_dir=tmp_path / "cache")
    with pytest.warns(LaviseWarning, match=r"1 filters are constant on every target image and get no words: \[5\]"):
        result = explain(run, targets, settings=ExplainSettings(top_images=2), compute=compute, model=model, cache_dir=tmp_path / "cache")
    dead = result.filters[5]
    assert dead.active is False and dead.words == [] and dead.threshold == 0.0
    assert all(f.active and f.words for f in result.filters if f.filter != 5)
    data = json.loads((run.path / "explanations.json").read_text())
    assert data["filters"][5]["active"] is False and data["filters"][5]["words"] == []
    rows = (run.path / "explanations.csv").read_text().splitlines()
    assert not any(row.startswith("5,") for row in rows)


def test_more_top_images_than_targets_uses_them_all(tmp_path, tiny_run, tiny_model, targets, compute):
    with pytest.warns(LaviseWarning, match="top_images=50 but only 12 usable target images; using 12"):
        result = explain(tiny_run, targets, settings=ExplainSettings(top_images=50, vocabulary_size=1000), compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    assert all(len(f.top_images) == 12 and len(set(f.top_images)) == 12 for f in result.filters)
    assert all(sum(w["count"] for w in f.words) <= 12 * 5 for f in result.filters)


def test_explain_settings_are_checked(tmp_path, tiny_run, tiny_model, targets, compute):
    def run(**changes):
        explain(tiny_run, targets, settings=ExplainSettings(**changes), compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")

    with pytest.raises(LaviseError, match="Unknown method 'gradcam'"):
        run(method="gradcam")
    for name in ("top_images", "words_per_image", "top_words"):
        with pytest.raises(LaviseError, match=f"{name} must be at least 1"):
            run(**{name: 0})
    listing = tmp_path / "words.txt"
    listing.write_text("dog\ncat\n")
    with pytest.raises(LaviseError, match="words_per_image=5 exceeds the vocabulary"):
        run(vocabulary_file=str(listing), concept_names=False)


def test_custom_model_must_be_passed_again(tmp_path, tiny_run, targets, compute):
    with pytest.raises(LaviseError, match="custom module"):
        explain(tiny_run.path, targets, compute=compute, cache_dir=tmp_path / "cache")


def test_vocabulary_file_limits_the_words(tmp_path, tiny_run, tiny_model, targets, compute):
    listing = tmp_path / "words.txt"
    listing.write_text("red\ngreen\nblue\nyellow\ncircle\nsquare\ntriangle\nlight\nunicornzz\n")
    settings = ExplainSettings(top_images=2, words_per_image=2, top_words=3, vocabulary_file=str(listing),
                               concept_names=False)
    with pytest.warns(LaviseWarning, match=r"1 of the 9 words of '.*words.txt' have no vector .* left out: unicornzz"):
        result = explain(tiny_run.path, targets, settings=settings, compute=compute, model=tiny_model,
                         cache_dir=tmp_path / "cache")
    allowed = set(listing.read_text().split())
    assert all(w["word"] in allowed for f in result.filters for w in f.words)
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    assert data["vocabulary"]["missing"] == ["unicornzz"] and data["vocabulary"]["words"] == 8
    # by default the run's concept names join a file's words, "traffic light" as a phrase
    result = explain(tiny_run.path, targets, settings=replace(settings, concept_names=True), compute=compute,
                     model=tiny_model, cache_dir=tmp_path / "cache")
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    assert data["vocabulary"]["words"] == 9 and data["vocabulary"]["concept_names_added"] == 1
    assert all(w["word"] in allowed | {"traffic light"} for f in result.filters for w in f.words)


def test_concepts_outside_the_vocabulary_are_reported(tmp_path, tiny_run, tiny_model, targets, compute):
    listing = tmp_path / "words.txt"
    listing.write_text("red\ngreen\nblue\nsquare\nlight\ntraffic\n")
    settings = ExplainSettings(top_images=2, words_per_image=2, vocabulary_file=str(listing), concept_names=False)
    with pytest.warns(LaviseWarning, match=r"3 reference concepts are not in the vocabulary and can never be named: circle, traffic light, triangle$"):
        explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
