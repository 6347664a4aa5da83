"""Unseen concepts the paper's way: chance, bands and scores by hand; WordNet hops; a small evaluate."""

from __future__ import annotations

import json

import pytest

from conftest import COLOURS, ColourNet
from lavise.cli import main
from lavise.datasets import open_reference
from lavise.evaluate import evaluate, markdown_table
from lavise.metrics import (
    chance_at_k, distance_band, named_chance_at_k, score_filters, times_chance, unseen_protocol, unseen_scores,
)
from lavise.models import Preprocessing, TargetModel
from lavise.runs import train
from lavise.settings import EvaluateSettings, ExplainSettings, TrainSettings
from lavise.taxonomy import ancestor_hops, family_of, hops_between, nearest_hops, noun_sense

# ---------------------------------------------------------------------------------------
# The pure mathematics, against hand computations

# Four filters; "sky" is seen, "dog" and "bus" unseen; filter 2 has no ground truth.
WORDS = [["cat", "dog", "tree"], ["car", "road"], ["dog"], ["a", "b", "c", "d", "e", "bus"]]
TRUTH = [["dog", "sky"], ["bus", "dog"], [], ["bus"]]
SEEN = {"sky"}


def test_distance_bands_and_chance():
    assert [distance_band(h) for h in (0, 1, 2, 3, 4, 5, 17, None)] == ["1-2"] * 3 + ["3-4"] * 2 + ["farther"] * 3
    assert chance_at_k(5, 20) == 0.25 and chance_at_k(20, 10) == 1.0
    with pytest.raises(ValueError):
        chance_at_k(5, 0)
    assert named_chance_at_k(5, 20, [1, 2]) == pytest.approx((0.25 + 1 - 0.75**2) / 2)
    assert named_chance_at_k(5, 20, [1, 1, 1]) == pytest.approx(0.25)  # one filter each: k / N
    assert named_chance_at_k(5, 20, []) is None
    assert times_chance(0.5, 0.25) == 2.0 and times_chance(None, 0.25) is None and times_chance(0.5, 0.0) is None


def test_unseen_scores_by_hand():
    scores = unseen_scores(WORDS, TRUTH, {"dog", "bus"})
    # filter 0: dog named at 2; filter 1: neither bus nor dog; filter 3: bus only at 6
    assert scores["recall@5"] == pytest.approx(1 / 3) and scores["recall@10"] == pytest.approx(2 / 3)
    assert scores["named@5"] == 0.5 and scores["named@10"] == 1.0
    assert scores["filters"] == 3 and scores["concepts"] == 2
    assert scores["filters_per_concept"] == {"dog": 2, "bus": 2}
    # the unseen recall of score_filters is the same number
    summary, _ = score_filters(WORDS, TRUTH, SEEN)
    assert summary["unseen"]["recall@5"] == pytest.approx(scores["recall@5"])
    assert summary["unseen_named@10"] == scores["named@10"]
    empty = unseen_scores(WORDS, TRUTH, {"zebra"})
    assert empty["recall@5"] is None and empty["named@5"] is None and empty["concepts"] == 0


def test_unseen_protocol_splits_by_band_with_chance():
    result = unseen_protocol(WORDS, TRUTH, SEEN, 20, {"dog": "1-2"})  # bus is not listed: farther
    assert result["candidates"] == 20 and result["concepts"] == 2
    assert result["chance@5"] == 0.25 and result["recall@5_x_chance"] == pytest.approx((1 / 3) / 0.25)
    assert result["named_chance@5"] == pytest.approx(1 - 0.75**2)  # both concepts have two filters
    assert result["named@5_x_chance"] == pytest.approx(0.5 / (1 - 0.75**2))
    near, middle, far = (result["bands"][b] for b in ("1-2", "3-4", "farther"))
    assert near["concepts"] == 1 and near["filters"] == 2 and near["recall@5"] == 0.5 and near["named@5"] == 1.0
    assert middle["concepts"] == 0 and middle["recall@20"] is None and middle["named@20_x_chance"] is None
    assert far["concepts"] == 1 and far["named@5"] == 0.0 and far["named@10"] == 1.0
    assert near["concepts"] + middle["concepts"] + far["concepts"] == result["concepts"]


