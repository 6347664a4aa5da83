"""Nearest words without hubs: words aligned to the explainer's outputs, or CSLS.

In a word space a few words lie near almost every explainer output ("compression",
"notebook", "informing" on the demo's layers at lavise 0.4): plain cosine retrieval
makes them the first word of filters that have nothing to do with them. CSLS (Conneau
et al., "Word translation without parallel data", ICLR 2018) ranks the words of a query
x by

    CSLS(x, w) = 2 cos(x, w) − r_X(w) − r_W(x),

where r_X(w) is the mean cosine of word w to its k nearest explainer outputs and
r_W(x) the mean cosine of x to its k nearest words. r_W(x) is the same for every word
of one query, so the ranking is that of cos(x, w) − r_X(w)/2 (:func:`hub_penalty`): a
word near everything pays for it. lavise computes r_X on the explainer's outputs for
the reference data (``reference_outputs.safetensors``, written when the run is trained),
caches it in the run per vocabulary, and reports the scores cos − r_X/2.

The explainer is trained to rank a seen concept's vector above the other seen concepts'
(the hinge rank loss), not to land on it: its outputs for a concept sit where they beat
the other seen concepts, often nearer a neighbour word ("harmonica" for a guitar
detector, "custard" for cake). ``aligned`` retrieval (the default) therefore maps the
words into the explainer's output space before comparing, by the ridge regression from
the seen concepts' word vectors to the mean of their reference outputs (mapping the
word side onto the output side is what Dinu et al., ICLR 2015 workshop, and Shigeto et
al., ECML 2015, found reduces hubness in zero-shot retrieval):

    A = argmin_A Σ_c ‖A v_c − m_c‖² + λ ‖A − I‖²  =  (MᵀV + λI)(VᵀV + λI)⁻¹,

pulled towards the identity so that words far from every seen concept stay where they
were (:func:`alignment`). A word's retrieval vector is then A v_w, normalised.

Any retrieval can also lower the seen concepts' own names by a constant (``seen_penalty``),
the calibrated stacking of generalised zero-shot learning (Chao et al., ECCV 2016): an
explainer trained only on seen concepts scores their names above every other word, and
the constant trades seen precision for the chance of an unseen word (:func:`seen_name_penalty`).

Pure functions on tensors; :func:`retrieval_space` is the thin layer that reads and caches.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lavise.distributed import Ranks
from lavise.embeddings import Vocabulary
from lavise.errors import LaviseError
from lavise.settings import RETRIEVALS, ExplainSettings
from lavise.storage import load_tensors, tensors_digest
from lavise.vocabulary import normalize_concept

REFERENCE_OUTPUTS = "reference_outputs.safetensors"  # in a run: explainer outputs on a sample of its reference rows
_PENALTY_VERSION = 1


def hubness(unit_vocabulary: torch.Tensor, outputs: torch.Tensor, k: int, *, chunk: int = 4096) -> torch.Tensor:
    """r_X(w): each word's mean cosine similarity to its ``k`` nearest outputs.

    (V, D) unit rows, (n, D) outputs (any length) -> (V,)

    Example:
        >>> words = torch.eye(2)
        >>> [round(v, 3) for v in hubness(words, torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), 2).tolist()]
        [0.998, 0.55]
    """
    if k < 1:
        raise LaviseError(f"hub_neighbours must be at least 1, got {k}.")
    outputs = F.normalize(outputs.float(), dim=1)
    k = min(k, len(outputs))
    parts = [torch.topk(unit_vocabulary[start : start + chunk] @ outputs.T, k, dim=1).values.mean(dim=1)
             for start in range(0, len(unit_vocabulary), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0)


def hub_penalty(unit_vocabulary: torch.Tensor, outputs: torch.Tensor, k: int) -> torch.Tensor:
    """(V,) what CSLS subtracts from each word's cosine: r_X(w) / 2."""
    return hubness(unit_vocabulary, outputs, k) / 2


def csls_scores(queries: torch.Tensor, unit_vocabulary: torch.Tensor, penalty: torch.Tensor | None) -> torch.Tensor:
    """cos(x, w) − penalty(w) for every query and word; plain cosine without a penalty.

    (Q, D), (V, D) unit rows, (V,) or None -> (Q, V)
    """
    scores = F.normalize(queries, dim=1) @ unit_vocabulary.T
    return scores if penalty is None else scores - penalty.to(scores.device)


