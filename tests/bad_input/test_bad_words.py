"""Bad word vectors and vocabularies: nothing broken is used, nothing left out without a word.

A user's word-vector file with NaN, infinite or all-zero vectors, duplicate words or
malformed lines; files that are not text; vocabulary files that are empty, binary or
folders; names with a word that has no vector, and names whose vector is zero.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest
import torch

from lavise.embeddings import WordVectors, concept_vectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.vocabulary import candidate_vocabulary, normalize_concept

WORDS = ["circle", "square", "triangle", "traffic", "light", "teddy", "bear", "apple", "zebra", "stone",
         "river", "cloud", "tower", "bridge", "garden", "window", "forest", "flower", "castle", "boat"]


def _rows(words=WORDS, dim=8, seed=0) -> list[list[float]]:
    generator = np.random.default_rng(seed)
    return [list(generator.normal(size=dim).round(4)) for _ in words]


def _write(path, words, rows, header: str | None = None):
    lines = ([header] if header else []) + [" ".join([w, *map(str, r)]) for w, r in zip(words, rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _quiet_load(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vectors = load_word_vectors(str(path), **kwargs)
    return vectors, [str(w.message) for w in caught if issubclass(w.category, LaviseWarning)]


# --- broken vectors ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_non_finite_vectors_are_left_out_with_a_count_and_their_names(tmp_path, bad):
    rows = _rows()
    rows[7][3] = bad  # apple
    rows[8][0] = bad  # zebra
    vectors, messages = _quiet_load(_write(tmp_path / "vectors.txt", WORDS, rows))
    assert "apple" not in vectors and "zebra" not in vectors and len(vectors.words) == len(WORDS) - 2
    assert bool(torch.isfinite(vectors.vectors).all())
    assert any("2 words of" in m and "NaN or infinite" in m and "apple, zebra" in m for m in messages), messages


def test_a_nan_word_never_names_a_filter(tmp_path):
    """The issue's case: one NaN word became the first word of every filter."""
    rows = _rows()
    rows[7] = [math.nan] * 8
    vectors, _ = _quiet_load(_write(tmp_path / "vectors.txt", WORDS, rows))
    vocabulary = candidate_vocabulary(vectors, kind="frequent", size=0)
    assert "apple" not in vocabulary.words and bool(torch.isfinite(vocabulary.unit_vectors).all())
    outputs = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    nearest = (outputs @ vocabulary.unit_vectors.T).argmax(dim=1)
    assert len(set(nearest.tolist())) > 1  # not one word for all


def test_all_zero_vectors_are_left_out(tmp_path):
    rows = _rows()
    rows[2] = [0.0] * 8  # triangle
    rows[9] = ["0", "-0", "0.0", "0", "0", "0", "0", "0e0"]  # stone
    vectors, messages = _quiet_load(_write(tmp_path / "vectors.txt", WORDS, rows))
    assert "triangle" not in vectors and "stone" not in vectors
    assert any("2 words of" in m and "all-zero vectors" in m and "triangle, stone" in m for m in messages), messages


def test_duplicate_words_keep_their_first_vector(tmp_path):
    words = [*WORDS, "apple", "circle", "circle"]
    rows = _rows(words)
    vectors, messages = _quiet_load(_write(tmp_path / "vectors.txt", words, rows))
    assert vectors.words.count("apple") == 1 and vectors.words.count("circle") == 1
    assert vectors.vectors[vectors.words.index("apple")].tolist() == pytest.approx(rows[7])
    assert any("3 words of" in m and "more than once" in m and "apple, circle, circle" in m for m in messages), messages


def test_a_duplicate_of_a_broken_vector_is_the_one_kept(tmp_path):
    words = [*WORDS, "apple"]
    rows = _rows(words)
    rows[7] = [math.nan] * 8
    vectors, messages = _quiet_load(_write(tmp_path / "vectors.txt", words, rows))
    assert vectors.vectors[vectors.words.index("apple")].tolist() == pytest.approx(rows[-1])
    assert not any("more than once" in m for m in messages)


