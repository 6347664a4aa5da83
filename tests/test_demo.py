"""The built-in demo end to end at a reduced size, and its scene CNN target."""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from lavise.datasets import CocoDataset, LaviseWarning
from lavise.demos.demo import evaluation_scenes, run_demo
from lavise.demos.scene_training import train_scene_cnn
from lavise.models import ModelSpec, layer_reader, load_target_model
from lavise.models.scene_cnn import DEFAULT_LAYER
from lavise.settings import ComputeSettings, DemoSettings
from lavise.synthetic import OPENMOJI_ATTRIBUTION, SceneSettings, generate_scenes

SMALL = DemoSettings(reference_images=40, evaluation_images=12, concepts=10, scene_cnn_epochs=1, explainer_epochs=2)
QUIET = ComputeSettings(num_workers=0, progress=False)


def test_demo_writes_runs_for_both_targets_and_reuses_them(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaviseWarning)
        summary = run_demo(tmp_path, SMALL, QUIET)
    printed = capsys.readouterr().out
    assert OPENMOJI_ATTRIBUTION in printed and "held-out concept" in printed
    assert f"Next: lavise evaluate {tmp_path / 'runs' / 'efficientnet_lite0'}" in printed
    assert f"--dataset {tmp_path / 'data' / 'evaluation' / 'annotations.json'}" in printed
    assert summary["unseen_concepts"] and set(summary["unseen_concepts"]).isdisjoint(summary["seen_concepts"])
    reference = json.loads((tmp_path / "data/reference/annotations.json").read_text())
    assert {c["name"] for c in reference["categories"]}.isdisjoint(summary["unseen_concepts"])
    for key, filters in (("efficientnet_lite0", 672), ("scene_cnn", 256)):
        explanations = json.loads((tmp_path / "runs" / key / "explanations.json").read_text())
        assert len(explanations["filters"]) == filters
        assert [f["filter"] for f in explanations["filters"]] == list(range(filters))
        photos = {p for f in explanations["filters"] for p in f["top_images"] if p.startswith("photos/")}
        scenes = {p for f in explanations["filters"] for p in f["top_images"] if p.startswith("scenes/")}
        assert photos and scenes  # both kinds of target image are explained
    assert (tmp_path / "ATTRIBUTION.txt").read_text().strip() == OPENMOJI_ATTRIBUTION

    checkpoint = tmp_path / "models/scene_cnn.pt"
    config = tmp_path / "runs/scene_cnn/config.json"
    stamps = (checkpoint.stat().st_mtime_ns, config.stat().st_mtime_ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaviseWarning)
        run_demo(tmp_path, SMALL, QUIET)
    assert (checkpoint.stat().st_mtime_ns, config.stat().st_mtime_ns) == stamps  # reused, not retrained
    assert json.loads(config.read_text())["train"]["pooling"] == "region"  # lavise's default explainer

    # more evaluation scenes of the same world: the demo's own are the first of them, image and annotation alike
    more = evaluation_scenes(tmp_path, SMALL, 20)
    assert more == tmp_path / "data" / "evaluation-20"
    assert evaluation_scenes(tmp_path, SMALL, SMALL.evaluation_images) == tmp_path / "data" / "evaluation"
    own, larger = (CocoDataset(folder / "annotations.json", folder / "images")
                   for folder in (tmp_path / "data" / "evaluation", more))
    assert len(own) == 12 and len(larger) == 20 and larger.concepts == own.concepts
    for index in range(12):
        assert own.image_path(index).read_bytes() == larger.image_path(index).read_bytes()
        (concepts, masks), (more_concepts, more_masks) = (data.masks(index, (224, 224)) for data in (own, larger))
        assert concepts == more_concepts and np.array_equal(masks, more_masks)

    authors = DemoSettings(**{**SMALL.__dict__, "explainer_pooling": "mean", "explainer_learning_rate": 1e-4,
                              "explainer_activation_regions": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaviseWarning)
        run_demo(tmp_path, authors, QUIET)
    trained = json.loads(config.read_text())["train"]
    assert (trained["pooling"], trained["learning_rate"], trained["activation_regions"]) == ("mean", 1e-4, 0)  # retrained

    regions = DemoSettings(**{**SMALL.__dict__, "explainer_activation_regions": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaviseWarning)
        run_demo(tmp_path, regions, QUIET)
    run = json.loads(config.read_text())
    assert run["train"]["activation_regions"] == 2 and run["training_rows"] > run["training_pairs"]
    assert checkpoint.stat().st_mtime_ns == stamps[0]  # on the same scenes and scene CNN


def test_scene_cnn_learns_and_loads_as_a_target(tmp_path):
    scenes = generate_scenes(tmp_path / "scenes", SceneSettings(num_images=48, num_concepts=6, unseen_fraction=0.0),
                             part="reference", progress=False)
    dataset = CocoDataset(scenes / "annotations.json", scenes / "images")
    facts = train_scene_cnn(dataset, tmp_path / "cnn.pt", epochs=3, progress=False)
    assert facts["train_label_accuracy"] > 0.5
    model = load_target_model(ModelSpec("scene_cnn", None, str(tmp_path / "cnn.pt")))
    saved = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert torch.equal(model.module.state_dict()["features.0.weight"], saved["features.0.weight"])
    with layer_reader(model.module, DEFAULT_LAYER) as read, torch.inference_mode():
        maps = read(torch.zeros(2, 3, 112, 112))
    assert maps.shape == (2, 256, 14, 14) and maps.min() >= 0  # post-ReLU


def test_scene_vit_learns_and_loads_as_a_token_target(tmp_path):
    from lavise.demos.scene_training import train_scene_vit

    scenes = generate_scenes(tmp_path / "scenes", SceneSettings(num_images=24, num_concepts=4, unseen_fraction=0.0),
                             part="reference", progress=False)
    dataset = CocoDataset(scenes / "annotations.json", scenes / "images")
    facts = train_scene_vit(dataset, tmp_path / "vit.pt", epochs=1, progress=False)
    assert facts["epochs"] == 1 and facts["final_loss"] == facts["final_loss"]  # trained, and not NaN
    saved = torch.load(tmp_path / "vit.pt", weights_only=True)
    assert not any(k.startswith("head.") for k in saved)  # the classifier is not part of the target
    model = load_target_model(ModelSpec("scene_vit", None, str(tmp_path / "vit.pt")))
    assert torch.equal(model.module.state_dict()["blocks.3.mlp.fc2.weight"], saved["blocks.3.mlp.fc2.weight"])
    with layer_reader(model.module, "blocks.3") as read, torch.inference_mode():
        maps = read(torch.zeros(2, 3, 112, 112))
    assert maps.shape == (2, 192, 14, 14) and read.layout.prefix_tokens == 1  # the scene CNN's 14x14 grid


def test_the_scene_cnn_checkpoint_depends_on_its_weights_alone(tmp_path):
    """Two trainings with one seed write the same bytes (the run records the file's digest)."""
    import hashlib

    from lavise.demos.scene_training import _save_backbone
    from lavise.models.scene_cnn import SceneCNN

    digests = set()
    for name in ("a.pt", "b.pt"):
        torch.manual_seed(3)
        _save_backbone(SceneCNN(4), tmp_path / name)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(state) == {k for k in SceneCNN(4).state_dict() if k.startswith("features.")}
