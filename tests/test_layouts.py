"""Layers that are not (N, C, h, w): token sequences, channels-last maps, and timm models by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from lavise.datasets import open_reference
from lavise.errors import LaviseError
from lavise.evaluate import evaluate
from lavise.explain import explain
from lavise.groups import compare_groups
from lavise.models import ModelSpec, Preprocessing, TargetModel, layer_reader, layer_shapes, load_target_model
from lavise.models.layouts import Layout, ModelHints, as_feature_map, parse_layout, resolve_layout
from lavise.report import write_report
from lavise.runs import load_run, train
from lavise.settings import EVALUATION_METHODS, EvaluateSettings, ExplainSettings, GroupSettings, TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")
SIZE = 64  # the generated COCO's images


def tiny_vit(registers: int = 0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, embed_dim=24,
                             depth=2, num_heads=2, num_classes=5, reg_tokens=registers)


def tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE, patch_size=4,
                             window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=5)


def tiny_convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_tiny", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), dims=(8, 12, 16, 20))


def raw_output(module, layer, images):
    captured = []
    handle = module.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.inference_mode():
        module.eval()(images)
    handle.remove()
    return captured[0]


# --- the pure conversion ---------------------------------------------------------------------


def test_tokens_become_a_grid_in_raster_order_without_the_prefix():
    tokens = torch.randn(2, 2 + 3 * 4, 5)  # 2 prefix tokens, a 3x4 grid, 5 channels
    grid = as_feature_map(tokens, Layout("tokens", 2, (3, 4)))
    assert grid.shape == (2, 5, 3, 4)
    for i in range(3):
        for j in range(4):
            assert torch.equal(grid[:, :, i, j], tokens[:, 2 + i * 4 + j, :])


def test_channels_last_is_permuted_and_channels_first_kept():
    maps = torch.randn(2, 3, 4, 5)
    assert torch.equal(as_feature_map(maps, Layout("nhwc"))[1, 4, 2, 3], maps[1, 2, 3, 4])
    assert as_feature_map(maps, Layout("nchw")) is maps


@pytest.mark.parametrize(
    ("shape", "hints", "requested", "expected"),
    [
        ((1, 197, 768), ModelHints(prefix_tokens=1, grid=(14, 14)), "auto", Layout("tokens", 1, (14, 14))),
        ((1, 196, 768), ModelHints(prefix_tokens=1, grid=(14, 14)), "auto", Layout("tokens", 0, (14, 14))),  # patch_embed
        ((1, 201, 384), ModelHints(prefix_tokens=5, grid=(14, 14)), "auto", Layout("tokens", 5, (14, 14))),  # registers
        ((1, 50, 64), ModelHints(), "auto", Layout("tokens", 1, (7, 7))),  # no hints: fewest prefix tokens
        ((1, 49, 64), ModelHints(), "auto", Layout("tokens", 0, (7, 7))),
        ((1, 51, 64), ModelHints(), "tokens:2", Layout("tokens", 2, (7, 7))),
        ((1, 25, 64), ModelHints(), "tokens:1:4x6", Layout("tokens", 1, (4, 6))),
        ((1, 512, 7, 7), ModelHints(), "auto", Layout("nchw")),
        ((1, 7, 7, 768), ModelHints(), "auto", Layout("nhwc")),
        ((1, 8, 8, 8), ModelHints(), "auto", Layout("nchw")),  # ambiguous: channels first ...
        ((1, 8, 8, 8), ModelHints(channels_last=True), "auto", Layout("nhwc")),  # ... unless the model says
        ((1, 8, 8, 8), ModelHints(channels={"stages.1": 8}), "nhwc", Layout("nhwc")),
        ((1, 96, 96, 96), ModelHints(channels={"layers.0": 96}), "auto", Layout("nchw")),
    ],
)
def test_layouts_are_detected_from_the_model_and_the_shape(shape, hints, requested, expected):
    assert resolve_layout(requested, shape, hints, layer="layers.0.blocks.0") == expected


@pytest.mark.parametrize(
    ("shape", "requested", "message"),
    [
        ((1, 1000), "auto", r"outputs \(1, 1000\), which is not a map.*--layout values: auto, nchw, nhwc, tokens"),
        ((1, 2, 3, 4, 5), "auto", "which is not a map"),
        ((1, 197, 768), "nchw", r"a token sequence, not a nchw map: use --layout tokens"),
        ((1, 512, 7, 7), "tokens", r"a 4-D map, not tokens"),
        ((1, 197, 768), "tokens:3", r"197 tokens do not split into 3 prefix tokens and a square grid"),
        ((1, 197, 768), "tokens:1:10x10", r"do not split into 1 prefix tokens and a 10x10 grid"),
        ((1, 3, 768), "auto", None),  # 3 tokens: prefix 2 + a 1x1 grid is the fewest; accepted
    ],
)
def test_a_layout_that_does_not_fit_is_refused_with_the_shape(shape, requested, message):
    if message is None:
        assert resolve_layout(requested, shape).grid == (1, 1)
        return
    with pytest.raises(LaviseError, match=message):
        resolve_layout(requested, shape, layer="x")


@pytest.mark.parametrize("text", ["gpu", "tokens:x", "nchw:1", "tokens:1:14", "TOKENS", ""])
def test_bad_layout_values_name_the_option(text):
    with pytest.raises(LaviseError, match=r"--layout .* is not a layout"):
        parse_layout(text)
    with pytest.raises(LaviseError, match="is not a layout"):
        TargetModel.from_module(torch.nn.Conv2d(3, 4, 3), layout=text)


# --- real timm models: the map a layer gives, checked by hand ------------------------------


@pytest.mark.parametrize("registers", [0, 4])
def test_a_vit_blocks_map_is_its_patch_tokens(registers):
    vit = tiny_vit(registers)
    images = torch.randn(3, 3, SIZE, SIZE)
    raw = raw_output(vit, "blocks.1", images)
    assert raw.shape == (3, 1 + registers + 64, 24)
    with layer_reader(vit, "blocks.1") as read, torch.inference_mode():
        maps = read(images)
    assert read.layout == Layout("tokens", 1 + registers, (8, 8))
    assert maps.shape == (3, 24, 8, 8)
    hand = torch.stack([torch.stack([raw[:, 1 + registers + 8 * i + j, :] for j in range(8)], -1) for i in range(8)], -2)
    assert torch.equal(maps, hand)


def test_a_swin_stages_map_is_its_channels_last_output():
    swin = tiny_swin()
    images = torch.randn(2, 3, SIZE, SIZE)
    raw = raw_output(swin, "layers.1", images)
    assert raw.shape == (2, 8, 8, 32)
    with layer_reader(swin, "layers.1") as read, torch.inference_mode():
        maps = read(images)
    assert read.layout == Layout("nhwc")
    assert all(torch.equal(maps[n, c], raw[n, :, :, c]) for n in range(2) for c in range(32))


def test_a_convnext_block_inside_is_channels_last_and_its_stage_channels_first():
    net = tiny_convnext()
    images = torch.randn(2, 3, SIZE, SIZE)
    raw = raw_output(net, "stages.1.blocks.0.mlp.fc1", images)  # timm's ConvNeXt MLP runs channels last
    assert raw.shape == (2, 8, 8, 48)
    with layer_reader(net, "stages.1.blocks.0.mlp.fc1") as read, torch.inference_mode():
        maps = read(images)
    assert read.layout.kind == "nhwc" and torch.equal(maps, raw.permute(0, 3, 1, 2))
    with layer_reader(net, "stages.1") as read, torch.inference_mode():
        assert read(images).shape == (2, 12, 8, 8) and read.layout.kind == "nchw"


def test_windowed_attention_is_refused_not_mixed_into_images():
    with layer_reader(tiny_swin(), "layers.0.blocks.0.attn") as read, pytest.raises(LaviseError, match=r"its first dimension is not the images"):
        read(torch.randn(2, 3, SIZE, SIZE))


def test_layers_lists_token_and_channels_last_layers_with_their_maps():
    listed = {name: (shape, layout) for name, shape, layout in layer_shapes(tiny_vit(1), SIZE)}
    assert listed["blocks.0"] == ((24, 8, 8), "tokens (8x8 patch grid, 2 prefix tokens dropped)")
    assert listed["patch_embed.proj"] == ((24, 8, 8), "channels first (N, C, h, w)")
    assert "head" not in listed  # a vector is no map
    swin = {name: layout for name, _, layout in layer_shapes(tiny_swin(), SIZE)}
    assert swin["layers.0"] == "channels last (N, h, w, C)"
    assert "layers.0.blocks.0.attn" not in swin  # windows, not images


# --- timm by name ----------------------------------------------------------------------------


def test_timm_by_name_brings_its_preprocessing_and_seeded_weights():
    first = load_target_model(ModelSpec("timm/vit_tiny_patch16_224"))
    assert first.preprocessing == Preprocessing(resize_size=248, crop_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                                interpolation="bicubic")  # floor(224 / 0.9)
    again = load_target_model(ModelSpec("timm/vit_tiny_patch16_224"))
    assert torch.equal(first.module.blocks[0].attn.qkv.weight, again.module.blocks[0].attn.qkv.weight)
    convnext = load_target_model(ModelSpec("timm/convnext_atto"))
    assert (convnext.preprocessing.resize_size, convnext.preprocessing.mean) == (256, (0.485, 0.456, 0.406))


def test_timm_checkpoints_load_locally_with_the_tags_preprocessing(tmp_path):
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "r.pt")
    model = load_target_model(ModelSpec("timm/resnet10t", weights="c3_in1k", checkpoint=str(tmp_path / "r.pt")))
    assert torch.equal(model.module.conv1[0].weight, source.conv1[0].weight)
    assert model.preprocessing.crop_size == 176  # the c3_in1k tag's training size
    assert model.description["name"] == "timm/resnet10t"


def test_unknown_timm_names_and_tags_list_the_closest():
    with pytest.raises(LaviseError, match=r"Unknown timm model 'vit_tiny_patch16_22'. Closest timm names: vit_tiny_patch16_224"):
        load_target_model(ModelSpec("timm/vit_tiny_patch16_22"))
    with pytest.raises(LaviseError, match=r"no pretrained tag 'nope' for 'vit_tiny_patch16_224'; its tags: augreg_in21k"):
        load_target_model(ModelSpec("timm/vit_tiny_patch16_224", weights="nope"))


def test_timm_weights_offline_say_to_use_a_checkpoint():
    code = ("from lavise.models import ModelSpec, load_target_model\n"
            "from lavise.errors import LaviseError\n"
            "try:\n    load_target_model(ModelSpec('timm/vit_tiny_patch16_224', weights='augreg_in21k'))\n"
            "except LaviseError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "Could not load the timm weights 'vit_tiny_patch16_224.augreg_in21k'" in done.stdout
    assert "pass it with --checkpoint FILE" in done.stdout and "Traceback" not in done.stderr


# --- every stage on a transformer layer --------------------------------------------------------


def test_every_stage_runs_on_a_vit_block(tmp_path, coco, targets, grouped, compute):
    model = TargetModel.from_module(tiny_vit(), Preprocessing(resize_size=SIZE, crop_size=SIZE), name="tiny-vit")
    cache = tmp_path / "cache"
    run = train(model, "blocks.1", open_reference(coco), tmp_path / "run", settings=TrainSettings(epochs=2),
                compute=compute, cache_dir=cache)
    assert run.config["feature_shape"] == [24, 8, 8]
    assert run.config["layout"] == {"kind": "tokens", "prefix_tokens": 1, "grid": [8, 8]}
    few = ExplainSettings(top_images=4, vocabulary_size=300)
    explained = explain(run, grouped, settings=few, compute=compute, model=model, cache_dir=cache)
    assert len(explained.filters) == 24 and any(f.words for f in explained.filters)
    (evaluation,) = evaluate([run], open_reference(coco), settings=EvaluateSettings(methods=EVALUATION_METHODS, iou_size=32),
                             explain_settings=few, compute=compute, model=model, cache_dir=cache)
    assert set(evaluation.methods) == set(EVALUATION_METHODS)  # every explainer input method, and NetDissect
    assert all(summary["filters"] == evaluation.methods["netdissect"]["filters"] for summary in evaluation.methods.values())
    comparison = compare_groups(run, grouped, settings=GroupSettings(min_group_images=10, examples=2, chart_filters=4),
                                compute=compute, model=model, cache_dir=cache)
    assert len(comparison.filters) == 24
    index = write_report(run.path, compute=compute, model=model, cache_dir=cache)
    assert index.is_file() and (index.parent / "thumbs").is_dir()
    assert json.loads((run.path / "config.json").read_text())["layout_requested"] == "auto"


def test_a_swin_run_trained_by_name_remembers_its_layout(tmp_path, coco, targets, compute):
    spec = ModelSpec("timm/swin_tiny_patch4_window7_224", layout="nhwc")
    run = train(spec, "layers.3", open_reference(coco), tmp_path / "run", settings=TrainSettings(epochs=1),
                compute=compute, cache_dir=tmp_path / "cache")
    assert run.config["layout"]["kind"] == "nhwc" and run.config["feature_shape"] == [768, 7, 7]
    again = load_run(run.path)
    assert again.model_spec.layout == "nhwc"
    result = explain(again, targets, settings=ExplainSettings(top_images=3, vocabulary_size=200), compute=compute,
                     cache_dir=tmp_path / "cache")
    assert len(result.filters) == 768


def test_a_layout_that_does_not_fit_is_refused_before_any_image_is_read(tmp_path, coco, compute):
    model = TargetModel.from_module(tiny_vit(), Preprocessing(resize_size=SIZE, crop_size=SIZE), layout="nhwc")
    with pytest.raises(LaviseError, match=r"Layer 'blocks.1' outputs \(1, 65, 24\), a token sequence, not a nhwc map"):
        train(model, "blocks.1", open_reference(coco), tmp_path / "run", settings=TrainSettings(epochs=1),
              compute=compute, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("reference-*"))


# --- the command line -------------------------------------------------------------------------


def test_cli_layers_lists_a_timm_vit_with_its_layouts(capsys):
    from lavise.cli import main

    assert main(["layers", "timm/vit_tiny_patch16_224"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re_line.split() == ["blocks.11", "192", "x", "14", "x", "14", "tokens", "(14x14", "patch", "grid,", "1",
                                   "prefix", "token", "dropped)"] for re_line in lines)
    assert any(line.split() == ["patch_embed.proj", "192", "x", "14", "x", "14"] for line in lines)


def test_cli_trains_a_timm_vit_and_says_what_it_dropped(tmp_path, coco, capsys):
    from lavise.cli import main

    code = main(["train", "--model", "timm/vit_tiny_patch16_224", "--layer", "blocks.2", "--layout", "tokens:1",
                 "--reference", str(coco), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "layer read as tokens (14x14 patch grid, 1 prefix token dropped); a filter is one channel" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["layout"] == "tokens:1" and config["preprocessing"]["interpolation"] == "bicubic"


@pytest.mark.parametrize(("layout", "message"), [("gpu", "--layout 'gpu' is not a layout"),
                                                 ("nhwc", "a token sequence, not a nhwc map")])
def test_cli_refuses_a_bad_layout_in_one_line(tmp_path, coco, capsys, layout, message):
    from lavise.cli import main

    code = main(["train", "--model", "timm/vit_tiny_patch16_224", "--layer", "blocks.2", "--layout", layout,
                 "--reference", str(coco), "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
