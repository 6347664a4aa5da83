"""What the two demos share: their targets, scene counts, and work done once per key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lavise.datasets.coco import CocoDataset
from lavise.models import ModelSpec, load_target_model
from lavise.runs import Run, load_run, train
from lavise.settings import ComputeSettings, SceneSettings, TrainSettings
from lavise.storage import read_json, write_json


@dataclass(frozen=True)
class DemoTarget:
    """A model the demo explains: its key (the run's folder name), spec, layer and title."""

    key: str
    spec: ModelSpec
    layer: str
    title: str


def with_count(scenes: SceneSettings, count: int) -> SceneSettings:
    """The same scene settings with another number of scenes."""
    return SceneSettings.from_dict({**scenes.to_dict(), "num_images": count})


def trained_once(path: Path, key: dict, train_model: Callable[[], dict]) -> dict:
    """Train a demo model unless ``path`` was made under ``key``; its record.

    ``train_model()`` writes the model to ``path`` and returns facts about the
    training; the key and the facts are recorded beside it (``path`` with ``.json``),
    written last, and a later call with the same key reuses the model.
    """
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and read_json(record).get("key") == key:
        return read_json(record)
    facts = {"key": key, **train_model()}
    write_json(record, facts)
    return facts


def trained_run(folder: Path, target: DemoTarget, reference: CocoDataset, settings: TrainSettings,
                compute: ComputeSettings, cache_dir: Path) -> Run:
    """Reuse a run trained with the same model, layer, data and settings; else train."""
    if (folder / "config.json").is_file():
        run = load_run(folder)
        model = load_target_model(target.spec)
        same = (
            run.config["model"] == model.description
            and run.config["layer"] == target.layer
            and run.config["train"] == settings.to_dict()
            and run.config["reference"]["identity"] == reference.identity()
        )
        if same:
            return run
    return train(target.spec, target.layer, reference, folder, settings=settings, compute=compute, cache_dir=cache_dir)