def test_a_few_malformed_lines_are_left_out_by_line_number(tmp_path):
    lines = [" ".join([w, *map(str, r)]) for w, r in zip(WORDS, _rows())]
    lines[3] = "traffic 1 2 3"  # too few numbers
    lines[5] = "teddy " + " ".join(["0.5"] * 9)  # too many
    lines[11] = "cloud 1 2 3 4 5 6 seven 8"  # not a number
    (tmp_path / "vectors.txt").write_text("\n".join(lines) + "\n")
    vectors, messages = _quiet_load(tmp_path / "vectors.txt")
    assert len(vectors.words) == len(WORDS) - 3 and "cloud" not in vectors and "traffic" not in vectors
    assert any("3 lines of" in m and "a word and 8 numbers" in m and "lines 4, 6, 12" in m for m in messages), messages


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat 1 2 3\ndog 1 2\n", "line 2: 2 numbers where the first line had 3"),
        ("cat 1 2 3\ndog 1 2\nemu 1\nowl 1 2 3 4\n", r"line 2: 2 numbers where the first line had 3 \(3 such lines, 1 well"),
        ("cat one two\n", "line 1: not a word followed by numbers"),
        ("a,b,c\n1,2,3\n", "holds no vectors"),
        ("\n\n", "holds no vectors"),
        ("3 4\n", "holds no vectors"),
        ("cat nan nan\ndog 0 0\n", "holds no usable vector: every one is NaN, infinite or zero"),
    ],
)
def test_files_that_are_mostly_not_vectors_are_refused_by_line(tmp_path, text, message):
    path = tmp_path / "vectors.txt"
    path.write_text(text)
    with pytest.raises(LaviseError, match=message):
        load_word_vectors(str(path))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe" + "cat 1 2\n".encode("utf-16-le"),  # UTF-16
        b"3 2\ncat " + struct.pack("<2f", 1.0, 2.5) + b"\ndog " + struct.pack("<2f", -1.0, 0.25) + b"\n",  # binary word2vec
        b"caf\xe9 1 2\n",  # Latin-1
        b"cat 1 2\x00\x00\x00\n",  # NUL bytes, valid UTF-8
    ],
)
def test_a_word_vector_file_that_is_not_text_is_refused_by_name(tmp_path, payload):
    path = tmp_path / "vectors.bin"
    path.write_bytes(payload)
    with pytest.raises(LaviseError, match=r"Word-vector file '.*vectors.bin' is not (UTF-8 )?text"):
        load_word_vectors(str(path))


def test_a_folder_or_nothing_as_word_vectors_is_refused(tmp_path):
    with pytest.raises(LaviseError, match="neither 'glove-6b-50d', 'minilm-l6-v2' nor an existing file"):
        load_word_vectors(str(tmp_path))
    with pytest.raises(LaviseError, match="neither 'glove-6b-50d', 'minilm-l6-v2' nor an existing file"):
        load_word_vectors(str(tmp_path / "nowhere.txt"))


def test_what_was_left_out_is_told_at_every_load_also_from_the_cache(tmp_path):
    rows = _rows()
    rows[7][0] = "nan"
    path = _write(tmp_path / "vectors.txt", WORDS, rows, header=f"{len(WORDS)} 8")
    first, told = _quiet_load(path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("words-*.npz"))) == 1
    again, told_again = _quiet_load(path, cache_dir=tmp_path / "cache")
    assert told == told_again and any("apple" in m for m in told_again)
    assert again.words == first.words and torch.equal(again.vectors, first.vectors)


def test_a_clean_file_loads_without_a_warning(tmp_path):
    path = _write(tmp_path / "vectors.txt", WORDS, _rows())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vectors = load_word_vectors(str(path))
    assert vectors.words == WORDS


# --- names and phrases -------------------------------------------------------------------


def _toy() -> WordVectors:
    words = ["teddy", "bear", "up", "down", "broken", "nothing", "red"]
    vectors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [-1.0, -1.0, 0], [math.nan, 0, 0], [0, 0, 0],
                            [0, 0, 1.0]])
    return WordVectors(words, vectors, "toy")


def test_an_unknown_word_in_a_concept_name_is_named_not_dropped_silently():
    with pytest.warns(LaviseWarning, match=r"1 concept names have words without a vector in toy.*'teddy xqzbear' \(without xqzbear\)"):
        kept, vectors, unknown = concept_vectors(["teddy xqzbear", "bear"], _toy())
    assert kept == ["teddy xqzbear", "bear"] and unknown == []
    assert vectors[0].tolist() == [1.0, 0.0, 0.0]  # teddy's vector alone, as the warning says


def test_a_concept_whose_vector_is_zero_or_broken_is_left_out_with_a_warning():
    with pytest.warns(LaviseWarning, match=r"3 concept names have a zero or non-finite vector in toy.*up down, broken, nothing"):
        kept, vectors, unknown = concept_vectors(["up down", "broken", "nothing", "teddy bear", "qqq"], _toy())
    assert kept == ["teddy bear"] and unknown == ["up down", "broken", "nothing", "qqq"]
    assert bool(torch.isfinite(vectors).all()) and float(vectors.norm(dim=1).min()) > 0


def test_concept_names_as_datasets_spell_them_warn_by_their_given_name():
    with pytest.warns(LaviseWarning, match=r"'wall-xqzbrick' \(without xqzbrick\)"):
        concept_vectors(["wall-xqzbrick", "teddy_bear"], WordVectors(["wall", "teddy", "bear"], torch.eye(3), "toy"),
                        normalize_concept)


