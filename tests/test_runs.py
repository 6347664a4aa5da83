"""Run directories, the concept split in training, and the feature caches."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import lavise.runs
from lavise.datasets import open_reference
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.explainer import ExplainerHead
from lavise.reference import reference_rows as reference_features
from lavise.models import Preprocessing, TargetModel
from lavise.runs import load_run, train
from lavise.settings import ComputeSettings, ExplainSettings, TrainSettings
from lavise.storage import cache_key, load_cached, save_tensors

# Small vocabularies leave some concept names out; that warning is tested on its own.
pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

# Whole masks only, so each training run reads the reference images once; the second
# pass of activation-region training (for T_u) has its own cache test.
ONE_EPOCH = TrainSettings(epochs=1, activation_regions=0, survey_images=0)  # the reference rows' passes alone
QUIET = ComputeSettings(num_workers=0, progress=False)


class Forwards:
    """Counts forward passes of a module over data.

    Each stage first reads the layer's output shape from one blank image
    (lavise.features.layer_shape); that probe is not a pass over data and is not counted.
    """

    def __init__(self, model: TargetModel) -> None:
        self.count = 0
        model.module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        images = inputs[0]
        if not (len(images) == 1 and not images.any()):
            self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _train(model, coco, out, cache, compute, layer="features.3", settings=ONE_EPOCH):
    return train(model, layer, open_reference(coco), out, settings=settings, compute=compute, cache_dir=cache)


# --- the run directory -------------------------------------------------------------------


def test_run_directory_contents(tiny_run, tiny_model):
    path = tiny_run.path
    config = json.loads((path / "config.json").read_text())
    assert config["model"] == tiny_model.description
    assert Preprocessing.from_dict(config["preprocessing"]) == tiny_model.preprocessing
    assert config["layer"] == "features.3"
    assert config["train"]["seed"] == 0 and config["train"]["unseen_fraction"] == 0.0
    assert config["train"]["epochs"] == 2
    assert config["feature_shape"] == [8, 8, 8]
    assert config["word_vectors"] == "glove-6b-50d" and config["word_dim"] == 50
    assert config["training_pairs"] == 48  # 24 images, 2 concepts each
    assert config["reference"]["identity"]["kind"] == "coco"
    assert config["lavise_version"] == lavise.__version__

    split = json.loads((path / "split.json").read_text())
    assert split["seen"] == ["circle", "square", "traffic light", "triangle"]
    assert split["unseen"] == [] and split["without_word_vectors"] == [] and split["without_usable_masks"] == []

    tensors = load_file(str(path / "explainer.safetensors"))
    assert tensors.keys() == ExplainerHead(8, 50).state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in tiny_run.head.state_dict().items())

    with (path / "training.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["epoch", "train_loss", "validation_loss"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2]
    losses = [float(r[2]) for r in rows[1:]]
    assert config["best_epoch"] == 1 + losses.index(min(losses))
    assert not list(path.glob(".*.tmp"))


def test_load_run_round_trips(tiny_run):
    loaded = load_run(tiny_run.path)
    assert loaded.config == json.loads(json.dumps(tiny_run.config))
    assert loaded.split == tiny_run.split
    assert loaded.layer == "features.3"
    assert not loaded.head.training
    original = tiny_run.head.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.head.state_dict().items())
    pooled = torch.rand(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.head(pooled), tiny_run.head.eval()(pooled))


def test_load_run_refuses_an_incomplete_directory(tiny_run, tmp_path):
    (tiny_run.path / "config.json").unlink()
    with pytest.raises(LaviseError, match="has no config.json"):
        load_run(tiny_run.path)
    with pytest.raises(LaviseError, match="is not a lavise run"):
        load_run(tmp_path / "nothing")


def test_unseen_concepts_are_never_training_targets(tmp_path, coco, tiny_model, compute, monkeypatch):
    captured = {}
    real = lavise.runs.train_explainer

    def spy(vectors, targets, groups, concept_vectors, settings, **kwargs):
        captured.update(vectors=vectors, targets=targets, groups=groups, concept_vectors=concept_vectors)
        return real(vectors, targets, groups, concept_vectors, settings, **kwargs)

    monkeypatch.setattr(lavise.runs, "train_explainer", spy)
    settings = TrainSettings(epochs=1, unseen_fraction=0.5, seed=0)
    run = _train(tiny_model, coco, tmp_path / "run", tmp_path / "cache", compute, settings=settings)
    seen, unseen = run.split["seen"], run.split["unseen"]
    assert len(seen) == 2 and len(unseen) == 2 and not set(seen) & set(unseen)
    assert json.loads((run.path / "split.json").read_text())["unseen"] == unseen
    assert run.config["train"]["unseen_fraction"] == 0.5

    features = reference_features(tiny_model, "features.3", open_reference(coco), cache_dir=tmp_path / "cache", compute=QUIET,
                                  activation_regions=settings.activation_regions,
                                  quantile=settings.region_quantile)
    names = [features.concept_names[c] for c in features.concepts.tolist()]
    is_seen = torch.tensor([n in seen for n in names])
    assert run.config["training_rows"] == int(is_seen.sum()) == len(captured["vectors"])
    assert 0 < int(is_seen.sum()) < len(names)  # some pairs were held out
    torch.testing.assert_close(captured["vectors"], features.pooled(settings.pooling)[is_seen])
    torch.testing.assert_close(captured["groups"], features.images[is_seen])
    # every target is a seen concept, and it is the row's own concept
    assert [seen[t] for t in captured["targets"].tolist()] == [n for n in names if n in seen]
    glove = load_word_vectors()
    expected = torch.stack([glove.phrase_vector(n) for n in seen])
    torch.testing.assert_close(captured["concept_vectors"], expected)


def test_retraining_removes_stale_explanations(tiny_run, tiny_model, coco, targets, compute, tmp_path):
    explain(tiny_run, targets, settings=ExplainSettings(top_images=2, vocabulary_size=1000), compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    assert (tiny_run.path / "explanations.json").is_file()
    _train(tiny_model, coco, tiny_run.path, tmp_path / "cache", compute)
    for name in ("explanations.json", "explanations.csv", "thresholds.safetensors"):
        assert not (tiny_run.path / name).exists()
    assert load_run(tiny_run.path).config["train"]["epochs"] == 1


# --- caching -----------------------------------------------------------------------------


def test_reference_cache_is_reused(tmp_path, coco, tiny_model, compute):
    forwards = Forwards(tiny_model)
    first = _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    assert forwards.take() == 3  # 24 images in batches of 8
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 1
    second = _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 0
    assert first.config["training_pairs"] == second.config["training_pairs"]
    assert all(torch.equal(a, b) for a, b in zip(first.head.state_dict().values(), second.head.state_dict().values()))
    # the same weights in a new wrapper are the same model
    again = TargetModel.from_module(tiny_model.module, tiny_model.preprocessing, name="tiny")
    _train(again, coco, tmp_path / "c", tmp_path / "cache", compute)
    assert forwards.take() == 0


def test_activation_region_passes_are_cached_on_what_they_depend_on(tmp_path, coco, tiny_model, compute):
    forwards = Forwards(tiny_model)
    regions = TrainSettings(epochs=1, activation_regions=2, survey_images=0)
    _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute, settings=regions)
    assert forwards.take() == 6  # T_u, then the pooled rows: two passes of 3 batches
    _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute, settings=regions)
    assert forwards.take() == 0
    _train(tiny_model, coco, tmp_path / "c", tmp_path / "cache", compute, settings=replace(regions, activation_regions=3))
    assert forwards.take() == 3  # new rows; the same thresholds
    _train(tiny_model, coco, tmp_path / "d", tmp_path / "cache", compute, settings=replace(regions, region_quantile=0.1))
    assert forwards.take() == 6  # new thresholds, so new rows
    _train(tiny_model, coco, tmp_path / "e", tmp_path / "cache", compute, settings=replace(regions, activation_regions=0))
    assert forwards.take() == 3  # whole masks only: no thresholds needed


def test_cache_recomputes_for_another_layer(tmp_path, coco, tiny_model, compute):
    forwards = Forwards(tiny_model)
    _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    forwards.take()
    run = _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute, layer="features.1")
    assert forwards.take() == 3
    assert run.config["feature_shape"] == [6, 32, 32]


def test_cache_recomputes_for_other_weights(tmp_path, coco, tiny_model, compute):
    _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    with torch.no_grad():
        tiny_model.module.features[2].weight.mul_(1.5)
    changed = TargetModel.from_module(tiny_model.module, tiny_model.preprocessing, name="tiny")
    forwards = Forwards(changed)
    _train(changed, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 3
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 2


def test_cache_recomputes_for_other_preprocessing(tmp_path, coco, tiny_model, compute):
    _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    resized = TargetModel.from_module(tiny_model.module, Preprocessing(72, 64), name="tiny")
    forwards = Forwards(resized)
    run = _train(resized, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 3
    assert run.config["preprocessing"]["resize_size"] == 72


def test_cache_recomputes_when_annotations_change(tmp_path, coco, tiny_model, compute):
    forwards = Forwards(tiny_model)
    first = _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    forwards.take()
    data = json.loads(coco.read_text())
    data["annotations"] = data["annotations"][1:]  # image 1 loses one of its two concepts
    coco.write_text(json.dumps(data))
    second = _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 3
    assert second.config["training_pairs"] == first.config["training_pairs"] - 1


def test_cache_recomputes_when_an_image_is_added_or_changed(tmp_path, coco_maker, tiny_model, compute):
    forwards = Forwards(tiny_model)
    coco = coco_maker(tmp_path / "ref", images=8)
    _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    assert forwards.take() == 1
    # one more annotated image
    coco = coco_maker(tmp_path / "ref", images=9)
    run = _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 2
    assert run.config["training_pairs"] == 18
    # an image file replaced in place (new contents, new mtime)
    image = tmp_path / "ref" / "images" / "0003.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _train(tiny_model, coco, tmp_path / "c", tmp_path / "cache", compute)
    assert forwards.take() == 2
    _train(tiny_model, coco, tmp_path / "d", tmp_path / "cache", compute)
    assert forwards.take() == 0


def test_a_cache_file_with_a_wrong_key_is_not_trusted(tmp_path, coco, tiny_model, compute):
    forwards = Forwards(tiny_model)
    first = _train(tiny_model, coco, tmp_path / "a", tmp_path / "cache", compute)
    forwards.take()
    (folder,) = (tmp_path / "cache").glob("reference-*")
    (path,) = folder.glob("*.safetensors")  # 24 images: one chunk
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    poisoned = {**tensors, "vectors": torch.zeros_like(tensors["vectors"])}
    save_file(poisoned, str(path), metadata={**metadata, "key": "0" * 64})
    second = _train(tiny_model, coco, tmp_path / "b", tmp_path / "cache", compute)
    assert forwards.take() == 3
    assert all(torch.equal(a, b) for a, b in zip(first.head.state_dict().values(), second.head.state_dict().values()))
    assert torch.equal(load_file(str(path))["vectors"], tensors["vectors"])  # rewritten, right key
    # a damaged file is recomputed too, not fatal
    path.write_bytes(b"\x00garbage")
    _train(tiny_model, coco, tmp_path / "c", tmp_path / "cache", compute)
    assert forwards.take() == 3


def test_load_cached_checks_the_key(tmp_path):
    key = cache_key({"what": 1})
    assert cache_key({"what": 1}) == key != cache_key({"what": 2})
    path = tmp_path / "x.safetensors"
    assert load_cached(path, key) is None
    save_tensors(path, {"t": torch.arange(3)}, {"key": key, "info": "{}"})
    tensors, metadata = load_cached(path, key)
    assert torch.equal(tensors["t"], torch.arange(3)) and metadata["info"] == "{}"
    assert load_cached(path, cache_key({"what": 2})) is None


def test_target_cache_is_reused_and_follows_the_folder(tmp_path, tiny_run, tiny_model, targets, compute):
    settings = ExplainSettings(top_images=2, vocabulary_size=1000)
    forwards = Forwards(tiny_model)
    first = explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    assert forwards.take() == 2  # 12 images in batches of 8
    second = explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    assert forwards.take() == 0
    assert [f.words for f in first.filters] == [f.words for f in second.filters]
    Image.new("RGB", (64, 64), (250, 0, 0)).save(targets / "extra.png")
    third = explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    assert forwards.take() == 2
    data = json.loads((tiny_run.path / "explanations.json").read_text())
    assert data["target"]["images"] == 13 and third.filters[0].top_images


def test_default_cache_dir_comes_from_the_environment(tmp_path, coco, tiny_model, compute, monkeypatch):
    monkeypatch.setenv("LAVISE_CACHE", str(tmp_path / "env-cache"))
    train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", settings=ONE_EPOCH, compute=compute)
    assert len(list((tmp_path / "env-cache").glob("reference-*"))) == 1


def test_region_pooling_is_recorded_and_divides_by_the_mask_area(tmp_path, tiny_model, coco, compute):
    from lavise.datasets import open_reference
    from lavise.reference import reference_rows as reference_features
    from lavise.runs import load_run, train
    from lavise.settings import TrainSettings

    reference = open_reference(coco)
    features = reference_features(tiny_model, "features.3", reference, cache_dir=tmp_path / "cache", compute=QUIET,
                                  activation_regions=0)
    assert features.areas.shape == (len(features.vectors),) and (features.areas > 0).all()
    assert torch.allclose(features.pooled("region") * features.areas.unsqueeze(1), features.vectors, atol=1e-6)
    assert features.pooled("mean") is features.vectors
    run = train(tiny_model, "features.3", reference, tmp_path / "run", settings=TrainSettings(epochs=1, pooling="region"),
                compute=compute, cache_dir=tmp_path / "cache")
    assert load_run(run.path).pooling == "region" and run.config["train"]["pooling"] == "region"
    authors = train(tiny_model, "features.3", reference, tmp_path / "authors", settings=TrainSettings.authors(epochs=1),
                    compute=compute, cache_dir=tmp_path / "cache")
    assert load_run(authors.path).pooling == "mean"
    assert (authors.config["train"]["learning_rate"], authors.config["train"]["epochs"]) == (1e-4, 1)


def test_a_custom_module_with_other_weights_is_warned_about(tiny_run, tiny_model, tiny_net_type):
    import warnings

    from lavise.datasets import LaviseWarning
    from lavise.models import TargetModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)
        assert tiny_run.target_model(tiny_model) is tiny_model  # the same weights: silent
    torch.manual_seed(123)
    other = TargetModel.from_module(tiny_net_type(), tiny_model.preprocessing, name="tiny")
    with pytest.warns(LaviseWarning, match="does not have the weights"):
        tiny_run.target_model(other)


def test_a_run_from_before_pooling_was_recorded_reads_as_mean_pooling(tiny_run):
    from lavise.runs import load_run

    config = json.loads((tiny_run.path / "config.json").read_text())
    del config["train"]["pooling"]  # runs before 0.2 pooled over the whole grid and did not say so
    (tiny_run.path / "config.json").write_text(json.dumps(config))
    old = load_run(tiny_run.path)
    assert old.pooling == old.train_settings.pooling == "mean"
    assert old.train_settings.learning_rate == config["train"]["learning_rate"]
    with pytest.raises(LaviseError, match="custom module"):
        old.model_spec  # the tiny model is a custom module: there is no spec to rebuild it from


def _literal_maps_and_masks(model, layer, dataset):
    """Each image's feature map and its concepts' coverage of the grid, one image at a time."""
    from lavise.datasets.base import load_rgb
    from lavise.models import layer_reader, preprocess_image, preprocess_masks
    from lavise.regions import masks_to_grid

    out = []
    with layer_reader(model.module, layer) as read, torch.inference_mode():
        for index in range(len(dataset)):
            image = load_rgb(dataset.image_path(index))
            fm = read(preprocess_image(image, model.preprocessing).unsqueeze(0)).float()[0]  # (d, h, w)
            concepts, masks = dataset.masks(index, image.size)
            out.append((index, fm, concepts, masks_to_grid(preprocess_masks(masks, model.preprocessing), tuple(fm.shape[1:]))))
    return out


def test_activation_region_rows_follow_their_definition(tmp_path, coco, tiny_model):
    """Extra rows: for each pair, the k filters most active inside the mask, pooled where they
    exceed T_u (over the reference images) inside it. Checked against a loop over images."""
    from lavise.reference import reference_thresholds
    from lavise.regions import quantile_thresholds

    dataset, k, quantile = open_reference(coco), 2, 0.05
    plain = reference_features(tiny_model, "features.3", dataset, cache_dir=None, compute=QUIET, activation_regions=0)
    rich = reference_features(tiny_model, "features.3", dataset, cache_dir=tmp_path / "cache", compute=QUIET,
                              activation_regions=k, quantile=quantile)
    whole = ~rich.regional
    assert rich.pairs == len(plain.vectors) and not plain.regional.any()
    for name in ("vectors", "areas", "concepts", "images"):  # the whole masks' rows are unchanged
        torch.testing.assert_close(getattr(rich, name)[whole], getattr(plain, name))

    literal = _literal_maps_and_masks(tiny_model, "features.3", dataset)
    thresholds = quantile_thresholds(torch.stack([fm for _, fm, _, _ in literal]), quantile)
    got = reference_thresholds(tiny_model, "features.3", dataset, quantile, cache_dir=None, compute=QUIET)
    torch.testing.assert_close(got, thresholds)

    expected: dict[tuple[int, int], list[torch.Tensor]] = {}
    for index, fm, concepts, coverage in literal:
        hw = fm.shape[1] * fm.shape[2]
        for concept, cover in zip(concepts, coverage):
            inside = cover >= 0.5
            means = [float(fm[u][inside].mean()) if inside.any() else 0.0 for u in range(fm.shape[0])]
            for u in sorted(range(fm.shape[0]), key=lambda u: -means[u])[:k]:
                region = inside & (fm[u] > thresholds[u])
                if region.any():
                    row = torch.stack([fm[c][region].sum() / hw for c in range(fm.shape[0])])
                    expected.setdefault((index, concept), []).append(torch.cat([row, region.sum().reshape(1) / hw]))
    got_rows: dict[tuple[int, int], list[torch.Tensor]] = {}
    for row in rich.regional.nonzero().flatten().tolist():
        key = (int(rich.images[row]), int(rich.concepts[row]))
        got_rows.setdefault(key, []).append(torch.cat([rich.vectors[row], rich.areas[row].reshape(1)]))
    assert sum(map(len, expected.values())) > rich.pairs // 2  # most pairs give regions: the test has teeth
    assert sorted(got_rows) == sorted(expected)
    for key, rows in expected.items():
        order = lambda rows: torch.stack(sorted(rows, key=lambda r: float(r.sum())))  # noqa: E731
        torch.testing.assert_close(order(got_rows[key]), order(rows))


def test_training_with_activation_regions_records_its_rows(tmp_path, coco, tiny_model, compute, monkeypatch, capsys):
    captured = {}
    real = lavise.runs.train_explainer

    def spy(vectors, targets, groups, concept_vectors, settings, **kwargs):
        captured.update(vectors=vectors, groups=groups)
        return real(vectors, targets, groups, concept_vectors, settings, **kwargs)

    monkeypatch.setattr(lavise.runs, "train_explainer", spy)
    settings = TrainSettings(epochs=1, activation_regions=3)
    run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", settings=settings, compute=compute,
                cache_dir=tmp_path / "cache")
    assert run.config["training_pairs"] == 48  # 24 images, 2 concepts each, as without regions
    assert run.config["training_rows"] == len(captured["vectors"]) > 48
    assert load_run(run.path).train_settings.activation_regions == 3
    features = reference_features(tiny_model, "features.3", open_reference(coco), cache_dir=tmp_path / "cache",
                                  compute=QUIET, activation_regions=3)
    torch.testing.assert_close(captured["vectors"], features.pooled("region"))
    torch.testing.assert_close(captured["groups"], features.images)  # regions stay with their image's split

    config = json.loads((run.path / "config.json").read_text())
    for key in ("activation_regions", "region_quantile"):
        del config["train"][key]  # runs before 0.4 trained on whole masks and did not say so
    (run.path / "config.json").write_text(json.dumps(config))
    assert load_run(run.path).train_settings.activation_regions == 0

    with pytest.raises(LaviseError, match="activation_regions must be 0 or more"):
        reference_features(tiny_model, "features.3", open_reference(coco), cache_dir=None, compute=QUIET,
                           activation_regions=-1)