# ---------------------------------------------------------------------------------------
# WordNet hops and senses


def test_hops_by_hand_and_through_wordnet():
    assert hops_between({"dog": 0, "canine": 1, "carnivore": 2}, {"cat": 0, "feline": 1, "carnivore": 2}) == 4
    assert hops_between({"a": 0}, {"b": 0}) is None and hops_between(None, {"b": 0}) is None
    found = nearest_hops(["dog", "automobile", "zzqx"], ["cat", "car"])
    assert found == {"dog": 4, "automobile": 0, "zzqx": None}  # dog-canine-carnivore-feline-cat; a synonym
    names, others = ["dog", "guitar", "apple", "tiger"], ["cat", "violin", "pear", "bus"]
    brute = {n: min(hops_between(ancestor_hops(n), ancestor_hops(o)) for o in others) for n in names}
    assert nearest_hops(names, others) == brute
    assert nearest_hops(["dog"], []) == {"dog": None}


def test_senses_read_the_visible_thing():
    assert noun_sense("tiger").lexname() == "noun.animal"  # WordNet's first sense is a person
    assert noun_sense("whale").name() == "whale.n.02"  # the rule misses it: SENSES fixes it
    assert noun_sense("grapes").name() == "grape.n.01" and noun_sense("traffic light").name() == "traffic_light.n.01"
    assert noun_sense("zzqx") is None
    assert [family_of(w) for w in ("dog", "car", "guitar", "apple", "zzqx")] == [
        "animal", "vehicle", "musical instrument", "food", "other"]


# ---------------------------------------------------------------------------------------
# In evaluate, on filters that are known colour detectors