def test_a_phrase_with_a_zero_or_broken_mean_has_no_vector():
    toy = _toy()
    assert toy.phrase_vector("up down") is None and toy.phrase_vector("broken") is None
    assert toy.phrase_vector("nothing") is None and toy.phrase_vector("teddy") is not None
    assert toy.unknown_words("teddy xqzbear Bear") == ["xqzbear"]


def test_candidate_phrases_with_unknown_words_warn(tmp_path):
    listing = tmp_path / "words.txt"
    listing.write_text("teddy xqzbear\nred\nup down\nqqqq\n")
    with pytest.warns(LaviseWarning) as caught:
        vocabulary = candidate_vocabulary(_toy(), word_list=listing)
    messages = [str(w.message) for w in caught]
    assert vocabulary.words == ["teddy xqzbear", "red"]  # "up down" has a zero vector, "qqqq" none
    assert any("'teddy xqzbear' (without xqzbear)" in m for m in messages), messages
    assert any("2 of the 4 words" in m and "up down, qqqq" in m for m in messages), messages
    with pytest.warns(LaviseWarning, match=r"'teddy xqzbear' \(without xqzbear\)"):
        candidate_vocabulary(_toy(), kind="frequent", concepts=["teddy xqzbear"])


def test_the_shipped_vocabulary_with_glove_has_no_partial_phrase():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        candidate_vocabulary(load_word_vectors(), kind="visual")


# --- vocabulary files and word lists -------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), r"is not UTF-8 text \(invalid start byte at byte 0\)"),
        (lambda p: p.write_bytes(b"dog\ncat\x00\x00\n"), r"is not text \(it holds NUL bytes\)"),
        (lambda p: p.write_bytes("dog\n".encode("utf-16")), "is not UTF-8 text"),
        (lambda p: p.write_text(""), "holds no words"),
        (lambda p: p.write_text("\n \n# a comment\n  # another\n"), "holds no words"),
        (lambda p: p.mkdir(), "is a folder, not a file of words"),
        (lambda p: None, "does not exist"),
    ],
)
def test_bad_vocabulary_files_are_refused_by_name(tmp_path, make, message):
    path = tmp_path / "vocabulary.txt"
    make(path)
    with pytest.raises(LaviseError, match=rf"Vocabulary file '.*vocabulary.txt' {message}"):
        candidate_vocabulary(_toy(), word_list=path)
    if "holds no words" not in message:  # a word list is the same file, read the same way
        with pytest.raises(LaviseError, match=rf"Word list '.*vocabulary.txt' {message}"):
            _toy().vocabulary(word_list=path)


def test_explain_refuses_a_binary_vocabulary_file_by_name(tmp_path, tiny_run, tiny_model, targets, compute):
    from lavise.explain import explain
    from lavise.settings import ExplainSettings

    binary = tmp_path / "words.bin"
    binary.write_bytes(b"\x00\x01\x02\xff" * 50)
    with pytest.raises(LaviseError, match=f"Vocabulary file '{binary}' is not UTF-8 text"):
        explain(tiny_run, targets, settings=ExplainSettings(vocabulary_file=str(binary)), compute=compute, model=tiny_model,
                cache_dir=tmp_path / "cache")


def test_words_with_broken_vectors_are_never_candidates():
    toy = _toy()
    assert toy.vocabulary(size=0).words == ["teddy", "bear", "red"]  # not broken, nothing (nor the stop words)
    assert toy.vocabulary(size=0, clean=False).words == ["teddy", "bear", "up", "down", "red"]


def test_training_on_a_file_with_broken_vectors_warns_and_names_with_clean_words(tmp_path, tiny_model, coco, targets, compute):
    from lavise.datasets import open_reference
    from lavise.explain import explain
    from lavise.runs import train
    from lavise.settings import ExplainSettings, TrainSettings

    rows = _rows()
    rows[7] = ["nan"] * 8  # apple
    rows[8][2] = "inf"  # zebra
    path = _write(tmp_path / "vectors.txt", WORDS, rows)
    with pytest.warns(LaviseWarning, match="NaN or infinite entries and are left out .*apple, zebra"):
        run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", word_vectors=str(path),
                    settings=TrainSettings(epochs=1), compute=compute, cache_dir=tmp_path / "cache")
    with pytest.warns(LaviseWarning, match="apple, zebra"):
        explanations = explain(run, targets, settings=ExplainSettings(vocabulary="frequent", vocabulary_size=0, top_images=3),
                               compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    named = {w["word"] for f in explanations.filters for w in f.words}
    assert named and not named & {"apple", "zebra"}
