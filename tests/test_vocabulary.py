"""Words people can trust: the visual vocabulary, datasets' names, CSLS, and a world of exact detectors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from lavise.datasets import open_reference
from lavise.embeddings import WordVectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.evaluate import evaluate
from lavise.explain import explain
from lavise.models import Preprocessing, TargetModel
from lavise.naming import nearest_words
from lavise.retrieval import csls_scores, hub_penalty, hubness
from lavise.runs import train
from lavise.settings import EvaluateSettings, ExplainSettings, TrainSettings
from lavise.synthetic.concepts import concept_pool
from lavise.vocabulary import (
    COCO_PANOPTIC_STUFF, COCO_STUFF, COCO_THINGS, COLOURS, TEXTURES, candidate_vocabulary, normalize_concept,
    unnamed_concepts, visual_words,
)


# --- the shipped lists ---------------------------------------------------------------------


def test_every_dataset_and_demo_name_is_in_the_visual_vocabulary():
    words = set(visual_words())
    names = [*COCO_THINGS, *COCO_STUFF, *COCO_PANOPTIC_STUFF, *COLOURS, *TEXTURES, *(c.word for c in concept_pool())]
    assert [n for n in names if normalize_concept(n) not in words] == []
    assert len(COCO_THINGS) == 80 and len(COCO_STUFF) == 91 and len(COCO_PANOPTIC_STUFF) == 53
    assert len(TEXTURES) == 47 and len(COLOURS) == 11


def test_the_visual_vocabulary_holds_no_names_abbreviations_or_verbs():
    words = set(visual_words())
    # first words of lavise 0.4's demo and of the issue's exact-detector world
    for junk in ("dustin", "novak", "greg", "bbn", "nn", "newswires", "providers", "rained", "informing",
                 "capsized", "avian", "vocals", "senate", "counsel", "impeachment", "intel", "organisations"):
        assert junk not in words, junk
    for thing in ("dog", "boat", "bird", "guitar", "house", "apple", "umbrella", "grass", "sky", "brick wall"):
        assert thing in words, thing
    assert len(words) > 3000 and all(w == w.lower() and w.strip() == w for w in words)


def test_dataset_names_mean_their_words():
    assert normalize_concept("sky-other-merged") == "sky"
    assert normalize_concept("grass-merged") == "grass"
    assert normalize_concept("wall-other-merged") == "wall"
    assert normalize_concept("door-stuff") == "door"
    assert normalize_concept("wall-brick") == "brick wall"
    assert normalize_concept("Traffic_light") == "traffic light"
    assert normalize_concept("playingfield") == "playing field"
    assert unnamed_concepts(["sky", "other-merged", "stuff"]) == ["other-merged", "stuff"]


def test_concept_names_join_the_vocabulary_as_phrases():
    vectors = load_word_vectors()
    vocabulary = candidate_vocabulary(vectors, concepts=["teddy_bear", "sky-other-merged", "dog", "other", "rusty anchor"])
    assert {"teddy bear", "sky", "rusty anchor"} <= set(vocabulary.words)
    assert vocabulary.words.count("dog") == 1 and "other" not in vocabulary.words
    index = vocabulary.words.index("teddy bear")
    expected = F.normalize((vectors.phrase_vector("teddy") + vectors.phrase_vector("bear")) / 2, dim=0)
    torch.testing.assert_close(vocabulary.unit_vectors[index], expected)
    assert vocabulary.description["kind"] == "visual" and vocabulary.description["concept_names_added"] == 1
    frequent = candidate_vocabulary(vectors, kind="frequent", size=20_000)
    assert frequent.words == vectors.vocabulary(size=20_000).words  # lavise 0.4's list, unchanged


def test_bad_vocabulary_files_are_refused_by_name(tmp_path):
    vectors = load_word_vectors()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(LaviseError, match=r"Vocabulary file '.*empty.txt' holds no words"):
        candidate_vocabulary(vectors, word_list=empty)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("qqqzzxv\nzzzqqxw\n")
    with pytest.raises(LaviseError, match=r"'.*unknown.txt': none of its 2 words has a vector in glove-6b-50d"):
        candidate_vocabulary(vectors, word_list=unknown)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00dog")
    with pytest.raises(LaviseError, match=r"'.*binary.txt' is not UTF-8 text"):
        candidate_vocabulary(vectors, word_list=binary)
    with pytest.raises(LaviseError, match=r"'.*missing.txt' does not exist"):
        candidate_vocabulary(vectors, word_list=tmp_path / "missing.txt")
    with pytest.raises(LaviseError, match="Unknown vocabulary 'visuals'"):
        candidate_vocabulary(vectors, kind="visuals")


# --- CSLS -------------------------------------------------------------------------------------


def test_csls_takes_the_hub_word_off_the_top():
    # word 0 is nearer every output than the word of its own concept, 1-3
    words = torch.eye(4)
    outputs = torch.tensor([[0.75, 0.66, 0.0, 0.0], [0.75, 0.0, 0.66, 0.0], [0.75, 0.0, 0.0, 0.66]]).repeat(4, 1)
    cosine, _ = nearest_words(outputs, words, 1)
    assert cosine.flatten().tolist() == [0] * 12  # the hub names everything
    # k beyond one concept's outputs: the hub is near all 8 of its neighbours, a concept's word near 4
    penalty = hub_penalty(words, outputs, k=8)
    csls, scores = nearest_words(outputs, words, 1, penalty=penalty)
    assert csls.flatten().tolist() == [1, 2, 3] * 4
    torch.testing.assert_close(scores, csls_scores(outputs, words, penalty).gather(1, csls))


def test_nearest_words_with_a_penalty_equal_the_brute_force_top_k():
    generator = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(3000, 16, generator=generator), dim=1)
    queries = torch.randn(50, 16, generator=generator)
    penalty = hubness(words, torch.randn(200, 16, generator=generator), 10) / 2
    ids, scores = nearest_words(queries, words, 5, penalty=penalty, chunk=7)
    brute = F.normalize(queries, dim=1) @ words.T - penalty
    expected = brute.topk(5, dim=1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(scores, expected.values)


def test_hubness_is_the_mean_of_the_k_nearest_outputs():
    generator = torch.Generator().manual_seed(1)
    words = F.normalize(torch.randn(40, 8, generator=generator), dim=1)
    outputs = torch.randn(30, 8, generator=generator)
    cosines = words @ F.normalize(outputs, dim=1).T
    expected = torch.stack([row.sort(descending=True).values[:4].mean() for row in cosines])
    torch.testing.assert_close(hubness(words, outputs, 4, chunk=9), expected)
    with pytest.raises(LaviseError, match="hub_neighbours must be at least 1"):
        hubness(words, outputs, 0)


# --- a world whose filters are exact detectors -------------------------------------------------

# Each concept is a flat patch of its own colour (on a 3 x 3 x 3 grid of colours, the greys of
# the background left out); filter c of the detector fires exactly where the image has it.
NAMES = ("boat", "bird", "guitar", "house", "apple", "umbrella", "traffic light", "teddy bear", "dog", "car", "tree",
         "chair", "bottle", "horse", "clock", "cake", "kite", "train", "bicycle", "cup", "banana", "sheep", "book",
         "pizza")
LEVELS = (30, 130, 230)
COLOURS_OF_GRID = [(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS if not r == g == b]
DETECTED = dict(zip(NAMES, COLOURS_OF_GRID))


class ColourDetector(nn.Module):
    """Channel c: 1 where a pixel has concept c's colour (within a small distance), pooled to 8 x 8."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(list(DETECTED.values()), dtype=torch.float32) / 255)
        self.features = nn.Sequential(nn.Identity())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        distance = ((images.unsqueeze(1) - self.colours[None, :, :, None, None]) ** 2).sum(dim=2)  # (n, C, H, W)
        return self.features(F.avg_pool2d((distance < 0.01).float(), 8))


