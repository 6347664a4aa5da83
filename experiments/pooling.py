"""Why attention and activation masking score low: pooling over the whole grid vs over the region.

Retrains a demo run's explainer with each pooling (``mean``: the authors' global average of
F ⊙ M; ``region``: the mean inside the mask) and scores the feature-space methods on the
demo's evaluation scenes. Also prints the mean norm of the explainer's training inputs
and of each method's inputs on the top images, which shows the scale mismatch.

    python experiments/pooling.py --demo /tmp/lavise-eval/seed-0 --target scene_cnn

The demo folder must exist (``lavise demo --out DIR``). docs/evaluation.md quotes the output.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from common import DemoFolder, NAMING
from lavise.evaluate import evaluate, markdown_table
from lavise.features import target_features
from lavise.reference import reference_rows
from lavise.regions import top_images
from lavise.inputs import explainer_inputs
from lavise.regions import quantile_thresholds
from lavise.runs import train
from lavise.settings import ComputeSettings, EvaluateSettings

METHODS = ("original", "activation", "attention", "cosine-attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--target", default="scene_cnn", choices=("scene_cnn", "efficientnet_lite0"))
    parser.add_argument("--layer", default=None, help="another layer of the target (default: the demo run's)")
    parser.add_argument("--poolings", nargs="+", default=["mean", "region"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-pooling"))
    parser.add_argument("--learning-rate", type=float, default=None, help="override the run's learning rate")
    parser.add_argument("--epochs", type=int, default=None, help="override the run's epochs")
    parser.add_argument("--word-vectors", default=None,
                        help="word space for the retrained explainers (default: the run's), e.g. a file "
                             "written by experiments/minilm_vectors.py")
    parser.add_argument("--lenient", action="store_true", help="also score lenient recall")
    args = parser.parse_args()

    compute = ComputeSettings(progress=False)
    demo = DemoFolder(args.demo)
    cache, reference, dataset = demo.cache, demo.reference, demo.evaluation
    base = demo.run(args.target)

    model = base.target_model()
    layer = args.layer or base.layer
    # whole masks only: the training inputs and mask areas printed are those of the masks
    pooled = reference_rows(model, layer, reference, cache_dir=cache, compute=compute, activation_regions=0)
    maps = target_features(model, layer, dataset, cache_dir=cache, compute=compute).maps
    thresholds = quantile_thresholds(maps, 0.005)
    chosen = top_images(maps, 25)
    filters = torch.arange(maps.shape[1]).repeat_interleave(chosen.shape[1])
    rows = chosen.flatten()
    print(f"{args.target} {layer}: mean norm of explainer inputs")
    for pooling in args.poolings:
        print(f"  training vectors, {pooling} pooling: {pooled.pooled(pooling).norm(dim=1).mean():.3f}")
        for method in METHODS:
            inputs = explainer_inputs(method, maps[rows], filters, thresholds, pooling)
            print(f"  {method} on the top images, {pooling} pooling: {inputs.norm(dim=1).mean():.3f}")
    region = (maps[rows, filters].flatten(1) > thresholds[filters].unsqueeze(1)).float().mean(dim=1)
    print(f"  activation region: {region.mean():.3f} of the grid on a top image; "
          f"reference masks: {pooled.areas.mean():.3f} of the grid on average")

    overrides = {k: v for k, v in (("learning_rate", args.learning_rate), ("epochs", args.epochs)) if v is not None}
    runs = []
    for pooling in args.poolings:
        runs.append(train(
            base.model_spec, layer, reference, args.work / f"{args.demo.name}-{args.target}-{layer}-{pooling}",
            word_vectors=args.word_vectors or base.config["word_vectors"],
            settings=replace(base.train_settings, pooling=pooling, **overrides), compute=compute, cache_dir=cache,
        ))
    evaluations = evaluate(runs, dataset, settings=EvaluateSettings(methods=METHODS, lenient=args.lenient),
                           explain_settings=NAMING, compute=compute, cache_dir=cache, write=False)
    for pooling, evaluation in zip(args.poolings, evaluations):
        print(f"\n{pooling} pooling\n")
        print(markdown_table([evaluation]))


if __name__ == "__main__":
    main()
