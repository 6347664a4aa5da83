"""Time training and explaining ResNet-18 layer4 with 1,000 reference and 1,000 target images.

Prints each stage's wall time and the share spent in the backbone's forward pass
(measured by hooks on the model's input and on layer4), then the same pipeline again on
warm caches. Random weights: the timing does not depend on them.

    python benchmarks/core_timing.py [--images 1000] [--workers 2] [--out /tmp/lavise-bench]
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import torch

from lavise.datasets import CocoDataset
from lavise.errors import LaviseWarning
from lavise.explain import explain
from lavise.models import ModelSpec, load_target_model
from lavise.runs import train
from lavise.settings import ComputeSettings, ExplainSettings, SceneSettings, TrainSettings
from lavise.synthetic import generate_scenes


class ForwardClock:
    """Accumulates the time between the model's forward pre-hook and the layer's hook."""

    def __init__(self, module: torch.nn.Module, layer: str) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._begin)
        module.get_submodule(layer).register_forward_hook(self._end)

    def _begin(self, *_):
        self._start = time.perf_counter()

    def _end(self, *_):
        self.total += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lavise-bench"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", LaviseWarning)
    torch.manual_seed(0)

    scenes = SceneSettings(num_images=args.images, num_concepts=60, unseen_fraction=0.0, seed=0)
    start = time.perf_counter()
    reference_dir = generate_scenes(args.out / "reference", scenes, part="reference", progress=False)
    target_dir = generate_scenes(args.out / "target", SceneSettings.from_dict({**scenes.to_dict(), "seed": 1}),
                                 part="evaluation", progress=False)
    print(f"scene generation (cached after the first call): {time.perf_counter() - start:.1f} s")
    reference = CocoDataset(reference_dir / "annotations.json", reference_dir / "images")

    compute = ComputeSettings(num_workers=args.workers, progress=False, device="cpu")
    cache = args.out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} loader workers")
    for attempt in ("cold cache", "warm cache"):
        model = load_target_model(ModelSpec("resnet18"))
        clock = ForwardClock(model.module, "layer4")
        start = time.perf_counter()
        run = train(model, "layer4", reference, args.out / "run", settings=TrainSettings(), compute=compute, cache_dir=cache)
        trained = time.perf_counter()
        explain(run, target_dir / "images", settings=ExplainSettings(), compute=compute, model=model, cache_dir=cache)
        done = time.perf_counter()
        total = done - start
        print(
            f"{attempt}: train {trained - start:.1f} s ({run.config['training_pairs']} pairs, "
            f"{run.config['train']['epochs']} epochs), explain {done - trained:.1f} s, total {total:.1f} s; "
            f"backbone forward {clock.total:.1f} s = {100 * clock.total / total:.0f} % of the total"
        )


if __name__ == "__main__":
    main()