def _detector_scenes(root: Path, images: int, seed: int) -> Path:
    """COCO scenes of grey noise with two to three concepts each, as flat coloured rectangles."""
    rng = np.random.default_rng(seed)
    names = list(DETECTED)
    (root / "images").mkdir(parents=True)
    entries, annotations = [], []
    for index in range(images):
        canvas = (rng.integers(90, 150, (64, 64, 1)) + rng.integers(0, 10, (64, 64, 3))).astype(np.uint8)
        for c in rng.choice(len(names), size=int(rng.integers(3, 5)), replace=False):
            w, h = (int(v) for v in rng.integers(12, 28, size=2))
            x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
            mask = np.zeros((64, 64), np.uint8)
            mask[y : y + h, x : x + w] = 1
            canvas[mask.astype(bool)] = DETECTED[names[c]]
            for earlier in annotations:  # later patches occlude earlier ones
                if earlier["image_id"] == index + 1:
                    earlier["mask"] &= ~mask.astype(bool)
            annotations.append({"image_id": index + 1, "category_id": int(c) + 1, "mask": mask.astype(bool)})
        Image.fromarray(canvas).save(root / "images" / f"{index:03d}.png")
        entries.append({"id": index + 1, "file_name": f"{index:03d}.png", "width": 64, "height": 64})
    coco_annotations = []
    for number, a in enumerate(annotations, start=1):
        rle = mask_utils.encode(np.asfortranarray(a["mask"].astype(np.uint8)))
        coco_annotations.append({"id": number, "image_id": a["image_id"], "category_id": a["category_id"],
                                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                 "area": float(a["mask"].sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                 "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    (root / "annotations.json").write_text(json.dumps({"images": entries, "annotations": coco_annotations,
                                                       "categories": categories}))
    return root


