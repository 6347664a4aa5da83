"""A world of hundreds of concepts: the OpenMoji pool read through WordNet, with families.

``SceneSettings.pool = "wordnet"`` keeps the emoji concepts of the name rule
(:mod:`lavise.synthetic.concepts`) whose word WordNet reads as a thing one can see
(:func:`lavise.taxonomy.is_visible_noun`: an animal, plant, food, artifact, body part,
natural object, substance, shape, phenomenon or person), which drops names such as
"accommodation", "customs" or "deeply", and labels every concept with its family
(:func:`lavise.taxonomy.family_of`: animal, vehicle, food, musical instrument, ...).
The families go to ``split.json`` (``families``, word -> family) and the summary of
``scenes.json`` (per family, how many concepts are seen and unseen). The split is the
usual seeded draw (``unseen_fraction``; 0.3 is the paper's 70/30).

With ``num_concepts=None`` (``lavise synth --all-concepts``) every concept of the pool
is used: about 495 with no word list, fewer when ``allowed_words`` narrows it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from lavise.synthetic.concepts import Concept
from lavise.taxonomy import family_of, is_visible_noun


def visible_pool(pool: Sequence[Concept]) -> list[Concept]:
    """The concepts of ``pool`` whose word WordNet reads as a visible thing, in their order."""
    return [c for c in pool if is_visible_noun(c.word)]


def concept_families(words: Collection[str]) -> dict[str, str]:
    """Each word's family, sorted by word."""
    return {word: family_of(word) for word in sorted(words)}


def family_summary(families: dict[str, str], unseen: Collection[str]) -> dict[str, dict[str, int]]:
    """Per family, its seen and unseen concepts: ``{"animal": {"seen": 45, "unseen": 19}, ...}``,
    largest family first.

    Example:
        >>> family_summary({"cat": "animal", "dog": "animal", "car": "vehicle"}, {"dog"})
        {'animal': {'seen': 1, 'unseen': 1}, 'vehicle': {'seen': 1, 'unseen': 0}}
    """
    sizes = Counter(families.values())
    return {family: {"seen": sum(1 for w, f in families.items() if f == family and w not in unseen),
                     "unseen": sum(1 for w, f in families.items() if f == family and w in unseen)}
            for family, _ in sorted(sizes.items(), key=lambda item: (-item[1], item[0]))}
