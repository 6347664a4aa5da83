"""A planted bias, found without labels: the proof that ``compare-groups`` works.

Offline and on two CPU cores in a few minutes (``lavise demo-bias``):

1. planted-concept scenes in two groups "a" and "b" that differ only in how often some
   concepts appear (by default a dog in 60 % of group a's scenes and 10 % of group b's,
   a car the other way round; everything else is drawn alike), as reference scenes with
   masks and as target scenes with a ``groups.csv``;
2. the small scene CNN trained to tell group a from group b, from the group labels
   alone: nobody tells it that dogs or cars matter. Like the paper's ResNet-18 (ImageNet
   weights fine-tuned to classify gender), it starts by default from a backbone
   pretrained to recognise the concepts of the reference scenes; with
   ``pretrain_epochs=0`` it starts from random weights;
3. an explainer trained for its last layer on the reference scenes, and its filters
   named from the target scenes;
4. ``compare_groups`` on the target scenes: the filters whose qualified images differ
   most between the groups, and the concepts that add up the most evidence.

The planted concepts should come out on top, each in the direction it was planted.
:func:`planted_findings` measures it; ``benchmarks/planted_bias.py`` repeats it over
seeds. Everything lands under ``--out`` and is reused by a second run with the same
settings.
"""

from __future__ import annotations

from pathlib import Path

from lavise.compute import cpu_threads, resolve_device
from lavise.datasets.coco import CocoDataset
from lavise.datasets.groups import read_groups
from lavise.demos.common import DemoTarget, trained_once, trained_run, with_count
from lavise.demos.scene_training import train_group_classifier, train_scene_cnn
from lavise.embeddings import load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.groups import GroupComparison, compare_groups, format_comparison
from lavise.models import ModelSpec
from lavise.models.scene_cnn import DEFAULT_LAYER
from lavise.settings import (
    GROUP_NAMES, BiasDemoSettings, ComputeSettings, ExplainSettings, GroupSettings, SceneSettings, TrainSettings,
    parse_group_bias,
)
from lavise.storage import read_json, write_json
from lavise.synthetic import OPENMOJI_ATTRIBUTION, generate_scenes