def seen_name_penalty(words: list[str], seen: set[str], penalty: float) -> torch.Tensor:
    """(V,) ``penalty`` for the words that are a seen concept's (normalised) name, 0 for the others.

    Example:
        >>> seen_name_penalty(["dog", "cat", "traffic light"], {"dog", "traffic light"}, 0.2).tolist()
        [0.20000000298023224, 0.0, 0.20000000298023224]
    """
    return torch.tensor([penalty if w in seen else 0.0 for w in words])


def alignment(concept_vectors: torch.Tensor, mean_outputs: torch.Tensor, ridge: float) -> torch.Tensor:
    """The map A of words into the explainer's output space: (MᵀV + λI)(VᵀV + λI)⁻¹.

    (C, D) unit word vectors of the seen concepts, (C, D) unit mean outputs, λ > 0 -> (D, D)

    Example:
        >>> v = torch.eye(2)
        >>> alignment(v, v[[1, 0]], 1e-6).round().tolist()  # concepts whose outputs swapped places
        [[0.0, 1.0], [1.0, 0.0]]
    """
    if ridge <= 0:
        raise LaviseError(f"alignment_ridge must be positive, got {ridge}.")
    v, m = concept_vectors.double(), mean_outputs.double()
    eye = torch.eye(v.shape[1], dtype=torch.float64)
    return ((m.T @ v + ridge * eye) @ torch.linalg.inv(v.T @ v + ridge * eye)).float()


def mean_outputs(outputs: torch.Tensor, concepts: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) each concept's mean unit output (normalised); zeros for a concept without rows."""
    sums = torch.zeros(count, outputs.shape[1]).index_add_(0, concepts.long(), F.normalize(outputs.float(), dim=1))
    return F.normalize(sums, dim=1)


def reference_outputs(run_path: Path) -> dict[str, torch.Tensor] | None:
    """The run's saved explainer outputs on reference rows, or None for a run made before lavise 0.5."""
    path = Path(run_path) / REFERENCE_OUTPUTS
    return load_tensors(path) if path.is_file() else None


def retrieval_space(run, vocabulary: Vocabulary, concept_vectors: torch.Tensor, settings: ExplainSettings,
                    ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The vectors words are retrieved by, their CSLS penalty (or None), and the retrieval used.

    ``concept_vectors``: (C, D) word vectors of the run's seen concepts, in its order.
    ``aligned``: the vocabulary mapped by :func:`alignment`; ``csls``: the vocabulary
    with the penalty of :func:`hub_penalty`, cached in the run (``hubness-KEY``) per
    reference outputs, vocabulary and k; ``cosine``: the vocabulary as it is. A run
    without reference outputs (made before lavise 0.5) is named by cosine. With
    ``settings.seen_penalty``, the seen concepts' names pay it too (:func:`seen_name_penalty`).
    """
    vectors, penalty, retrieval = _retrieval_space(run, vocabulary, concept_vectors, settings, ranks)
    if settings.seen_penalty > 0:
        seen = {normalize_concept(c) for c in run.split["seen"]}
        stacked = seen_name_penalty(vocabulary.words, seen, settings.seen_penalty)
        penalty = stacked if penalty is None else penalty + stacked
    return vectors, penalty, retrieval


def _retrieval_space(run, vocabulary: Vocabulary, concept_vectors: torch.Tensor, settings: ExplainSettings,
                     ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if settings.retrieval not in RETRIEVALS:
        raise LaviseError(f"Unknown retrieval '{settings.retrieval}'; valid: {', '.join(RETRIEVALS)}.")
    words = vocabulary.unit_vectors
    outputs = reference_outputs(run.path) if settings.retrieval != "cosine" else None
    if outputs is None:  # cosine, or a run from before lavise 0.5 (the caller warns)
        return words, None, "cosine"
    if settings.retrieval == "aligned":
        means = mean_outputs(outputs["outputs"], outputs["concepts"], len(concept_vectors))
        present = means.norm(dim=1) > 0
        mapping = alignment(F.normalize(concept_vectors[present].float(), dim=1), means[present], settings.alignment_ridge)
        return F.normalize(words @ mapping.T, dim=1), None, "aligned"
    parts = {"product": "hubness", "version": _PENALTY_VERSION, "k": settings.hub_neighbours,
             "digest": tensors_digest(outputs["outputs"], words), "words": vocabulary.words}

    def build():
        return {"penalty": hub_penalty(words, outputs["outputs"], settings.hub_neighbours)}, {}

    tensors, _ = ranks.cached(run.path, "hubness", parts, build)
    return words, tensors["penalty"], "csls"
