"""Unseen concepts the paper's way in ``lavise evaluate``: an entity list beside the open vocabulary.

The authors' code ranks a filter's words within a fixed list of entity names (Visual
Genome's 1,203 categories), not among every word. :func:`entity_naming` builds such a
second naming: the candidates are the **entity list** (by default every concept name
of the run's reference data and of the evaluation data, normalised as
:func:`lavise.vocabulary.normalize_concept` spells them; or a user's file of names,
``EvaluateSettings.entity_file``), retrieved in the same space as the open vocabulary
(``--retrieval``), with the same top images, words per image (at most the list's size)
and ranking. :func:`method_protocol` then scores each method's unseen concepts in both
lists (:func:`lavise.metrics.unseen_protocol`): unseen recall@k and named@k, each next
to its chance and multiple of chance, overall and per band of WordNet hops from the
unseen concept to its nearest seen one (:func:`lavise.taxonomy.nearest_hops`).
See docs/unseen.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lavise.datasets.base import ReferenceDataset
from lavise.distributed import Ranks
from lavise.embeddings import Vocabulary, WordVectors, concept_vectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.explain import Naming
from lavise.metrics import DISTANCE_BANDS, distance_band, unseen_protocol
from lavise.retrieval import retrieval_space
from lavise.runs import Run
from lavise.settings import EvaluateSettings
from lavise.taxonomy import nearest_hops
from lavise.vocabulary import candidate_vocabulary, normalize_concept


def default_entities(names: Sequence[str], word_vectors: WordVectors) -> list[str]:
    """Concept names as the entity list: normalised, each once in the given order, those with a vector.

    Example:
        >>> from lavise.embeddings import load_word_vectors
        >>> default_entities(["dog", "sky-other-merged", "Dog", "zzqx"], load_word_vectors())
        ['dog', 'sky']
    """
    spelled = dict.fromkeys(normalize_concept(n) for n in names)
    word_vectors.prepare(spelled)
    return [n for n in spelled if n and word_vectors.phrase_vector(n) is not None]


def entity_vocabulary(run: Run, dataset: ReferenceDataset, settings: EvaluateSettings,
                      word_vectors: WordVectors) -> Vocabulary:
    """The entity list of an evaluation: ``settings.entity_file``'s names, or every concept
    name of the run's reference data and of ``dataset``."""
    if settings.entity_file is not None:
        vocabulary = candidate_vocabulary(word_vectors, word_list=settings.entity_file)
        vocabulary.description["kind"] = "entity file"
        return vocabulary
    words = default_entities([*run.split["seen"], *run.split["unseen"], *dataset.concepts], word_vectors)
    if not words:
        raise LaviseError("No concept name of the reference or evaluation data has a word vector: the entity list "
                          "is empty; give one with entity_file (--entity-file) or turn off unseen_protocol.")
    vectors = torch.stack([word_vectors.phrase_vector(w) for w in words]).float()
    return Vocabulary(words, torch.nn.functional.normalize(vectors, dim=1),
                      {"kind": "concept names", "reference_and_evaluation": True})


def entity_naming(run: Run, naming: Naming, dataset: ReferenceDataset, settings: EvaluateSettings,
                  cache_dir: Path | None, ranks: Ranks) -> Naming:
    """A naming like ``naming`` (retrieval, top images, ranking) whose candidates are the entity list;
    no confidence (it is calibrated for the open vocabulary)."""
    word_vectors = load_word_vectors(run.config["word_vectors"], cache_dir=cache_dir)
    vocabulary = entity_vocabulary(run, dataset, settings, word_vectors)
    explain = replace(naming.settings, words_per_image=min(naming.settings.words_per_image, len(vocabulary)))
    with warnings.catch_warnings():  # the open vocabulary's naming has told them
        warnings.simplefilter("ignore", LaviseWarning)
        _, seen_vectors, _ = concept_vectors(run.split["seen"], word_vectors, normalize_concept)
    vectors, penalty, retrieval = retrieval_space(run, vocabulary, seen_vectors, explain, ranks)
    return Naming(vocabulary, vectors, penalty, retrieval, None, explain)


def ranked_words(naming: Naming, named: tuple[torch.Tensor, torch.Tensor], scored: torch.Tensor,
                 filters: int, voting: torch.Tensor | None = None) -> list[list[str]]:
    """Each filter's ranked words from the nearest words of its pairs (``name_pairs``), counting
    the images ``voting`` allows (:meth:`Naming.voting`); [] for the filters not ``scored``."""
    ids, sims = named
    words: list[list[str]] = [[] for _ in range(filters)]
    for u, ranked in zip(scored.tolist(), naming.ranked(ids, sims, voting=voting)):
        words[u] = [naming.vocabulary.words[r.word] for r in ranked]
    return words


def unseen_hops(truth: Sequence[Sequence[str]], seen: set[str]) -> dict[str, int | None]:
    """WordNet hops from each unseen ground-truth concept to its nearest seen concept, by concept."""
    unseen = sorted({c for t in truth for c in t if c not in seen})
    return nearest_hops(unseen, sorted(seen))


def method_protocol(open_words: Sequence[Sequence[str]], entity_words: Sequence[Sequence[str]],
                    truth: Sequence[Sequence[str]], seen: set[str], open_candidates: int, entity_candidates: int,
                    hops: dict[str, int | None]) -> dict:
    """One method's unseen scores in the open vocabulary and in the entity list (:func:`unseen_protocol`)."""
    bands = {concept: distance_band(h) for concept, h in hops.items()}
    return {"open": unseen_protocol(open_words, truth, seen, open_candidates, bands),
            "entities": unseen_protocol(entity_words, truth, seen, entity_candidates, bands)}


def protocol_info(entities: Naming, hops: dict[str, int | None]) -> dict:
    """For ``evaluation.json``: the entity list, and each unseen ground-truth concept's hops and band."""
    bands = {concept: distance_band(h) for concept, h in hops.items()}
    return {"entities": len(entities.vocabulary), "entity_list": entities.vocabulary.description,
            "retrieval": entities.retrieval, "words_per_image": entities.settings.words_per_image,
            "unseen_hops": hops, "band_concepts": {b: sum(1 for v in bands.values() if v == b) for b in DISTANCE_BANDS}}