@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A colour-detector run with one of its three concepts held out of training."""
    from conftest import make_coco
    from lavise.settings import ComputeSettings

    root = tmp_path_factory.mktemp("unseen")
    data = make_coco(root / "colours", images=30, names=tuple(COLOURS))
    model = TargetModel.from_module(ColourNet(), Preprocessing(64, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), name="colours")
    compute = ComputeSettings(device="cpu", batch_size=8, num_workers=0, progress=False)
    run = train(model, "detect", open_reference(data), root / "run", settings=TrainSettings(epochs=2, unseen_fraction=0.34),
                compute=compute, cache_dir=root / "cache")
    assert len(run.split["unseen"]) == 1
    return run, model, open_reference(data), compute, root


REGIONS = ExplainSettings(quantile=0.3)


def test_evaluate_scores_unseen_concepts_in_both_lists(held_out):
    run, model, dataset, compute, root = held_out
    common = dict(explain_settings=REGIONS, compute=compute, model=model, cache_dir=root / "cache")
    settings = EvaluateSettings(methods=("activation", "netdissect"), lenient=False, labelling_fraction=0.5)
    (evaluation,) = evaluate([run], dataset, settings=settings, **common)
    summary = evaluation.methods["activation"]
    protocol, info = summary["unseen_protocol"], evaluation.info["unseen_protocol"]
    assert "unseen_protocol" not in evaluation.methods["netdissect"]
    assert info["entities"] == protocol["entities"]["candidates"] == 3  # the three concept names
    assert protocol["open"]["candidates"] == evaluation.info["vocabulary"]["words"] > 1000
    unseen = run.split["unseen"][0]
    assert set(info["unseen_hops"]) == {unseen} and sum(info["band_concepts"].values()) == 1
    assert protocol["entities"]["concepts"] == protocol["open"]["concepts"] == summary["unseen_concepts"] == 1
    # the open list's unseen recall is the one evaluate always reported
    assert protocol["open"]["recall@20"] == pytest.approx(summary["unseen"]["recall@20"])
    # three entities, three words per image: every filter lists all of them, at chance 1
    assert info["words_per_image"] == 3
    assert protocol["entities"]["recall@5"] == protocol["entities"]["named@5"] == 1.0
    assert protocol["entities"]["chance@5"] == 1.0 and protocol["entities"]["recall@5_x_chance"] == 1.0
    band = info["band_concepts"]
    assert protocol["entities"]["bands"][next(b for b, n in band.items() if n)]["named@5"] == 1.0
    written = json.loads((run.path / "evaluation.json").read_text())
    assert written["methods"]["activation"]["unseen_protocol"]["entities"]["candidates"] == 3
    assert "entity named@20" in markdown_table([evaluation]) and "| 1.000 | 1.000 |" in markdown_table([evaluation])
    # the table says which share of the scored filters has only unseen ground truth, as the summary counts it
    header, _, activation = markdown_table([evaluation]).splitlines()[:3]
    row = dict(zip(header.split(" | "), activation.split(" | ")))
    only = summary["unseen_only"]
    assert only["filters"] == 1 and only["filters"] == sum(bool(f["ground_truth"]) and all(g["concept"] == unseen for g in f["ground_truth"])
                                  for f in evaluation.filters)
    assert row["unseen only"] == f"{only['share']:.3f}" and row["seen P@1"] == f"{summary['seen']['precision@1']:.3f}"
    # without the protocol: the same words and scores, no entity list
    (plain,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), lenient=False,
                                                                  unseen_protocol=False), write=False, **common)
    assert "unseen_protocol" not in plain.methods["activation"] and "unseen_protocol" not in plain.info
    assert [f["methods"]["activation"]["words"] for f in plain.filters] == \
        [f["methods"]["activation"]["words"] for f in evaluation.filters]
    assert {k: v for k, v in plain.methods["activation"].items() if k != "unseen_protocol"} == \
        {k: v for k, v in summary.items() if k != "unseen_protocol"}


def test_sweep_rows_carry_the_entity_scores(held_out):
    from lavise.sweep import _entity_columns

    run, model, dataset, compute, root = held_out
    (evaluation,) = evaluate([run], dataset, settings=EvaluateSettings(methods=("activation",), lenient=False),
                             explain_settings=REGIONS, compute=compute, model=model, cache_dir=root / "cache", write=False)
    columns = _entity_columns(evaluation.methods["activation"])
    entities = evaluation.methods["activation"]["unseen_protocol"]["entities"]
    assert columns["entity_unseen_named@20"] == entities["named@20"] == 1.0
    assert columns["unseen_concepts_1-2"] == entities["bands"]["1-2"]["concepts"]
    assert set(_entity_columns({}).values()) == {None}  # an evaluation without the protocol


def test_an_entity_file_sets_the_candidates(held_out, tmp_path):
    run, model, dataset, compute, root = held_out
    entities = tmp_path / "entities.txt"
    entities.write_text("circle\nsquare\ntriangle\ndog\ncat\nzzqxv\n")
    settings = EvaluateSettings(methods=("activation",), lenient=False, entity_file=str(entities))
    with pytest.warns(Warning, match="zzqxv"):
        (evaluation,) = evaluate([run], dataset, settings=settings, explain_settings=REGIONS, compute=compute,
                                 model=model, cache_dir=root / "cache", write=False)
    protocol = evaluation.methods["activation"]["unseen_protocol"]["entities"]
    assert protocol["candidates"] == 5 and protocol["chance@5"] == 1.0 and protocol["chance@10"] == 1.0
    assert evaluation.info["unseen_protocol"]["entity_list"]["kind"] == "entity file"
    assert evaluation.info["unseen_protocol"]["words_per_image"] == 5


def test_cli_refuses_a_missing_entity_file(held_out, tmp_path, capsys):
    run, _, _, _, root = held_out
    missing = tmp_path / "missing.txt"
    code = main(["evaluate", str(run.path), "--dataset", str(root / "colours" / "annotations.json"),
                 "--entity-file", str(missing), "--no-progress", "--device", "cpu"])
    assert code == 2
    assert f"--entity-file '{missing}' does not exist" in capsys.readouterr().err
