"""How often the planted-bias demo finds its planted concepts, over seeds.

For each setting and seed: run the whole planted-bias demo (scenes in groups a and b,
a group classifier, an explainer, compare-groups) and record, for each planted concept,
whether it is among the first 3 words of one of the 5 most different filters on the side
it was planted (``found``), and its rank in the concept summary. Prints one line per
seed and, per setting, how often each planted concept was found.

Settings:
- closed: the configuration of tests/test_bias_demo.py: ten visually distinct concepts on
  plain backgrounds, filters named from those ten words;
- open: the demo's defaults (``lavise demo-bias``): 12 concepts drawn by the seed,
  photographs and textures behind them, filters named from 20,000 GloVe words.

    python benchmarks/planted_bias.py                    # both, seeds 0-4
    python benchmarks/planted_bias.py --settings closed --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

from lavise.demos.bias import run_bias_demo
from lavise.errors import LaviseWarning
from lavise.settings import BiasDemoSettings, ComputeSettings

CLOSED_WORDS = ("dog", "car", "guitar", "tree", "umbrella", "banana", "book", "clock", "cactus", "hat")


def settings_for(name: str, seed: int, words_file: Path) -> BiasDemoSettings:
    if name == "closed":
        return BiasDemoSettings(
            reference_images=200, target_images=240, concepts=len(CLOSED_WORDS), backgrounds=("plain",),
            concepts_per_image=(1, 2), pretrain_epochs=8, classifier_epochs=5, vocabulary_file=str(words_file),
            words_per_image=1, seed=seed,
        )
    return replace(BiasDemoSettings(), seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", choices=("closed", "open"), default=["closed", "open"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    compute = ComputeSettings(device=args.device, num_workers=0, threads=1, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        words_file = root / "closed-words.txt"
        words_file.write_text("\n".join(CLOSED_WORDS) + "\n")
        for name in args.settings:
            tally: dict[str, list[bool]] = {}
            concept_ranks: dict[str, list] = {}
            print(f"\n== {name} ==", flush=True)
            for seed in args.seeds:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", LaviseWarning)
                    with contextlib.redirect_stdout(io.StringIO()):
                        summary = run_bias_demo(root / f"{name}-{seed}", settings_for(name, seed, words_file), compute)
                parts = []
                for word, found in summary["planted"].items():
                    tally.setdefault(word, []).append(found["found"])
                    rank = found["concept_rank"] if found["concept_direction"] == found["planted_in"] else None
                    concept_ranks.setdefault(word, []).append(rank)
                    where = f"filter #{found['filter_rank']}" if found["found"] else "not found"
                    parts.append(f"{word} ({found['planted_in']}): {where}, concept rank {rank or '-'}")
                accuracy = summary["classifier"]["train_accuracy"]
                print(f"seed {seed}: {'; '.join(parts)}  [classifier {accuracy:.2f}, {time.perf_counter() - start:.0f} s]",
                      flush=True)
            for word, hits in tally.items():
                top3 = sum(1 for r in concept_ranks[word] if r is not None and r <= 3)
                print(f"{name}: '{word}' in the first 3 words of a top-5 filter on its side in {sum(hits)}/{len(hits)} "
                      f"seeds; among the top 3 concepts on its side in {top3}/{len(hits)}")


if __name__ == "__main__":
    main()
