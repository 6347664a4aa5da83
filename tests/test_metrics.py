"""Scoring words against ground truth: regions on the IoU grid, tallies, recall, precision, the split."""

from __future__ import annotations

import pytest
import torch

from lavise.errors import LaviseError
from lavise.metrics import (
    IoUTally, WordNetMatch, ground_truth, labelling_split, masks_on_grid, precision_at_1, recall_at_k, score_filters,
)
from lavise.regions import upsampled_regions


# ---------------------------------------------------------------------------------------
# Regions, masks and tallies


def test_regions_are_the_upsampled_map_strictly_above_the_threshold():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    regions = upsampled_regions(maps, torch.tensor([1.0]), (2, 2)).flatten(2)
    assert regions.tolist() == [[[False, False, True, True]]]
    upsampled = upsampled_regions(maps, torch.tensor([1.0]), (4, 4)).reshape(4, 4)
    assert upsampled[0, 0] == False and upsampled[3, 3] == True  # noqa: E712 (tensor booleans)
    assert upsampled.sum() < 16


def test_masks_need_half_a_cell_to_count():
    coverage = torch.zeros(1, 4, 4)
    coverage[0, :2, :] = 1.0  # top half
    coverage[0, 2, :2] = 1.0  # a quarter of the lower-left cell (2x2 pooling): 2 of 4 pixels
    grid = masks_on_grid(coverage, 2).reshape(2, 2)
    assert grid.tolist() == [[True, True], [True, False]]


def test_a_filter_firing_exactly_on_a_mask_has_iou_one_with_it():
    masks = torch.zeros(2, 1, 16, dtype=torch.bool)
    masks[0, 0, :5] = True
    masks[1, 0, 8:10] = True
    regions = torch.zeros(2, 2, 16, dtype=torch.bool)
    regions[:, 0] = masks[:, 0]  # filter 0 = the concept's mask
    regions[0, 1, 3:12] = True  # filter 1 overlaps partly
    tally = IoUTally.zeros(2, 3)
    tally.add(regions, masks, torch.tensor([[2], [2]]))
    iou = tally.iou()
    assert iou[0, 2] == pytest.approx(1.0)
    assert iou[1, 2] == pytest.approx(2 / (9 + 7 - 2))  # Σ∩ = 2, Σ|R| = 9, Σ|M| = 7
    assert iou[:, :2].abs().sum() == 0  # concepts never annotated


def _loop_iou(regions, masks, concepts, num_concepts):
    """Σ|R∩M| / Σ|R∪M| written literally, image by image and pair by pair."""
    d = regions.shape[1]
    inter = torch.zeros(d, num_concepts, dtype=torch.float64)
    union = torch.zeros(d, num_concepts, dtype=torch.float64)
    for i in range(regions.shape[0]):
        for c in range(num_concepts):
            rows = [j for j in range(concepts.shape[1]) if concepts[i, j] == c]
            mask = masks[i, rows].any(dim=0) if rows else torch.zeros(regions.shape[2], dtype=torch.bool)
            for u in range(d):
                inter[u, c] += (regions[i, u] & mask).sum()
                union[u, c] += (regions[i, u] | mask).sum()
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def test_batched_tally_matches_the_literal_loop():
    generator = torch.Generator().manual_seed(3)
    regions = torch.rand(5, 4, 30, generator=generator) > 0.6
    masks = torch.rand(5, 3, 30, generator=generator) > 0.5
    concepts = torch.tensor([[0, 2, -1], [1, -1, -1], [3, 0, 1], [-1, -1, -1], [2, 3, -1]])
    masks[concepts < 0] = False
    tally = IoUTally.zeros(4, 4)
    tally.add(regions[:2], masks[:2], concepts[:2])  # two batches add up like one
    tally.add(regions[2:], masks[2:], concepts[2:])
    assert torch.allclose(tally.iou(), _loop_iou(regions, masks, concepts, 4))
    assert tally.images == 5


def test_ground_truth_keeps_concepts_above_the_threshold_best_first():
    iou = torch.tensor([[0.01, 0.30, 0.05], [0.0, 0.04, 0.0]])
    assert ground_truth(iou, 0.04) == [[1, 2], []]


# ---------------------------------------------------------------------------------------
# Recall and precision


def test_recall_and_precision_on_known_lists():
    words = ["dog", "grass", "car", "tree", "sky"]
    assert recall_at_k(words, ["car"], 2) == 0.0
    assert recall_at_k(words, ["car"], 3) == 1.0
    assert recall_at_k(words, ["car", "boat"], 5) == 0.5
    assert precision_at_1(words, ["dog", "car"]) == 1.0
    assert precision_at_1(words, ["car"]) == 0.0
    assert precision_at_1([], ["car"]) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(words, [], 5)


def test_scores_split_seen_and_unseen_and_count_named_unseen_concepts():
    words = [["dog", "cat"], ["car", "x"], ["x", "y"], ["y"]]
    truth = [["dog"], ["car", "boat"], [], ["boat"]]
    summary, per_filter = score_filters(words, truth, seen={"dog", "car"})
    assert per_filter[2] is None and summary["filters"] == 3
    assert summary["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["precision@1"] == pytest.approx(2 / 3)
    assert summary["seen"]["recall@5"] == 1.0 and summary["seen"]["filters"] == 2
    assert summary["seen"]["precision@1"] == 1.0 and summary["unseen"]["precision@1"] == 0.0
    assert summary["unseen"]["recall@5"] == 0.0 and summary["unseen"]["filters"] == 2
    assert summary["unseen_concepts"] == 1 and summary["unseen_named@20"] == 0.0
    summary, _ = score_filters([["boat"]], [["boat"]], seen=set())
    assert summary["unseen_named@5"] == 1.0 and summary["seen"] is None


def test_unseen_only_filters_bound_what_seen_words_can_reach():
    # filter 1 has a seen concept beside an unseen one; filters 2 and 3 have only unseen ones
    words = [["dog"], ["boat", "car"], ["boat"], ["dog"], ["x"]]
    truth = [["dog"], ["car", "boat"], ["boat"], ["swan"], []]
    summary, _ = score_filters(words, truth, seen={"dog", "car"})
    only = summary["unseen_only"]
    assert only["filters"] == 2 and only["share"] == pytest.approx(2 / 4)
    assert only["precision@1"] == pytest.approx(1 / 2)  # "boat" names filter 2's unseen concept; "dog" misses swan
    assert summary["precision@1"] == pytest.approx(3 / 4)
    summary, _ = score_filters([["dog"]], [["dog"]], seen={"dog"})
    assert summary["unseen_only"] == {"filters": 0, "share": 0.0, "precision@1": None}


def test_lenient_match_accepts_plurals_and_synonyms_but_not_neighbours():
    match = WordNetMatch()
    assert match("whales", "whale") and match("automobile", "car") and match("dogs", "dog")
    assert not match("cat", "dog") and not match("trumpet", "guitar")
    assert match("traffic", "traffic") and not match("qwzx", "dog")
    assert recall_at_k(["spiders"], ["spider"], 1, match) == 1.0
    assert recall_at_k(["spiders"], ["spider"], 1) == 0.0


def test_labelling_split_is_seeded_and_sized():
    a, b = labelling_split(10, 0.5, 1), labelling_split(10, 0.5, 1)
    assert a.sum() == 5 and torch.equal(a, b)
    assert not torch.equal(a, labelling_split(10, 0.5, 2))
    assert labelling_split(10, 0.0, 0).sum() == 0
    with pytest.raises(LaviseError, match="labelling_fraction"):
        labelling_split(10, 1.0, 0)
