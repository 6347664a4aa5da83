"""The built-in demo: planted-concept scenes, two real targets, filters named in words.

Offline and on two CPU cores in a few minutes:

1. generate reference scenes (seen concepts only) and evaluation scenes (all concepts,
   some held out of training) with :mod:`lavise.synthetic`;
2. targets: EfficientNet-Lite0 with ImageNet weights, and a small CNN trained here to
   tell which concepts a scene holds (so its filters are known to carry them);
3. train an explainer per target on the reference scenes;
4. explain every filter on the evaluation scenes plus scikit-image's photographs;
5. print the most confidently named filters with their words, marking held-out concepts.

Everything lands under ``--out`` in the layout of ``lavise train``/``explain``; data,
features, the scene CNN and explainers are reused by a second run with the same settings.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from lavise.compute import cpu_threads, resolve_device
from lavise.datasets.coco import CocoDataset
from lavise.demos.common import DemoTarget, trained_once, trained_run, with_count
from lavise.demos.scene_training import train_scene_cnn
from lavise.embeddings import load_word_vectors
from lavise.explain import Explanations, explain, most_trusted, naming_line
from lavise.models import ModelSpec
from lavise.settings import ComputeSettings, DemoSettings, SceneSettings, TrainSettings
from lavise.storage import read_json, write_json
from lavise.synthetic import OPENMOJI_ATTRIBUTION, generate_scenes
from lavise.vocabulary import candidate_vocabulary

# scikit-image photographs that load offline, added to the target images.
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "stereo_motorcycle", "camera", "coins", "hubble_deep_field")


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), compute: ComputeSettings = ComputeSettings()) -> dict:
    """Run the whole demo under ``out``; return a summary (also saved as demo.json)."""
    out = Path(out)
    cache_dir = out / "cache"
    explain_settings = settings.explain_settings()
    vocabulary = candidate_vocabulary(load_word_vectors(), kind=settings.vocabulary, size=settings.vocabulary_size)
    reference_dir = generate_scenes(
        out / "data" / "reference", with_count(scene_settings(settings), settings.reference_images),
        part="reference", allowed_words=vocabulary.words, progress=compute.progress,
    )
    evaluation_dir = evaluation_scenes(out, settings, settings.evaluation_images, vocabulary.words, compute.progress)
    split = read_json(evaluation_dir / "split.json")
    target_dir = _target_images(out / "data" / "target", evaluation_dir)
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")

    scene_cnn = _scene_cnn(out, reference, settings, compute)
    targets = [
        DemoTarget("efficientnet_lite0", ModelSpec("efficientnet_lite0", "IMAGENET"), "blocks.5.0.bn1",
                   "EfficientNet-Lite0, ImageNet weights"),
        DemoTarget("scene_cnn", ModelSpec("scene_cnn", None, str(scene_cnn)), "features.11",
                   "small CNN trained on the scenes"),
    ]
    train_settings = explainer_settings(settings)
    results = {}
    for target in targets:
        run = trained_run(out / "runs" / target.key, target, reference, train_settings, compute, cache_dir)
        results[target.key] = explain(run, target_dir, settings=explain_settings, compute=compute, cache_dir=cache_dir)

    summary = {
        "settings": asdict(settings),
        "attribution": OPENMOJI_ATTRIBUTION,
        "seen_concepts": split["seen"],
        "unseen_concepts": split["unseen"],
        "runs": {key: str(out / "runs" / key) for key in results},
    }
    write_json(out / "demo.json", summary)
    (out / "ATTRIBUTION.txt").write_text(OPENMOJI_ATTRIBUTION + "\n", encoding="utf-8")
    for target in targets:
        print_table(target.title, target.layer, results[target.key], split["seen"], split["unseen"])
    print(f"\nOutputs: {out} (runs/<target>/explanations.json, explanations.csv)")
    runs = " ".join(str(out / "runs" / key) for key in results)
    print(f"Next: lavise evaluate {runs} --dataset {evaluation_dir / 'annotations.json'}")
    print(f"      lavise report {out / 'runs' / targets[0].key}")
    print(OPENMOJI_ATTRIBUTION)
    return summary


def evaluation_scenes(out: Path, settings: DemoSettings, count: int, words: list[str] | None = None,
                      progress: bool = False) -> Path:
    """The folder of the demo world's first ``count`` evaluation scenes, made when missing.

    Scene i of a part is drawn from the seed and i alone, so the demo's own
    ``evaluation_images`` scenes (``out/data/evaluation``) are the first of any larger set
    (``out/data/evaluation-COUNT``): more ground truth for the same world, where the
    demo's 150 scoring scenes leave many filters' ground truth to chance
    (``experiments/evaluation_size.py``). ``words``: the demo vocabulary's, to save loading it again.
    """
    folder = Path(out) / "data" / ("evaluation" if count == settings.evaluation_images else f"evaluation-{count}")
    if words is None:
        words = candidate_vocabulary(load_word_vectors(), kind=settings.vocabulary, size=settings.vocabulary_size).words
    return generate_scenes(folder, with_count(scene_settings(settings), count), part="evaluation", allowed_words=words,
                           progress=progress)


def scene_settings(settings: DemoSettings) -> SceneSettings:
    """The scenes of the demo's world (their count aside)."""
    return SceneSettings(num_concepts=settings.concepts, unseen_fraction=settings.unseen_fraction, seed=settings.seed,
                         background_concepts=settings.background_concepts)


