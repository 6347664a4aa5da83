"""Word vectors: the built-in GloVe, text files, concept-name vectors and the vocabulary."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from lavise.datasets import LaviseWarning, open_reference
from lavise.embeddings import (
    BUILTIN_GLOVE,
    WordVectors,
    concept_vectors,
    is_clean_word,
    load_word_vectors,
    tokenize,
)
from lavise.errors import LaviseError
from lavise.runs import train
from lavise.settings import TrainSettings


@pytest.fixture(scope="module")
def glove() -> WordVectors:
    return load_word_vectors()


def test_builtin_glove(glove):
    assert glove.source == BUILTIN_GLOVE
    assert len(glove.words) == 400_000
    assert glove.vectors.shape == (400_000, 50) and glove.dim == 50
    assert glove.vectors.dtype == torch.float32
    assert "dog" in glove and "qqqzzxv" not in glove
    assert glove.words[:3] == ["the", ",", "."]  # frequency order
    # the same row for the same word, and related words are closer than unrelated ones
    dog, cat, car = (glove.phrase_vector(w) for w in ("dog", "cat", "car"))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(dog, cat, dim=0) > cosine(dog, car, dim=0)
    assert load_word_vectors() is glove  # loaded once per process


def test_phrase_vector_is_the_mean_of_its_words(glove):
    traffic, light = glove.phrase_vector("traffic"), glove.phrase_vector("light")
    expected = (traffic + light) / 2
    for name in ("traffic light", "Traffic_Light", "traffic-light", "  traffic   light "):
        torch.testing.assert_close(glove.phrase_vector(name), expected)
    # unknown words are left out of the mean
    torch.testing.assert_close(glove.phrase_vector("traffic qqqzzxv"), traffic)
    assert glove.phrase_vector("qqqzzxv") is None
    assert tokenize("Hot_dog/bun") == ["hot", "dog", "bun"]


def test_concept_vectors_reports_unknown_names(glove):
    kept, vectors, unknown = concept_vectors(["dog", "qqqzzxv", "traffic light"], glove)
    assert kept == ["dog", "traffic light"]
    assert unknown == ["qqqzzxv"]
    assert vectors.shape == (2, 50)
    torch.testing.assert_close(vectors[1], glove.phrase_vector("traffic light"))
    with pytest.raises(LaviseError, match="None of the 2 concept names"):
        concept_vectors(["qqqzzxv", "zzqqxxv"], glove)


def test_concept_without_a_word_vector_is_left_out_of_training(tmp_path, coco_maker, tiny_model, compute):
    names = ("circle", "square", "triangle", "qqqzzxv")
    reference = open_reference(coco_maker(tmp_path / "ref", images=12, names=names))
    with pytest.warns(LaviseWarning, match=r"1 concepts have no known word .*: qqqzzxv"):
        run = train(
            tiny_model, "features.3", reference, tmp_path / "run", settings=TrainSettings(epochs=1),
            compute=compute, cache_dir=tmp_path / "cache",
        )
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["without_word_vectors"] == ["qqqzzxv"]
    assert "qqqzzxv" not in split["seen"] + split["unseen"]
    assert sorted(split["seen"]) == ["circle", "square", "triangle"]
    assert run.split == split


GLOVE_TEXT = "cat 0.1 0.2 0.3\ndog -1 0.5 2e-1\nhot-dog 3 3 3\n"


@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec"])
def test_text_vectors_load(tmp_path, header):
    path = tmp_path / "vectors.txt"
    path.write_text(("3 3\n" if header else "") + GLOVE_TEXT)
    vectors = load_word_vectors(str(path))
    assert vectors.words == ["cat", "dog", "hot-dog"]
    torch.testing.assert_close(vectors.vectors, torch.tensor([[0.1, 0.2, 0.3], [-1, 0.5, 0.2], [3.0, 3, 3]]))
    assert vectors.source == str(path) and vectors.dim == 3


def test_text_vectors_are_cached_and_refreshed(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text(GLOVE_TEXT)
    cache = tmp_path / "cache"
    first = load_word_vectors(str(path), cache_dir=cache)
    assert len(list(cache.glob("words-*.npz"))) == 1
    again = load_word_vectors(str(path), cache_dir=cache)
    assert again.words == first.words and torch.equal(again.vectors, first.vectors)
    # the file changes: the cache is not used
    path.write_text(GLOVE_TEXT + "emu 7 8 9\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_word_vectors(str(path), cache_dir=cache)
    assert changed.words[-1] == "emu" and len(changed.words) == 4


def test_bad_text_vectors(tmp_path):
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("cat 1 2 3\ndog 1 2\n")
    with pytest.raises(LaviseError, match="line 2: 2 numbers where the first line had 3"):
        load_word_vectors(str(ragged))
    words = tmp_path / "words.txt"
    words.write_text("cat one two\n")
    with pytest.raises(LaviseError, match="line 1: not a word followed by numbers"):
        load_word_vectors(str(words))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(LaviseError, match="holds no vectors"):
        load_word_vectors(str(empty))
    with pytest.raises(LaviseError, match="neither 'glove-6b-50d', 'minilm-l6-v2' nor an existing file"):
        load_word_vectors(str(tmp_path / "missing.txt"))


def _toy() -> WordVectors:
    words = ["the", "dog", "3d", "of", "cat", "x", "rock-n", "car", "tree"]
    return WordVectors(words, torch.arange(len(words) * 2, dtype=torch.float32).reshape(-1, 2) + 1, "toy")


def test_vocabulary_sizes():
    wv = _toy()
    assert wv.vocabulary(size=0).words == ["dog", "cat", "car", "tree"]
    assert wv.vocabulary(size=2).words == ["dog", "cat"]  # the most frequent clean words
    assert wv.vocabulary(size=0, clean=False).words == wv.words
    vocabulary = wv.vocabulary(size=3)
    assert len(vocabulary) == 3 and vocabulary.description == {"size": 3, "clean": True}
    norms = vocabulary.unit_vectors.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))
    torch.testing.assert_close(vocabulary.unit_vectors[1], torch.nn.functional.normalize(wv.vectors[4], dim=0))
    with pytest.raises(LaviseError, match="must be >= 0"):
        wv.vocabulary(size=-1)


def test_vocabulary_from_a_word_list(tmp_path):
    wv = _toy()
    listing = tmp_path / "words.txt"
    listing.write_text("Tree\ncar\n\nunicorn\ncar\nthe\n")
    vocabulary = wv.vocabulary(word_list=listing)
    assert vocabulary.words == ["tree", "car", "the"]  # exactly the list, once each
    assert vocabulary.description["missing"] == ["unicorn"]
    assert vocabulary.description["word_list"] == str(listing)
    listing.write_text("unicorn\ngriffin\n")
    with pytest.raises(LaviseError, match="None of the 2 words"):
        wv.vocabulary(word_list=listing)
    with pytest.raises(LaviseError, match="does not exist"):
        wv.vocabulary(word_list=tmp_path / "missing.txt")


def test_default_vocabulary_holds_clean_content_words(glove):
    vocabulary = glove.vocabulary()
    assert len(vocabulary) == 20_000
    assert all(re.fullmatch(r"[a-z]{2,}", w) for w in vocabulary.words)
    assert not {"the", "of", "and", "a", "to", "in", "one", "said"} & set(vocabulary.words)
    assert {"dog", "cat", "car", "tree", "red"} <= set(vocabulary.words)
    assert vocabulary.unit_vectors.shape == (20_000, 50)
    # frequency order is kept: the first clean words are the most frequent ones
    clean_rows = [i for i, w in enumerate(glove.words[:5000]) if is_clean_word(w)]
    assert vocabulary.words[:50] == [glove.words[i] for i in clean_rows[:50]]
    everything = glove.vocabulary(size=0)
    assert len(everything) > 200_000 and all(is_clean_word(w) for w in everything.words[-100:])
