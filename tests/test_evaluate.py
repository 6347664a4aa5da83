"""The evaluation: IoU tallies, ground truth, recall, baselines and NetDissect, on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import COLOURS, ColourNet
from lavise.cli import main
from lavise.datasets import open_reference
from lavise.errors import LaviseError
from lavise.evaluate import evaluate, image_masking_inputs, mask_images
from lavise.sweep import annotated_fraction_sweep
from lavise.models import Preprocessing, TargetModel, layer_reader
from lavise.runs import train
from lavise.settings import EvaluateSettings, ExplainSettings, TrainSettings

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


# ---------------------------------------------------------------------------------------
# End to end, on a model whose filters are known colour detectors



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
    (evaluation,) = evaluate([run], dataset, settings=settings, explain_settings=ExplainSettings(quantile=0.3, label_first=0),
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
    with pytest.raises(LaviseError, match="methods must be distinct names among original, image"):
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
