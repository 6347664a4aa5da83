"""The evaluation: IoU tallies, ground truth, recall, baselines and NetDissect, on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lavise.cli import main
from lavise.datasets import open_reference
from lavise.errors import LaviseError
from lavise.evaluate import (
    IoUTally,
    WordNetMatch,
    activation_regions,
    annotated_fraction_sweep,
    evaluate,
    ground_truth,
    image_masking_inputs,
    labelling_split,
    mask_images,
    masks_on_grid,
    precision_at_1,
    recall_at_k,
    score_filters,
)
from lavise.models import Preprocessing, TargetModel, layer_reader
from lavise.runs import train
from lavise.settings import EvaluateSettings, ExplainSettings, TrainSettings

# ---------------------------------------------------------------------------------------
# Regions, masks and tallies


def test_regions_are_the_upsampled_map_strictly_above_the_threshold():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    regions = activation_regions(maps, torch.tensor([1.0]), 2)
    assert regions.tolist() == [[[False, False, True, True]]]
    upsampled = activation_regions(maps, torch.tensor([1.0]), 4).reshape(4, 4)
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
    assert summary["unseen"]["recall@5"] == 0.0 and summary["unseen"]["filters"] == 2
    assert summary["unseen_concepts"] == 1 and summary["unseen_named@20"] == 0.0
    summary, _ = score_filters([["boat"]], [["boat"]], seen=set())
    assert summary["unseen_named@5"] == 1.0 and summary["seen"] is None


def test_lenient_match_accepts_plurals_and_synonyms_but_not_neighbours():
    match = WordNetMatch()
    assert match("whales", "whale") and match("automobile", "car") and match("dogs", "dog")
    assert not match("cat", "dog") and not match("trumpet", "guitar")
    assert match("traffic", "traffic") and not match("qwzx", "dog")
    assert recall_at_k(["spiders"], ["spider"], 1, match) == 1.0
    assert recall_at_k(["spiders"], ["spider"], 1) == 0.0


# ---------------------------------------------------------------------------------------
# Image masking and the split


def test_mask_images_keeps_only_the_region():
    images = torch.ones(1, 3, 4, 4)
    maps = torch.tensor([[[0.0, 5.0], [0.0, 0.0]]])  # the top-right quarter is active
    masked = mask_images(images, maps, torch.tensor([2.0]))
    assert masked[0, :, 0, 3].eq(1).all() and masked[0, :, 3, 0].eq(0).all()


class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


def test_image_masking_inputs_match_a_pair_by_pair_loop():
    torch.manual_seed(0)
    module = _Pool().eval()
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        maps = module(images)  # (3, 4, 4, 4)
    thresholds = maps.flatten(2).amax(dim=(0, 2)) * 0.3
    filters, rows = torch.tensor([0, 3, 1]), torch.tensor([2, 0, 2])
    with layer_reader(module, "conv") as read, torch.no_grad():
        inputs = image_masking_inputs(read, lambda r: images[r], maps, thresholds, torch.device("cpu"))
        batched = inputs(filters, rows)
    with torch.no_grad():
        for n in range(3):
            u, i = int(filters[n]), int(rows[n])
            region = torch.nn.functional.interpolate(maps[i, u][None, None], size=(8, 8), mode="bilinear") > thresholds[u]
            expected = module(images[i : i + 1] * region).mean(dim=(2, 3))[0]
            assert torch.allclose(batched[n], expected, atol=1e-5)


def test_labelling_split_is_seeded_and_sized():
    a, b = labelling_split(10, 0.5, 1), labelling_split(10, 0.5, 1)
    assert a.sum() == 5 and torch.equal(a, b)
    assert not torch.equal(a, labelling_split(10, 0.5, 2))
    assert labelling_split(10, 0.0, 0).sum() == 0
    with pytest.raises(LaviseError, match="labelling_fraction"):
        labelling_split(10, 1.0, 0)


# ---------------------------------------------------------------------------------------
# End to end, on a model whose filters are known colour detectors

COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220)}


class ColourNet(nn.Module):
    """Filter c is 1 − (distance to concept c's colour), at full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(list(COLOURS.values())).float() / 255)
        self.detect = nn.Identity()

    def forward(self, x):
        distance = (x.unsqueeze(1) - self.colours.view(1, -1, 3, 1, 1)).abs().amax(dim=2)  # (n, C, H, W)
        return self.detect((1 - 10 * distance).clamp_min(0))


@pytest.fixture
def colour_run(tmp_path, coco_maker, compute):
    data = coco_maker(tmp_path / "colours", images=30, names=tuple(COLOURS))
    model = TargetModel.from_module(ColourNet(), Preprocessing(64, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), name="colours")
    run = train(model, "detect", open_reference(data), tmp_path / "run", settings=TrainSettings(epochs=2),
                compute=compute, cache_dir=tmp_path / "cache")
    return run, model, open_reference(data)


def test_netdissect_labels_each_colour_filter_with_its_concept(colour_run, compute, tmp_path):
    run, model, dataset = colour_run
    settings = EvaluateSettings(methods=("netdissect", "original"), iou_size=64)
    (evaluation,) = evaluate([run], dataset, settings=settings, explain_settings=ExplainSettings(quantile=0.3),
                             compute=compute, model=model, cache_dir=tmp_path / "cache")
    names = list(COLOURS)
    for u, entry in enumerate(evaluation.filters):
        assert entry["netdissect"]["concept"] == names[u] and entry["netdissect"]["iou"] > 0.5
        assert entry["ground_truth"][0]["concept"] == names[u]
    nd = evaluation.methods["netdissect"]
    assert nd["filters"] == 3 and nd["precision@1"] == 1.0 and nd["recall@5"] == 1.0
    # original names every filter the same way (one input for all), so at most one is right
    assert len({tuple(f["methods"]["original"]["words"]) for f in evaluation.filters}) == 1
    assert evaluation.methods["original"]["distinct_top_words"] == 1
    assert evaluation.methods["netdissect"]["distinct_top_words"] == 3
    written = json.loads((run.path / "evaluation.json").read_text())
    assert set(written["methods"]) == {"netdissect", "original"}
    assert (run.path / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| colours | detect | netdissect | 3 |" in (run.path / "evaluation.md").read_text()


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """A run of a model built by name (ResNet-18 layer3, random weights), so the CLI can rebuild it."""
    from lavise.settings import ComputeSettings

    from conftest import make_coco

    root = tmp_path_factory.mktemp("named")
    data = make_coco(root / "coco", images=24)
    compute = ComputeSettings(device="cpu", batch_size=8, num_workers=0, progress=False)
    from lavise.models import ModelSpec

    run = train(ModelSpec("resnet18"), "layer3", open_reference(data), root / "run", settings=TrainSettings(epochs=2),
                compute=compute, cache_dir=root / "cache")
    return run, data, root / "cache"


def test_several_layers_in_one_call_give_one_table(named_run, tmp_path, capsys):
    run, data, cache = named_run
    from lavise.models import ModelSpec
    from lavise.settings import ComputeSettings

    compute = ComputeSettings(device="cpu", batch_size=8, num_workers=0, progress=False)
    layer2 = train(ModelSpec("resnet18"), "layer2", open_reference(data), tmp_path / "layer2",
                   settings=TrainSettings(epochs=1), compute=compute, cache_dir=cache)
    code = main(["evaluate", str(layer2.path), str(run.path), "--dataset", str(data), "--methods", "activation",
                 "--no-lenient", "--iou-size", "32", "--cache-dir", str(cache), "--num-workers", "0", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "layers.md")])
    assert code == 0
    table = (tmp_path / "layers.md").read_text()
    assert "| resnet18 | layer2 | activation |" in table and "| resnet18 | layer3 | activation |" in table
    assert (layer2.path / "evaluation.json").is_file() and (run.path / "evaluation.json").is_file()


COLOUR_REGIONS = ExplainSettings(quantile=0.3)  # the shapes cover well over 0.5 % of the pixels


def test_every_method_runs_and_the_tallies_are_cached(colour_run, compute, tmp_path):
    run, model, dataset = colour_run
    cache = tmp_path / "eval-cache"
    (first,) = evaluate([run.path], dataset, explain_settings=COLOUR_REGIONS, compute=compute, model=model, cache_dir=cache)
    assert set(first.methods) == {"original", "image", "activation", "attention", "cosine-attention", "netdissect"}
    for summary in first.methods.values():
        assert summary["filters"] == 3
        assert set(summary["lenient"]) >= {"recall@5", "recall@10", "recall@20", "precision@1"}
    for entry in first.filters:
        assert 1 <= len(entry["methods"]["attention"]["words"]) <= 20  # fewer when few words recur
    tallies = list(cache.glob("iou-*.safetensors"))
    assert len(tallies) == 1
    stamp = tallies[0].stat().st_mtime_ns
    (second,) = evaluate([run.path], dataset, explain_settings=COLOUR_REGIONS, compute=compute, model=model,
                         cache_dir=cache, write=False)
    assert tallies[0].stat().st_mtime_ns == stamp
    assert second.methods == first.methods
    info = json.loads((run.path / "evaluation.json").read_text())
    assert info["dataset"]["labelling_images"] + info["dataset"]["scoring_images"] == info["dataset"]["images"] == 30


def test_ground_truth_comes_from_the_scoring_split(colour_run, compute, tmp_path):
    run, model, dataset = colour_run
    half = EvaluateSettings(methods=("original",), labelling_fraction=0.5, lenient=False)
    whole = EvaluateSettings(methods=("original",), labelling_fraction=0.0, lenient=False)
    common = dict(explain_settings=COLOUR_REGIONS, compute=compute, model=model, cache_dir=tmp_path / "c", write=False)
    (a,) = evaluate([run], dataset, settings=half, **common)
    (b,) = evaluate([run], dataset, settings=whole, **common)
    assert a.info["dataset"]["scoring_images"] == 15 and b.info["dataset"]["scoring_images"] == 30
    ious_a = [g["iou"] for f in a.filters for g in f["ground_truth"]]
    ious_b = [g["iou"] for f in b.filters for g in f["ground_truth"]]
    assert len(ious_a) == len(ious_b) == 3 and ious_a != ious_b


def test_sweep_trains_on_fewer_concepts_and_scores_unseen_ones(named_run, compute):
    run, data, cache = named_run
    dataset = open_reference(data)
    rows = annotated_fraction_sweep(
        run, dataset, dataset, [0.5, 1.0], settings=EvaluateSettings(methods=("attention",), lenient=False, iou_size=32),
        compute=compute, cache_dir=cache,
    )
    by_fraction = {r["annotated_fraction"]: r for r in rows}
    assert by_fraction[0.5]["seen_concepts"] == 2 and by_fraction[1.0]["seen_concepts"] == 4
    assert by_fraction[1.0]["unseen_concepts"] == 0 and by_fraction[1.0]["unseen_recall@20"] is None
    assert (run.path / "sweep" / "annotated-0.50" / "config.json").is_file()
    assert "| 0.50 | attention | 2 |" in (run.path / "sweep.md").read_text()


# ---------------------------------------------------------------------------------------
# Bad input and the command line


def test_bad_settings_are_refused_with_clear_messages(named_run, coco, compute):
    tiny_run, _, _ = named_run
    dataset = open_reference(coco)
    with pytest.raises(LaviseError, match="labelling split"):
        evaluate([tiny_run], dataset, settings=EvaluateSettings(labelling_fraction=0.0), compute=compute)
    with pytest.raises(LaviseError, match="Unknown evaluation method"):
        evaluate([tiny_run], dataset, settings=EvaluateSettings(methods=("magic",)), compute=compute)
    with pytest.raises(LaviseError, match="not a lavise run"):
        evaluate([Path(coco).parent], dataset, compute=compute)
    with pytest.raises(LaviseError, match="annotated fractions"):
        annotated_fraction_sweep(tiny_run, dataset, dataset, [1.5], compute=compute)


def test_cli_evaluate_prints_and_saves_the_table(named_run, tmp_path, capsys):
    run, data, cache = named_run
    out = tmp_path / "table.md"
    code = main([
        "evaluate", str(run.path), "--dataset", str(data), "--methods", "activation", "netdissect",
        "--no-lenient", "--iou-size", "32", "--out", str(out), "--cache-dir", str(cache), "--num-workers", "0",
        "--no-progress", "--device", "cpu",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| resnet18 | layer3 | activation |" in printed and "| resnet18 | layer3 | netdissect |" in printed
    assert out.read_text() in printed


def test_cli_sweep_needs_its_reference(named_run, capsys):
    run, data, _ = named_run
    code = main(["evaluate", str(run.path), "--dataset", str(data), "--annotated-fractions", "0.5"])
    assert code == 2
    assert "--sweep-reference" in capsys.readouterr().err
