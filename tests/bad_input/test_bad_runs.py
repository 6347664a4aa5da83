"""Bad input: run directories — foreign folders, retraining, damaged files, changed checkpoints, permissions."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from lavise.datasets import open_reference
from lavise.errors import LaviseError, LaviseWarning
from lavise.explain import explain
from lavise.groups import compare_groups
from lavise.models import ModelSpec, load_target_model
from lavise.report import write_report
from lavise.runs import load_run, train
from lavise.settings import ExplainSettings, GroupSettings, TrainSettings
from lavise.storage import output_set, write_json

ONE_EPOCH = TrainSettings(epochs=1)
FEW_WORDS = ExplainSettings(top_images=5, vocabulary_size=500)
pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")


def _train(model, coco, out, compute, tmp_path, settings=ONE_EPOCH):
    return train(model, "features.3", open_reference(coco), out, settings=settings, compute=compute,
                 cache_dir=tmp_path / "cache")


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- where a run may be written ------------------------------------------------------------


def test_a_users_config_json_is_never_overwritten(tmp_path, coco, tiny_model, compute):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"learning_rate": 0.1, "my": "settings"}))
    (folder / "notes.txt").write_text("mine")
    before = _contents(folder)
    with pytest.raises(LaviseError, match=re.escape(f"'{folder / 'config.json'}' is not a lavise run's config.json")):
        _train(tiny_model, coco, folder, compute, tmp_path)
    assert _contents(folder) == before and not list(folder.glob(".*"))


@pytest.mark.parametrize("files", [["notes.txt"], ["data.csv", "explainer.safetensors"], ["sub/"]])
def test_a_folder_of_other_files_is_refused_before_any_work(tmp_path, coco, tiny_model, compute, files):
    folder = tmp_path / "project"
    folder.mkdir()
    for name in files:
        if name.endswith("/"):
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(b"user data")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(LaviseError, match="holds files that are not a lavise run"):
        _train(tiny_model, coco, folder, compute, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (tmp_path / "cache").exists()  # refused before any image was read


def test_a_run_directory_that_is_a_file_is_refused(tmp_path, coco, tiny_model, compute):
    path = tmp_path / "run"
    path.write_text("a file")
    with pytest.raises(LaviseError, match="is a file, not a folder"):
        _train(tiny_model, coco, path, compute, tmp_path)
    with pytest.raises(LaviseError, match="is a file, not a run directory"):
        load_run(path)
    assert path.read_text() == "a file"


def test_an_empty_folder_and_a_half_written_run_can_be_trained_into(tmp_path, coco, tiny_model, compute):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_run(_train(tiny_model, coco, empty, compute, tmp_path).path).config["run_id"]
    half = tmp_path / "half"
    shutil.copytree(empty, half)
    (half / "config.json").write_text('{"lavise_vers')  # killed while writing, by an older version
    (half / "report").mkdir()  # lavise report's default folder is part of a run
    assert load_run(_train(tiny_model, coco, half, compute, tmp_path).path).config["run_id"]


def test_retraining_replaces_the_runs_files_and_keeps_the_users(tmp_path, explained, tiny_model, grouped, coco, compute):
    run = explained
    compare_groups(run, grouped, settings=GroupSettings(min_group_images=10, examples=2, chart_filters=4),
                   compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    write_json(run.path / "evaluation.json", {"model": "tiny", "layer": run.layer, "run_id": run.config["run_id"],
                                              "methods": {}, "filters": []})
    (run.path / "notes.txt").write_text("my notes on this run")
    old_groups = (run.path / "groups.json").read_bytes()
    assert {"explanations.json", "groups.json", "thresholds.safetensors"} <= set(_contents(run.path))

    again = _train(tiny_model, coco, run.path, compute, tmp_path, settings=TrainSettings(epochs=2))
    names = set(_contents(run.path))
    assert names == {"config.json", "split.json", "explainer.safetensors", "reference_outputs.safetensors",
                     "filter_survey.safetensors", "training.csv", "notes.txt"}  # the old explainer's outputs went with it
    assert (run.path / "notes.txt").read_text() == "my notes on this run"
    assert again.config["run_id"] != run.config["run_id"]

    # An old groups.json put back (or passed) is not shown as the new explainer's
    explain(again, grouped, settings=FEW_WORDS, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    (run.path / "groups.json").write_bytes(old_groups)
    with pytest.warns(LaviseWarning, match=r"groups.json' was made from another training of the run and is left out"):
        index = write_report(run.path, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    script = (index.parent / "data.js").read_text()
    data = json.loads(json.loads(script[script.index("JSON.parse(") + 11: script.rindex(")")]))
    assert data["groups"] is None


def test_groups_of_an_earlier_explanation_are_left_out_of_the_report(tmp_path, explained, tiny_model, grouped, compute):
    compare_groups(explained, grouped, settings=GroupSettings(min_group_images=10, examples=2, chart_filters=4),
                   compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    explain(explained, grouped, settings=ExplainSettings(top_images=4, vocabulary_size=400), compute=compute,
            model=tiny_model, cache_dir=tmp_path / "cache")
    with pytest.warns(LaviseWarning, match="made from another explanation of the filters"):
        write_report(explained.path, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")


def test_explanations_of_another_training_are_refused_by_the_report(tmp_path, explained, compute, tiny_model):
    data = json.loads((explained.path / "explanations.json").read_text())
    data["run_id"] = "0" * 32
    (explained.path / "explanations.json").write_text(json.dumps(data))
    with pytest.raises(LaviseError, match="was made with another training of the run"):
        write_report(explained.path, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")


# --- damaged runs ----------------------------------------------------------------------------


def _edit_config(run_path: Path, edit) -> None:
    config = json.loads((run_path / "config.json").read_text())
    edit(config)
    (run_path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.joinpath("config.json").write_text(p.joinpath("config.json").read_text()[:40]), r"config.json' is damaged \("),
        (lambda p: p.joinpath("config.json").write_text("[1, 2]"), r"config.json' is damaged: it holds a list"),
        (lambda p: p.joinpath("config.json").write_bytes(b"\xff\xfe\x00garbage"), r"config.json' is damaged"),
        (lambda p: _edit_config(p, lambda c: c.pop("feature_shape")), r"config.json' is damaged: it has no 'feature_shape'"),
        (lambda p: _edit_config(p, lambda c: c.update(feature_shape="8x8")), r"'feature_shape' should be a list of positive integers"),
        (lambda p: _edit_config(p, lambda c: c.update(feature_shape=[8, 0, 4])), r"'feature_shape' should be"),
        (lambda p: _edit_config(p, lambda c: c.update(word_dim=-50)), r"'word_dim' should be a positive integer"),
        (lambda p: _edit_config(p, lambda c: c.update(word_dim=50.5)), r"'word_dim' should be a positive integer"),
        (lambda p: _edit_config(p, lambda c: c.update(layer=None)), r"'layer' should be a layer name"),
        (lambda p: _edit_config(p, lambda c: c.update(model="tiny")), r"'model' should be an object"),
        (lambda p: _edit_config(p, lambda c: c["train"].pop("dropout")), r"'train' should be an object"),
        (lambda p: _edit_config(p, lambda c: c["train"].update(dropout=2)), r"'train' should be"),
        (lambda p: _edit_config(p, lambda c: c.update(word_dim=300)), r"explainer.safetensors' is damaged or does not fit"),
        (lambda p: _edit_config(p, lambda c: c["train"].update(epochs="many")), r"config.json' is damaged: its training settings are wrong \(.*epochs"),
        (lambda p: _edit_config(p, lambda c: c["train"].update(unknown_setting=1)), r"config.json' is damaged: its training settings are wrong"),
        (lambda p: p.joinpath("split.json").write_text('{"seen": ["a"'), r"split.json' is damaged"),
        (lambda p: p.joinpath("split.json").write_text('{"seen": "cat", "unseen": []}'), r"'seen' should be a list of concept names"),
        (lambda p: p.joinpath("explainer.safetensors").write_bytes(p.joinpath("explainer.safetensors").read_bytes()[:100]),
         r"explainer.safetensors' is damaged"),
        (lambda p: p.joinpath("explainer.safetensors").write_bytes(b""), r"explainer.safetensors' is damaged"),
        (lambda p: p.joinpath("explainer.safetensors").unlink(), r"has no explainer.safetensors"),
    ],
)
def test_damaged_runs_are_named(tiny_run, damage, message):
    damage(tiny_run.path)
    with pytest.raises(LaviseError, match=message):
        load_run(tiny_run.path)


# --- the model of a run -----------------------------------------------------------------------


def _resnet_reference(tmp_path, coco_maker):
    return open_reference(coco_maker(tmp_path / "ref", images=6, size=64))


def test_a_checkpoint_changed_after_training_is_refused(tmp_path, coco_maker, compute, monkeypatch):
    torch.manual_seed(1)
    checkpoint = tmp_path / "weights" / "resnet.pt"
    checkpoint.parent.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    monkeypatch.chdir(checkpoint.parent)
    run = train(ModelSpec("resnet18", checkpoint="resnet.pt"), "layer1", _resnet_reference(tmp_path, coco_maker),
                tmp_path / "run", settings=ONE_EPOCH, compute=compute, cache_dir=tmp_path / "cache")
    # recorded absolute: the run works from any working directory
    assert run.config["model"]["checkpoint"] == str(checkpoint)
    monkeypatch.chdir(tmp_path)
    load_run(tmp_path / "run").target_model()

    torch.manual_seed(2)  # same architecture, other weights, same file
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    with pytest.raises(LaviseError, match=r"is not the file run .* was trained with \(sha256 now .*Put the original file back"):
        load_run(tmp_path / "run").target_model()
    with pytest.raises(LaviseError, match="is not the file run"):
        explain(tmp_path / "run", tmp_path / "ref" / "images", compute=compute, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run" / "explanations.json").exists()


def test_a_fine_tuned_classifier_of_another_size_is_read(tmp_path):
    torch.manual_seed(0)
    tuned = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "tuned.pt")
    with pytest.warns(LaviseWarning, match=r"fc \(1000, 512\) → \(7, 512\)"):
        model = load_target_model(ModelSpec("resnet18", checkpoint=str(tmp_path / "tuned.pt")))
    assert model.module.fc.out_features == 7
    assert torch.equal(model.module.layer3[1].conv2.weight, tuned.layer3[1].conv2.weight)
    assert torch.equal(model.module.fc.weight, tuned.fc.weight)


def test_a_checkpoint_of_another_architecture_is_still_refused(tmp_path):
    other = torchvision.models.resnet18()
    other.bn1 = torch.nn.BatchNorm2d(32)  # a change inside the network, not a head
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(LaviseError, match=r"does not fit the architecture: bn1 \(BatchNorm2d\)"):
        load_target_model(ModelSpec("resnet18", checkpoint=str(tmp_path / "other.pt")))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(LaviseError, match="unexpected keys"):
        load_target_model(ModelSpec("resnet18", checkpoint=str(tmp_path / "deeper.pt")))


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with output_set(tmp_path / "set", last="b.json") as outputs:
            write_json(outputs.path("b.json"), 2)
            outputs.path("c.txt").write_text("plain")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "set" / "b.json", tmp_path / "set" / "c.txt"):
        assert path.stat().st_mode & 0o777 == mode, path


def test_run_files_are_readable_by_the_group_under_the_usual_umask(tmp_path, coco, tiny_model, compute):
    old = os.umask(0o022)
    try:
        run = _train(tiny_model, coco, tmp_path / "run", compute, tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in run.path.iterdir()} == {p.name: 0o644 for p in run.path.iterdir()}


def test_warnings_are_not_raised_for_a_clean_retrain(tmp_path, coco, tiny_model, compute):
    run = _train(tiny_model, coco, tmp_path / "run", compute, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)
        _train(tiny_model, coco, run.path, compute, tmp_path)