def explainer_settings(settings: DemoSettings) -> TrainSettings:
    """How the demo trains each target's explainer."""
    return TrainSettings(
        seed=settings.seed, epochs=settings.explainer_epochs,
        pooling=settings.explainer_pooling, learning_rate=settings.explainer_learning_rate,
        activation_regions=settings.explainer_activation_regions,
    )


def _target_images(folder: Path, evaluation_dir: Path) -> Path:
    """Evaluation scenes (linked, not copied) plus scikit-image photographs."""
    import skimage.data

    scenes = folder / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    for source in sorted((evaluation_dir / "images").iterdir()):
        destination = scenes / source.name
        if not destination.exists():
            try:
                os.link(source, destination)
            except OSError:
                shutil.copyfile(source, destination)
    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    for name in PHOTOS:
        path = photos / f"{name}.png"
        if not path.exists():
            array = getattr(skimage.data, name)()
            array = array[0] if isinstance(array, tuple) else array
            Image.fromarray(np.asarray(array)).convert("RGB").save(path)
    return folder


def _scene_cnn(out: Path, reference: CocoDataset, settings: DemoSettings, compute: ComputeSettings) -> Path:
    """Train the small scene CNN once per reference data and settings."""
    path = out / "models" / "scene_cnn.pt"
    key = {"reference": reference.identity(), "epochs": settings.scene_cnn_epochs, "seed": settings.seed}
    with cpu_threads(compute, workers=0):  # the scenes are decoded up front, no workers
        trained_once(path, key, lambda: train_scene_cnn(
            reference, path, epochs=settings.scene_cnn_epochs, seed=settings.seed,
            device=resolve_device(compute.device), progress=compute.progress,
        ))
    return path


def print_table(title: str, layer: str, explanations: Explanations, seen: list[str], unseen: list[str], rows: int = 12) -> None:
    """The most confidently named filters: their top words, with held-out concepts marked."""
    seen_set, unseen_set = set(seen), set(unseen)

    def mark(word: str) -> str:
        return f"{word}*" if word in unseen_set else f"{word}+" if word in seen_set else word

    active = [f for f in explanations.filters if f.words]
    ranked = most_trusted(active)[:rows]
    named = sum(f.named for f in active)
    print(f"\n{title} — {layer}, {len(explanations.filters)} filters, method {explanations.method}; "
          f"{named} of {len(active)} with a confident name")
    print(f"{'filter':>6}  confidence  top words (n/m: the nearest word on n top images, among the 5 nearest on m)"
          "   [+ seen concept, * held-out concept]")
    for f in ranked:
        print(f"{f.filter:>6}  " + naming_line(f, 6, mark))
    named_unseen = sorted({w["word"] for f in active if f.named for w in f.words[:5]} & unseen_set)
    print(f"held-out concepts among the top 5 words of a confidently named filter: {', '.join(named_unseen) or 'none'}")
