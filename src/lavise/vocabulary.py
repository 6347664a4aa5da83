"""The candidate words that name filters: a visual vocabulary, and datasets' names as they mean.

The default (``--vocabulary visual``) is a list of nouns of things one can see, built
offline from WordNet and GloVe's word frequencies (:func:`build_visual_words`, run by
``tools/build_visual_vocabulary.py``) and shipped with the package: a word is in it when

1. it is a WordNet noun lemma whose first noun sense is a physical thing (an animal,
   plant, food, artifact, body part, natural object, substance, shape or natural
   phenomenon) and not a named instance;
2. those senses are what the word mostly means: in WordNet's sense counts they outweigh
   its other senses, verbs and adjectives included;
3. it is no proper name (no named instance is spelled the same, capitalised), no
   plural or inflected form of another lemma, and not in a short list of frequent
   nouns that WordNet files as physical but whose GloVe vectors are abstract
   (:data:`ABSTRACT`);

plus generic words for people (:data:`PEOPLE`), Broden's colour names and the 47 DTD
texture names, and the names of the datasets lavise reads (:data:`DATASET_NAMES`,
normalised). The concept names of the run's reference data are always candidates too,
multi-word names as phrases (their vector is the mean of their words').

Dataset names are normalised to the words they mean (:func:`normalize_concept`):
COCO-Stuff and panoptic suffixes and separators go ("sky-other-merged" -> "sky",
"wall-brick" -> "brick wall"); the original name stays in the outputs.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from lavise.embeddings import Vocabulary, WordVectors, is_clean_word, named, read_text_file
from lavise.errors import LaviseError, LaviseWarning
from lavise.settings import VOCABULARIES, ExplainSettings

COLOURS = ("black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow")
TEXTURES = (  # the Describable Textures Dataset's 47 categories, as Broden lists them
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
    "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
    "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained",
    "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)  # fmt: skip
PEOPLE = (
    "person", "people", "man", "woman", "boy", "girl", "child", "baby", "kid", "player", "rider", "skier", "surfer",
    "skater", "crowd", "family", "team", "soldier", "officer", "chef", "worker", "farmer", "bride", "groom", "athlete",
    "dancer", "musician", "audience", "student", "pedestrian", "driver", "passenger", "spectator", "toddler",
)  # fmt: skip
ABSTRACT = frozenset(
    """system effect output energy pressure fortune aftermath innovation portfolio margin agent infrastructure
    transportation suspension architecture product housing facility material equipment device structure
    assembly transit output internet web network headquarters holder starter haven stronghold hub mart
    segment mixture element elements component supply support""".split()
)
VISUAL_LEXNAMES = frozenset({
    "noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.body", "noun.object", "noun.substance",
    "noun.shape", "noun.phenomenon",
})  # fmt: skip

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
    "window-blind", "window-other", "wood",
)  # fmt: skip
COCO_PANOPTIC_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit",
    "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
    "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged", "mountain-merged",
    "grass-merged", "dirt-merged", "paper-merged", "food-other-merged", "building-other-merged", "rock-merged",
    "wall-other-merged", "rug-merged",
)  # fmt: skip
DATASET_NAMES = {
    "coco": COCO_THINGS,
    "coco-stuff": COCO_STUFF,
    "coco-panoptic": COCO_THINGS + COCO_PANOPTIC_STUFF,
    "broden colours and textures": COLOURS + TEXTURES,
}

# Words a dataset's names carry that name no thing: COCO-Stuff's and panoptic COCO's marks.
_MARKS = frozenset({"other", "merged", "stuff"})
# "wall-brick" is a brick wall: the second part says what the first is made of.
_MADE_OF = frozenset({"wall", "floor", "ceiling", "window"})
_SEPARATORS = re.compile(r"[\s_\-/]+")
_SPELLED = {"playingfield": "playing field", "waterdrops": "water drops"}


def normalize_concept(name: str) -> str:
    """The words a dataset's concept name means, lower-cased and space-separated.

    Example:
        >>> [normalize_concept(n) for n in ("sky-other-merged", "wall-brick", "door-stuff", "Traffic_light")]
        ['sky', 'brick wall', 'door', 'traffic light']
        >>> normalize_concept("other-merged")
        ''
    """
    words = [w for w in _SEPARATORS.split(name.strip().lower()) if w and w not in _MARKS]
    if len(words) == 2 and words[0] in _MADE_OF and words[1] not in _MADE_OF:
        words = [words[1], words[0]]
    return " ".join(_SPELLED.get(w, w) for w in words)


# --- the visual word list --------------------------------------------------------------


def build_visual_words(words: list[str], *, limit: int = 100_000, extra: tuple[str, ...] = ()) -> list[str]:
    """The visual nouns among the first ``limit`` of ``words`` (in frequency order), by the
    module's rule, then the people, colour, texture and dataset words not already in, and
    ``extra`` names (the demo's concepts)."""
    from lavise.metrics import wordnet  # WordNet, read once per process (a few seconds)

    net = wordnet()
    noun_lemmas = set(net.all_lemma_names("n"))
    chosen = [w for w in words[:limit] if is_clean_word(w) and len(w) > 2 and w not in ABSTRACT
              and _is_visual_noun(w, net, noun_lemmas)]
    names = [*PEOPLE, *COLOURS, *TEXTURES, *(normalize_concept(n) for names in DATASET_NAMES.values() for n in names),
             *(normalize_concept(n) for n in extra)]
    return list(dict.fromkeys(chosen + [w for w in names if w]))


def _is_visual_noun(word: str, net, noun_lemmas: set[str]) -> bool:
    senses = [s for s in net.synsets(word) if word in s.lemma_names()]
    nouns = [s for s in senses if s.pos() == "n"]
    if not nouns or nouns[0].instance_hypernyms() or nouns[0].lexname() not in VISUAL_LEXNAMES:
        return False
    for s in net.synsets(word):  # a name spelled the same: GloVe's lower-cased vector is mostly the name's
        if s.instance_hypernyms() and word.capitalize() in s.lemma_names():
            return False

    def count(synset) -> int:
        return sum(lemma.count() for lemma in synset.lemmas() if lemma.name() == word)

    visual = sum(count(s) for s in nouns if s.lexname() in VISUAL_LEXNAMES)
    other = sum(count(s) for s in senses if not (s.pos() == "n" and s.lexname() in VISUAL_LEXNAMES))
    if visual < other or _plural(word, noun_lemmas):
        return False
    inflected = [s for s in net.synsets(word, "v") if word not in s.lemma_names()]  # "felt" of "feel"
    return not ((inflected or word.endswith("ing")) and visual < 3)


def _plural(word: str, noun_lemmas: set[str]) -> bool:
    if not word.endswith("s") or word.endswith("ss"):
        return False
    return (word[:-1] in noun_lemmas or (word.endswith("es") and word[:-2] in noun_lemmas)
            or (word.endswith("ies") and word[:-3] + "y" in noun_lemmas))


@functools.cache
def visual_words() -> tuple[str, ...]:
    """The shipped visual vocabulary, most frequent first (``lavise/data/visual_words.txt``)."""
    text = (resources.files("lavise") / "data" / "visual_words.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


# --- the vocabulary of a naming -----------------------------------------------------------


def candidate_vocabulary(word_vectors: WordVectors, *, kind: str = "visual", size: int = 0,
                         word_list: str | Path | None = None, concepts: Sequence[str] = ()) -> Vocabulary:
    """The words filters are named from, with unit vectors.

    Args:
        word_vectors: a :class:`lavise.embeddings.WordVectors`.
        kind: ``visual`` (the shipped visual vocabulary, :func:`visual_words`) or
            ``frequent`` (the most frequent clean words of the word vectors, lavise 0.4).
        size: keep the first ``size`` words of the kind (0: all of them).
        word_list: a file of words or phrases, one per line (``#`` starts a comment),
            instead of a kind; those without a known word are counted in a warning.
        concepts: concept names always added, normalised (:func:`normalize_concept`),
            multi-word ones as phrases; names that normalise to nothing are left out.

    ``description`` records the kind, size, file and how many concept names were added.
    """
    if kind not in VOCABULARIES:
        raise LaviseError(f"Unknown vocabulary '{kind}'; valid: {', '.join(VOCABULARIES)}, or a file of words.")
    if size < 0:
        raise LaviseError(f"Vocabulary size must be >= 0 (0 = every word), got {size}.")
    if word_list is not None:
        words, missing = _listed_words(Path(word_list), word_vectors)
        description = {"kind": "file", "word_list": str(word_list), "missing": missing}
    elif kind == "frequent":
        base = word_vectors.vocabulary(size=size)
        words, description = list(base.words), {"kind": "frequent", **base.description}
    else:
        word_vectors.prepare(visual_words())
        listed = [w for w in visual_words() if word_vectors.phrase_vector(w) is not None]
        words, description = listed[:size] if size else listed, {"kind": "visual", "size": size}
    known = set(words)
    spelled = list(dict.fromkeys(normalize_concept(c) for c in concepts))
    word_vectors.prepare(spelled)
    added = [n for n in spelled
             if n and n not in known and word_vectors.phrase_vector(n) is not None]
    words = words + added
    partial = [f"'{w}' (without {', '.join(word_vectors.unknown_words(w))})" for w in words if word_vectors.unknown_words(w)]
    if partial:
        warnings.warn(f"{len(partial)} candidate phrases have words without a vector in {word_vectors.source}; each is "
                      f"named by the mean of its other words: {named(partial)}", LaviseWarning, stacklevel=2)
    description["concept_names_added"] = len(added)
    vectors = torch.stack([word_vectors.phrase_vector(w) for w in words])
    return Vocabulary(words, torch.nn.functional.normalize(vectors.float(), dim=1), description)


def _listed_words(path: Path, word_vectors: WordVectors) -> tuple[list[str], list[str]]:
    """The words and phrases of a vocabulary file that have a vector, and those that have none;
    refused when none has."""
    text = read_text_file(path, "Vocabulary file")
    wanted = list(dict.fromkeys(" ".join(line.split("#", 1)[0].lower().split()) for line in text.splitlines()))
    wanted = [w for w in wanted if w]
    if not wanted:
        raise LaviseError(f"Vocabulary file '{path}' holds no words: give one word or phrase per line.")
    word_vectors.prepare(wanted)
    usable = [w for w in wanted if word_vectors.phrase_vector(w) is not None]
    if not usable:
        raise LaviseError(f"Vocabulary file '{path}': none of its {len(wanted)} words has a vector in "
                          f"{word_vectors.source} (e.g. {', '.join(wanted[:5])}).")
    missing = [w for w in wanted if word_vectors.phrase_vector(w) is None]
    if missing:
        warnings.warn(f"{len(missing)} of the {len(wanted)} words of '{path}' have no vector in {word_vectors.source} "
                      f"and are left out: {', '.join(missing[:20])}", LaviseWarning, stacklevel=3)
    return usable, missing


def naming_vocabulary(settings: ExplainSettings, word_vectors: WordVectors, concepts: Sequence[str]) -> Vocabulary:
    """The vocabulary an explain or evaluate with ``settings`` names from; ``concepts``: the run's."""
    return candidate_vocabulary(word_vectors, kind=settings.vocabulary, size=settings.vocabulary_size,
                                word_list=settings.vocabulary_file,
                                concepts=concepts if settings.concept_names else ())


def unnamed_concepts(names: Sequence[str]) -> list[str]:
    """The concept names that normalise to nothing ("other-merged"): they can never be named."""
    return [n for n in names if not normalize_concept(n)]