def run_bias_demo(
    out: Path, settings: BiasDemoSettings = BiasDemoSettings(), compute: ComputeSettings = ComputeSettings()
) -> dict:
    """Run the planted-bias demo under ``out``; return its summary (also saved as bias_demo.json).

    Example:
        >>> summary = run_bias_demo("lavise-bias-demo")  # doctest: +SKIP
        >>> summary["planted"]["dog"]["found"]  # doctest: +SKIP
        True
    """
    out = Path(out)
    cache_dir = out / "cache"
    planted = parse_group_bias(settings.planted)
    vocabulary = load_word_vectors().vocabulary(size=settings.vocabulary_size, word_list=settings.vocabulary_file)
    scenes = SceneSettings(
        image_size=settings.image_size, num_concepts=settings.concepts, unseen_fraction=0.0,
        seed=settings.seed, group_bias=planted, backgrounds=settings.backgrounds,
        concepts_per_image=settings.concepts_per_image,
    )
    reference_dir = generate_scenes(
        out / "data" / "reference", with_count(scenes, settings.reference_images),
        part="reference", allowed_words=vocabulary.words, progress=compute.progress,
    )
    target_dir = generate_scenes(
        out / "data" / "target", with_count(scenes, settings.target_images),
        part="evaluation", allowed_words=vocabulary.words, progress=compute.progress,
    )
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")
    classifier, facts = _group_classifier(out, reference, target_dir, settings, compute)
    target = DemoTarget("group_cnn", ModelSpec("scene_cnn", None, str(classifier)), DEFAULT_LAYER,
                        "scene CNN trained to tell group a from group b")
    train_settings = TrainSettings(
        seed=settings.seed, epochs=settings.explainer_epochs, learning_rate=settings.explainer_learning_rate
    )
    run = trained_run(out / "runs" / "group_cnn", target, reference, train_settings, compute, cache_dir)
    naming = {"vocabulary_size": settings.vocabulary_size, "vocabulary_file": settings.vocabulary_file}
    if settings.words_per_image:
        naming["words_per_image"] = settings.words_per_image
    explain_settings = ExplainSettings(**naming)
    explain(run, target_dir / "images", settings=explain_settings, compute=compute, cache_dir=cache_dir)
    comparison = compare_groups(
        run, target_dir / "images", target_dir / "groups.csv", compute=compute, cache_dir=cache_dir,
        settings=GroupSettings(min_group_images=min(GroupSettings().min_group_images, settings.target_images // 2)),
    )
    findings = planted_findings(comparison, planted, top_filters=settings.top_filters)
    summary = {
        "settings": settings.to_dict(),
        "attribution": OPENMOJI_ATTRIBUTION,
        "classifier": facts,
        "groups": read_json(target_dir / "scenes.json")["summary"]["groups"],
        "run": str(run.path),
        "planted": findings,
    }
    write_json(out / "bias_demo.json", summary)
    print_findings(comparison, findings)
    print(f"\nOutputs: {run.path} (groups.json, groups.csv, groups.png); summary {out / 'bias_demo.json'}")
    print(OPENMOJI_ATTRIBUTION)
    return summary


def planted_findings(
    comparison: GroupComparison, planted: tuple[tuple[str, tuple[float, ...]], ...], *, top_filters: int = 5, words: int = 3
) -> dict:
    """Where each planted concept came out.

    For each planted word: the group it was planted in most (``planted_in``); the rank
    (1-based) of the best of the top ``top_filters`` filters whose first ``words`` words
    hold it and that qualify more images of that group (``filter_rank``, None if none;
    ``found`` when there is one); and its rank and direction in the concept summary.
    """
    concept_rank = {c.word: (rank, c) for rank, c in enumerate(comparison.concepts, start=1)}
    findings = {}
    for word, chances in planted:
        group = GROUP_NAMES[max(range(len(chances)), key=lambda g: chances[g])]
        ranks = [
            rank for rank, f in enumerate(comparison.filters[:top_filters], start=1)
            if word in f.words[:words] and f.higher == group
        ]
        rank, concept = concept_rank.get(word, (None, None))
        findings[word] = {
            "planted_in": group,
            "found": bool(ranks),
            "filter_rank": ranks[0] if ranks else None,
            "concept_rank": rank,
            "concept_direction": concept.direction if concept else None,
            "concept_score": concept.score if concept else None,
        }
    return findings


def print_findings(comparison: GroupComparison, findings: dict, rows: int = 8) -> None:
    """The top filters and concepts, and where each planted concept ranks."""
    print("\n" + format_comparison(comparison, rows=rows) + "\n")
    for word, found in findings.items():
        where = f"top filter #{found['filter_rank']}" if found["found"] else "not among the top filters' first words"
        print(f"planted '{word}' (more in {found['planted_in']}): {where}; concept rank {found['concept_rank']} "
              f"(more in {found['concept_direction']})")


def _group_classifier(
    out: Path, reference: CocoDataset, target_dir: Path, settings: BiasDemoSettings, compute: ComputeSettings
) -> tuple[Path, dict]:
    """Pretrain on the reference concepts (optional), then train on the target scenes' group labels.

    Each model is trained once per data and settings, and reused.
    """
    groups = read_groups(target_dir / "images", target_dir / "groups.csv")
    if len(groups) != settings.target_images:
        raise LaviseError(f"'{target_dir / 'groups.csv'}' lists {len(groups)} usable scenes of {settings.target_images}.")
    device = resolve_device(compute.device)
    pretrained, pretrain_key = None, None
    with cpu_threads(compute, workers=0):  # the scenes are decoded up front, no workers
        if settings.pretrain_epochs:
            pretrained = out / "models" / "pretrained_cnn.pt"
            pretrain_key = {"reference": reference.identity(), "epochs": settings.pretrain_epochs, "seed": settings.seed,
                            "batch_size": settings.classifier_batch_size}
            trained_once(pretrained, pretrain_key, lambda: train_scene_cnn(
                reference, pretrained, epochs=settings.pretrain_epochs, seed=settings.seed,
                batch_size=settings.classifier_batch_size, device=device, progress=compute.progress,
            ))
        path = out / "models" / "group_cnn.pt"
        key = {"images": groups.identity(), "epochs": settings.classifier_epochs, "seed": settings.seed,
               "batch_size": settings.classifier_batch_size, "pretrained": pretrain_key}
        facts = trained_once(path, key, lambda: train_group_classifier(
            groups.paths, groups.groups, path, epochs=settings.classifier_epochs, seed=settings.seed,
            batch_size=settings.classifier_batch_size, init=pretrained, device=device, progress=compute.progress,
        ))
    return path, facts
