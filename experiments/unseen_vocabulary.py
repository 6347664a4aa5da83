"""Are unseen concepts near the explainer's output, only outranked by seen words?

Names the demo runs' filters from the default 20,000-word vocabulary *minus every seen
concept name* and scores unseen recall. If the held-out concepts were being crowded out
by seen words, they would surface here; a recall that stays 0 says the explainer's
output carries no trace of them, so re-ranking or calibrating words cannot help.

    python experiments/unseen_vocabulary.py --demo /tmp/lavise-eval/seed-0
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import DemoFolder
from lavise.embeddings import load_word_vectors
from lavise.evaluate import evaluate, markdown_table
from lavise.settings import ComputeSettings, EvaluateSettings, ExplainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["scene_cnn", "efficientnet_lite0"])
    args = parser.parse_args()
    demo = DemoFolder(args.demo)
    cache = demo.cache
    vocabulary = load_word_vectors(cache_dir=cache).vocabulary(size=ExplainSettings().vocabulary_size)
    dataset = demo.evaluation
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            run = demo.run(target)
            seen = set(run.split["seen"])
            words = Path(tmp) / f"{target}.txt"
            words.write_text("\n".join(w for w in vocabulary.words if w not in seen) + "\n")
            (evaluation,) = evaluate(
                [run], dataset, settings=EvaluateSettings(methods=("activation", "attention", "cosine-attention"), lenient=False),
                explain_settings=ExplainSettings.as_in_0_4(vocabulary_file=str(words)), compute=ComputeSettings(progress=False),
                cache_dir=cache, write=False,
            )
            print(f"\n{target}: vocabulary of {len(vocabulary.words) - len(seen & set(vocabulary.words))} words "
                  f"(the default {len(vocabulary.words)} minus {len(seen)} seen concept names)\n")
            print(markdown_table([evaluation]))


if __name__ == "__main__":
    main()
