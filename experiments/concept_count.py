"""More reference concepts: does the explainer then name the held-out ones?

Generates planted-concept scenes with many concepts (30 % held out of the reference
scenes), trains an EfficientNet-Lite0 ``blocks.5.0.bn1`` explainer with region pooling
and lr 1e-3, and scores seen and unseen recall on evaluation scenes that hold every
concept. The zero-shot literature finds transfer grows with the number of training
classes; this measures whether it does here.

    python experiments/concept_count.py --concepts 300 --reference 3000 --evaluation 500
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from common import NAMING  # experiments/ is on the path when a script in it runs
from lavise.datasets.coco import CocoDataset
from lavise.embeddings import load_word_vectors
from lavise.evaluate import evaluate, markdown_table
from lavise.models import ModelSpec
from lavise.runs import train
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings, SceneSettings, TrainSettings
from lavise.synthetic import generate_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=300)
    parser.add_argument("--reference", type=int, default=3000, help="reference scenes")
    parser.add_argument("--evaluation", type=int, default=500, help="evaluation scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-concepts"))
    args = parser.parse_args()

    out = args.work / f"concepts-{args.concepts}-seed-{args.seed}"
    cache = out / "cache"
    compute = ComputeSettings(progress=False)
    vocabulary = load_word_vectors().vocabulary(size=ExplainSettings().vocabulary_size)
    scenes = SceneSettings(num_concepts=args.concepts, unseen_fraction=0.3, seed=args.seed)
    started = time.perf_counter()
    reference_dir = generate_scenes(out / "reference", replace(scenes, num_images=args.reference), part="reference",
                                    allowed_words=vocabulary.words, progress=False)
    evaluation_dir = generate_scenes(out / "evaluation", replace(scenes, num_images=args.evaluation), part="evaluation",
                                     allowed_words=vocabulary.words, progress=False)
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")
    dataset = CocoDataset(evaluation_dir / "annotations.json", evaluation_dir / "images")
    run = train(ModelSpec("efficientnet_lite0", "IMAGENET"), "blocks.5.0.bn1", reference, out / "run",
                settings=TrainSettings(seed=args.seed, pooling="region", learning_rate=1e-3),
                compute=compute, cache_dir=cache)
    (evaluation,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation", "attention")),
                             explain_settings=NAMING, compute=compute, cache_dir=cache, write=False)
    print(f"{len(run.split['seen'])} seen concepts, {len(reference)} reference and {len(dataset)} evaluation scenes, "
          f"{time.perf_counter() - started:.0f} s\n")
    print(markdown_table([evaluation]))
    for method, summary in evaluation.methods.items():
        print(f"{method}: {summary['unseen_concepts']} unseen concepts are some filter's ground truth; "
              f"unseen named@20 {summary['unseen_named@20']}, lenient {summary['lenient']['unseen_named@20']}")


if __name__ == "__main__":
    main()