def test_every_exact_detector_is_named_by_its_concept(tmp_path, compute):
    detector = TargetModel.from_module(ColourDetector(), Preprocessing(resize_size=64, crop_size=64, mean=(0, 0, 0),
                                                                       std=(1, 1, 1)), name="detector")
    reference = open_reference(_detector_scenes(tmp_path / "reference", 240, seed=0) / "annotations.json")
    targets = _detector_scenes(tmp_path / "targets", 120, seed=1) / "images"
    run = train(detector, "features", reference, tmp_path / "run", settings=TrainSettings(epochs=40), compute=compute,
                cache_dir=tmp_path / "cache")
    result = explain(run, targets, settings=ExplainSettings(top_images=10), compute=compute, model=detector,
                     cache_dir=tmp_path / "cache")
    first = {list(DETECTED)[f.filter]: f.words[0]["word"] for f in result.filters}
    assert first == {name: name for name in DETECTED}
    assert all(f.named for f in result.filters)
    # the run's survey: each detector's label on the reference images is its concept, and the
    # confidence is fitted on these 24 real filters
    assert [f.label for f in result.filters] == list(DETECTED)
    assert result.extra["naming"]["calibration"]["fitted_on"] == "reference filters"
    # lavise 0.4's naming (frequent words, cosine, no concept names) cannot name the phrases
    old = explain(run, targets, settings=ExplainSettings.as_in_0_4(top_images=10), compute=compute, model=detector,
                  cache_dir=tmp_path / "cache", write=False)
    assert {f.words[0]["word"] for f in old.filters}.isdisjoint({"traffic light", "teddy bear"})
    # calibrated stacking: seen names lowered by 2, more than any cosine gap, rank below every other word
    stacked = explain(run, targets, settings=ExplainSettings(top_images=10, seen_penalty=2.0), compute=compute,
                      model=detector, cache_dir=tmp_path / "cache", write=False)
    assert all(w["word"] not in DETECTED for f in stacked.filters for w in f.words)
    mild = explain(run, targets, settings=ExplainSettings(top_images=10, seen_penalty=1e-6), compute=compute,
                   model=detector, cache_dir=tmp_path / "cache", write=False)
    assert [f.words[0]["word"] for f in mild.filters] == [f.words[0]["word"] for f in result.filters]
    # 60 top images, more than hold any one concept: on the rest a detector does not fire, its
    # region is empty, and the explainer's output there is one and the same for every filter
    wide = explain(run, targets, settings=ExplainSettings(top_images=60), compute=compute, model=detector,
                   cache_dir=tmp_path / "cache", write=False)
    assert {list(DETECTED)[f.filter]: f.words[0]["word"] for f in wide.filters} == {name: name for name in DETECTED}
    assert all(0 < f.firing_images < 60 for f in wide.filters)
    every = explain(run, targets, settings=ExplainSettings(top_images=60, firing_images_only=False, label_first=0),
                    compute=compute, model=detector, cache_dir=tmp_path / "cache", write=False)
    _, most = Counter(f.words[0]["word"] for f in every.filters).most_common(1)[0]
    assert most == len(DETECTED)  # when every top image votes, the empty regions' word names them all
    # the reference labels put each detector's concept back in front: it is still among its first three words
    labelled = explain(run, targets, settings=ExplainSettings(top_images=60, firing_images_only=False), compute=compute,
                       model=detector, cache_dir=tmp_path / "cache", write=False)
    assert sum(f.words[0]["word"] == list(DETECTED)[f.filter] for f in labelled.filters) > len(DETECTED) // 2
    # evaluate names the same way
    dataset = open_reference(targets.parent / "annotations.json")
    scores = {firing: evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), unseen_protocol=False),
                               explain_settings=ExplainSettings(top_images=60, firing_images_only=firing, label_first=0),
                               compute=compute,
                               model=detector, cache_dir=tmp_path / "cache", write=False)[0].methods["activation"]
              for firing in (True, False)}
    assert scores[True]["filters"] >= 20 and scores[True]["precision@1"] == 1.0  # filters with ground truth on the scoring half
    assert scores[False]["precision@1"] <= 1 / len(DETECTED)


def test_concept_names_that_mean_nothing_are_reported_and_left_out(tmp_path, compute, coco_maker, tiny_model):
    path = coco_maker(tmp_path / "coco", names=("circle", "other-merged", "triangle", "traffic light"))
    with pytest.warns(LaviseWarning, match=r"1 concept names mean no word .* left out: other-merged"):
        run = train(tiny_model, "features.3", open_reference(path), tmp_path / "run", settings=TrainSettings(epochs=1),
                    compute=compute, cache_dir=tmp_path / "cache")
    assert run.split["without_words"] == ["other-merged"]
    assert "other-merged" not in run.split["seen"] + run.split["unseen"]


def test_a_word_list_with_phrases_names_by_their_mean_vector():
    vectors = WordVectors(["red", "car", "sky"], torch.eye(3), "toy")
    words = F.normalize(torch.eye(3)[[0, 1]].mean(dim=0), dim=0)
    vocabulary = candidate_vocabulary(vectors, kind="frequent", concepts=["red car"])
    assert vocabulary.words == ["red", "car", "sky", "red car"]
    torch.testing.assert_close(vocabulary.unit_vectors[3], words)
