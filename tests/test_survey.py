"""The run's filter survey: its real filters named on held-out reference images, the
annotations' labels, and the confidence fitted on them."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import COLOURS, ColourNet

from lavise.confidence import FEATURES, LABEL_FEATURES, auroc, calibrate_on_survey, label_features, named_truth
from lavise.datasets import open_reference
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.models import Preprocessing, TargetModel
from lavise.runs import add_survey, train
from lavise.settings import ExplainSettings, TrainSettings
from lavise.survey import SURVEY, ReferenceLabels, load_survey, reference_labels, survey_images


def test_survey_images_are_the_held_out_images_and_a_seeded_sample_of_the_rest():
    row_images = torch.tensor([0, 0, 1, 2, 2, 3, 5, 6, 7, 8])
    validation = torch.tensor([2, 3, 4])  # rows of images 1 and 2
    held, labelling = survey_images(row_images, validation, 10, 4, seed=0)
    assert held.tolist() == [1, 2]
    assert len(labelling) == 4 and set(labelling.tolist()).isdisjoint({1, 2})
    assert labelling.tolist() == sorted(labelling.tolist())
    assert torch.equal(survey_images(row_images, validation, 10, 4, seed=0)[1], labelling)
    # images without a training row (only unseen concepts, say) can be labelling images too
    _, every = survey_images(row_images, validation, 10, 100, seed=1)
    assert every.tolist() == [0, 3, 4, 5, 6, 7, 8, 9]


def test_label_features_and_truth_read_concepts_that_share_a_word():
    # concepts 0 and 1 are both "sky" (word 4, as "sky-other-merged" and "sky" would be); concept 2 has no word
    word_of_concept = torch.tensor([4, 4, -1])
    iou = torch.tensor([[0.01, 0.20, 0.50], [0.30, 0.01, 0.00]])
    features = label_features(torch.tensor([4, -1]), iou, word_of_concept, 0.04)
    # filter 0: its best concept (2) has no word, so "sky" is not its label, but sky's IoU is its best concept's 0.20
    assert features.tolist() == [[0.0, pytest.approx(0.20)], [0.0, 0.0]]
    assert label_features(torch.tensor([4, 4]), iou, word_of_concept, 0.04)[1].tolist() == [1.0, pytest.approx(0.30)]
    assert label_features(torch.tensor([4, 4]), iou, word_of_concept, 0.5)[1, 0] == 0.0  # not above the threshold
    assert named_truth(torch.tensor([4, 4]), iou, word_of_concept, 0.04).tolist() == [True, True]
    assert named_truth(torch.tensor([4, 4]), iou, word_of_concept, 0.25).tolist() == [False, True]


def test_a_filters_label_is_its_best_concept_above_label_iou_not_the_truth_threshold():
    iou = torch.tensor([[0.03, 0.01], [0.00, 0.20], [0.00, 0.00]])
    survey = ({"label_iou": iou}, {"concepts": ["sky-other-merged", "dog"], "iou_threshold": 0.04})
    labels = reference_labels(survey, ["dog", "sky"])  # the default minimum: NetDissect's 0.04
    assert isinstance(labels, ReferenceLabels) and labels.threshold == labels.minimum == 0.04
    assert labels.word_of_concept.tolist() == [1, 0]  # concepts are matched as the vocabulary spells them
    assert labels.label_words(torch.arange(3)) == [-1, 0, -1]
    assert labels.labels() == [(None, 0.03), ("dog", 0.2), (None, 0.0)]
    lower = reference_labels(survey, ["dog", "sky"], minimum=0.02)
    assert lower.threshold == 0.04  # ground truth keeps NetDissect's threshold; only the label's minimum moves
    assert lower.label_words(torch.arange(3)) == [1, 0, -1]
    assert lower.labels()[0] == ("sky-other-merged", 0.03)  # the outputs keep the dataset's name
    assert lower.features(torch.tensor([1, 0, 1]), torch.arange(3))[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert labels.features(torch.tensor([1, 0, 1]), torch.arange(3))[:, 0].tolist() == [0.0, 1.0, 0.0]


def test_a_confidence_fitted_on_real_filters_learns_what_the_labels_say():
    rng = np.random.default_rng(0)
    n = 400
    labelled = rng.random(n) < 0.5
    right = np.where(labelled, rng.random(n) < 0.9, rng.random(n) < 0.2)
    votes = rng.random((n, len(FEATURES)))  # vote features that say nothing here
    features = np.column_stack([votes, labelled, labelled * rng.uniform(0.05, 0.3, n)])
    calibration = calibrate_on_survey(features, right, target=0.85, held_out_images=50, rule="observed")
    assert calibration.features == FEATURES + LABEL_FEATURES
    assert calibration.facts["fitted_on"] == "reference filters" and calibration.facts["filters"] == n
    confidence = calibration.confidence(features)
    assert auroc(confidence, right) > 0.8
    assert right[confidence >= calibration.threshold].mean() >= 0.85
    assert calibration.facts["threshold_rule"] == "observed"
    # the expected rule reads the fitted probabilities: those named average the target, and no lower cut does
    expected = calibrate_on_survey(features, right, target=0.85, held_out_images=50)  # the default
    np.testing.assert_allclose(expected.confidence(features), confidence)  # the same confidence, another threshold
    assert expected.facts["threshold_rule"] == "expected"
    assert confidence[confidence >= expected.threshold].mean() >= 0.85
    assert confidence[confidence >= np.max(confidence[confidence < expected.threshold])].mean() < 0.85
    with pytest.raises(ValueError, match="threshold rule"):
        calibrate_on_survey(features, right, target=0.85, held_out_images=50, rule="lowest")


@pytest.fixture
def colour_run(tmp_path, coco_maker, compute):
    data = open_reference(coco_maker(tmp_path / "colours", images=40, names=tuple(COLOURS)))
    model = TargetModel.from_module(ColourNet(), Preprocessing(64, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), name="colours")
    run = train(model, "detect", data, tmp_path / "run", settings=TrainSettings(epochs=2, validation_fraction=0.3),
                compute=compute, cache_dir=tmp_path / "cache")
    return run, model, data


def test_the_survey_labels_each_colour_filter_with_its_concept(colour_run):
    run, _, data = colour_run
    tensors, facts = load_survey(run.path)
    assert facts["concepts"] == list(COLOURS) and facts["method"] == "activation"
    assert facts["held_out_images"] == 12 and facts["labelling_images"] == 28  # 30 % of 40 held out, the rest label
    assert tensors["outputs"].shape == (3, 12, 50) and tensors["firing"].shape == (3, 12)
    # filter c detects concept c's colour exactly: its label on the training images and its truth on the held-out ones
    assert tensors["label_iou"].argmax(dim=1).tolist() == [0, 1, 2]
    assert tensors["truth_iou"].argmax(dim=1).tolist() == [0, 1, 2]
    assert (tensors["label_iou"].amax(dim=1) > 0.5).all()


def test_adding_a_survey_to_a_run_finds_the_one_training_made(colour_run, tmp_path, compute, coco_maker):
    run, model, data = colour_run
    made, _ = load_survey(run.path)
    (run.path / SURVEY).unlink()
    assert load_survey(run.path) is None
    assert add_survey(run.path, data, model=model, compute=compute, cache_dir=tmp_path / "cache")
    again, _ = load_survey(run.path)
    assert made.keys() == again.keys() and all(torch.equal(made[k], again[k]) for k in made)
    other = open_reference(coco_maker(tmp_path / "other", images=10, seed=3, names=tuple(COLOURS)))
    with pytest.raises(LaviseError, match="is not the reference data run"):
        add_survey(run.path, other, model=model, compute=compute, cache_dir=tmp_path / "cache")


def test_explain_fits_the_confidence_on_the_surveyed_filters(colour_run, tmp_path, compute, coco_maker, monkeypatch):
    run, model, _ = colour_run
    monkeypatch.setattr(sys.modules["lavise.survey"], "MIN_SURVEY_FILTERS", 2)  # three filters: enough to show the wiring
    targets = coco_maker(tmp_path / "targets", images=16, seed=1, names=tuple(COLOURS)).parent / "images"
    kwargs = dict(compute=compute, model=model, cache_dir=tmp_path / "cache", write=False)
    result = explain(run, targets, settings=ExplainSettings(top_images=5), **kwargs)
    calibration = result.extra["naming"]["calibration"]
    assert calibration["fitted_on"] == "reference filters"
    assert calibration["features"] == list(FEATURES + LABEL_FEATURES) and calibration["held_out_images"] == 12
    assert [(f.label, f.label_iou > 0.5) for f in result.filters] == [(name, True) for name in COLOURS]
    assert all(0.0 <= f.confidence <= 1.0 for f in result.filters)
    assert calibration["threshold_rule"] == "expected"
    observed = explain(run, targets, settings=ExplainSettings(top_images=5, threshold_rule="observed"), **kwargs)
    assert observed.extra["naming"]["calibration"]["threshold_rule"] == "observed"
    # the simulated filters on request, and when the survey cannot stand for the naming
    for settings in (ExplainSettings(top_images=5, calibration="simulated"), ExplainSettings(top_images=13),
                     ExplainSettings(top_images=5, method="attention")):
        other = explain(run, targets, settings=settings, **kwargs)
        assert other.extra["naming"]["calibration"]["fitted_on"] == "simulated filters"
        assert [f.label for f in other.filters] == list(COLOURS)  # the labels are the survey's all the same
    # a run without a survey: simulated filters, no labels
    plain = tmp_path / "plain"
    shutil.copytree(run.path, plain)
    (plain / SURVEY).unlink()
    bare = explain(plain, targets, settings=ExplainSettings(top_images=5), **kwargs)
    assert bare.extra["naming"]["calibration"]["fitted_on"] == "simulated filters"
    assert all(f.label is None and f.label_iou is None for f in bare.filters)
    alone = explain(run, targets, settings=ExplainSettings(top_images=5, label_first=0), **kwargs)
    assert [f.words for f in bare.filters] == [f.words for f in alone.filters]
    # the label goes first when it is among the first three words: the square detector's words alone put circle first
    assert [f.words[0]["word"] for f in alone.filters] != list(COLOURS)
    assert [f.words[0]["word"] for f in result.filters] == list(COLOURS)
    for with_label, without in zip(result.filters, alone.filters):
        assert sorted(map(str, with_label.words)) == sorted(map(str, without.words))  # the same words, reordered
    # a label counts above label_iou: between the two weakest labels' IoU, the weakest filter loses its label
    weakest, next_weakest = sorted(f.label_iou for f in result.filters)[:2]
    assert weakest + 2e-4 < next_weakest  # the explanations round IoU to 4 places
    strict = explain(run, targets, settings=ExplainSettings(top_images=5, label_iou=(weakest + next_weakest) / 2), **kwargs)
    assert [f.label for f in strict.filters] == [None if f.label_iou == weakest else f.label for f in result.filters]
    lost = next(u for u, f in enumerate(result.filters) if f.label_iou == weakest)
    assert strict.filters[lost].label_iou == weakest and strict.filters[lost].words == alone.filters[lost].words


def test_training_without_a_survey_writes_none(tmp_path, coco, tiny_model, compute):
    run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run",
                settings=TrainSettings(epochs=1, survey_images=0), compute=compute, cache_dir=tmp_path / "cache")
    assert not (run.path / SURVEY).exists()


def test_too_few_held_out_images_for_a_survey_are_said(tmp_path, coco, tiny_model, compute):
    from lavise.errors import LaviseWarning

    with pytest.warns(LaviseWarning, match="Only 0 reference images are held out of training"):
        run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run",
                    settings=TrainSettings(epochs=1, validation_fraction=0.0), compute=compute,
                    cache_dir=tmp_path / "cache")
    assert not (run.path / SURVEY).exists()


def test_pair_outputs_are_what_name_pairs_matches_against_the_words(tiny_run, tiny_model, targets, compute, tmp_path):
    from lavise.datasets.base import ImageFiles
    from lavise.distributed import Ranks
    from lavise.features import MapStream
    from lavise.naming import feature_inputs, name_pairs, nearest_words, pair_outputs, scan_filters

    stream = MapStream(tiny_model, "features.3", ImageFiles(targets), cache_dir=tmp_path / "cache", compute=compute)
    scan = scan_filters(stream, quantile=0.05, top=4, compute=compute, ranks=Ranks())
    filters = torch.tensor([1, 5, 6])
    inputs = lambda maps, _: feature_inputs("activation", maps, scan.thresholds, stream.device, "region")  # noqa: E731
    vocabulary = torch.nn.functional.normalize(torch.randn(40, 50), dim=1)
    words, scores = name_pairs(stream, scan, filters, inputs, tiny_run.head, vocabulary, 3, compute=compute, ranks=Ranks())
    outputs = pair_outputs(stream, scan, filters, inputs, tiny_run.head, 50, compute=compute, ranks=Ranks())
    assert outputs.shape == (3, 4, 50)
    again, again_scores = nearest_words(outputs.flatten(0, 1), vocabulary, 3)
    assert torch.equal(again.reshape(3, 12), words)
    torch.testing.assert_close(again_scores.reshape(3, 12), scores)


def test_the_survey_passes_are_cached(tmp_path, coco, tiny_model, compute):
    forwards = []  # passes over images; the blank image that probes the layer's shape is not one
    hook = tiny_model.module.register_forward_pre_hook(
        lambda _, inputs: forwards.append(1) if inputs[0].any() else None)
    try:
        settings = TrainSettings(epochs=1, activation_regions=0)
        train(tiny_model, "features.3", open_reference(coco), tmp_path / "a", settings=settings, compute=compute,
              cache_dir=tmp_path / "cache")
        # the rows (3 batches of 8), every surveyed image (24: 3 batches), the 2 held-out ones again (1 batch)
        assert len(forwards) == 7
        forwards.clear()
        train(tiny_model, "features.3", open_reference(coco), tmp_path / "b", settings=settings, compute=compute,
              cache_dir=tmp_path / "cache")
        assert len(forwards) == 0
    finally:
        hook.remove()
