"""A world of hundreds of concepts: the OpenMoji pool read through WordNet, its families and split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lavise.checks import SettingError
from lavise.cli import main
from lavise.settings import SceneSettings
from lavise.synthetic import generate_scenes
from lavise.synthetic.scenes import choose_concepts
from lavise.synthetic.world import concept_families, family_summary

LARGE = SceneSettings(pool="wordnet", num_concepts=None, unseen_fraction=0.3, seed=5)


def test_the_wordnet_pool_holds_hundreds_of_visible_concepts():
    concepts, unseen = choose_concepts(LARGE)
    emoji = [c.word for c in concepts if c.source == "openmoji"]
    assert len(emoji) >= 300
    everything, _ = choose_concepts(SceneSettings(num_concepts=None))
    assert set(emoji) < {c.word for c in everything}  # a subset of the Unicode-name pool
    for dropped in ("ceremony", "customs", "deeply", "departure"):  # abstract names
        assert dropped in {c.word for c in everything} and dropped not in emoji


def test_semantic_families_are_present():
    concepts, unseen = choose_concepts(LARGE)
    families = concept_families([c.word for c in concepts])
    sizes = Counter(families.values())
    assert sizes["animal"] >= 40 and sizes["food"] >= 25 and sizes["vehicle"] >= 20
    assert sizes["musical instrument"] >= 5 and sizes["person"] >= 15
    assert families["dog"] == "animal" and families["bus"] == "vehicle" and families["violin"] == "musical instrument"
    summary = family_summary(families, unseen)
    assert sum(f["seen"] + f["unseen"] for f in summary.values()) == len(concepts)
    assert all(summary[f]["seen"] and summary[f]["unseen"] for f in ("animal", "food", "vehicle"))  # both sides


def test_the_split_is_70_30_and_comes_from_the_seed():
    concepts, unseen = choose_concepts(LARGE)
    assert len(unseen) == round(0.3 * len(concepts))
    again, unseen_again = choose_concepts(LARGE)
    assert again == concepts and unseen_again == unseen
    _, other = choose_concepts(SceneSettings(**{**LARGE.to_dict(), "seed": 6}))
    assert other != unseen
    drawn, _ = choose_concepts(SceneSettings(pool="wordnet", num_concepts=320, seed=5))
    assert len([c for c in drawn if c.source == "openmoji"]) == 320


def test_the_default_pool_and_its_cache_key_are_unchanged():
    assert "pool" not in SceneSettings().to_dict() and LARGE.to_dict()["pool"] == "wordnet"
    assert choose_concepts(SceneSettings()) == choose_concepts(SceneSettings(pool="unicode"))
    with pytest.raises(SettingError, match="pool"):
        SceneSettings(pool="everything")


def test_scenes_of_the_large_world_record_families_and_are_cached(tmp_path):
    settings = SceneSettings(pool="wordnet", num_concepts=320, unseen_fraction=0.3, num_images=3, image_size=64, seed=2,
                             concepts_per_image=(2, 3))
    out = generate_scenes(tmp_path / "evaluation", settings, part="evaluation", progress=False)
    split = json.loads((out / "split.json").read_text())
    assert len(split["concepts"]) == 323 and len(split["unseen"]) == round(0.3 * 323)  # and the three textures
    assert set(split["families"]) == {c["word"] for c in split["concepts"]}
    record = json.loads((out / "scenes.json").read_text())
    assert record["settings"]["pool"] == "wordnet" and "animal" in record["summary"]["families"]
    stamp = (out / "scenes.json").stat().st_mtime_ns
    generate_scenes(tmp_path / "evaluation", settings, part="evaluation", progress=False)
    assert (out / "scenes.json").stat().st_mtime_ns == stamp  # the same arguments: nothing redone
    reference = generate_scenes(tmp_path / "reference", settings, part="reference", progress=False)
    names = {c["name"] for c in json.loads((reference / "annotations.json").read_text())["categories"]}
    assert names == set(split["seen"])


def test_synth_draws_the_whole_pool(tmp_path, capsys):
    out = tmp_path / "world"
    code = main(["synth", "--out", str(out), "--pool", "wordnet", "--all-concepts", "--vocabulary-size", "0",
                 "--num-images", "2", "--image-size", "64", "--unseen-fraction", "0.3", "--part", "evaluation",
                 "--no-texture-concepts"])
    assert code == 0
    split = json.loads((out / "split.json").read_text())
    concepts, _ = choose_concepts(SceneSettings(pool="wordnet", num_concepts=None, texture_concepts=False))
    assert len(split["concepts"]) == len(concepts) >= 300
