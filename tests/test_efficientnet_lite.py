"""EfficientNet-Lite0 with the packaged ImageNet weights: pairing, predictions, layers."""

from __future__ import annotations

import pytest
import torch
from skimage import data
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as transforms

from lavise.models.efficientnet_lite import (
    DEFAULT_LAYERS,
    PREPROCESSING,
    WeightsMismatchError,
    build_efficientnet_lite0,
    create_architecture,
    load_imagenet_state_dict,
    pair_state_dicts,
)
from lavise.errors import LaviseError
from lavise.models import EXTRA_MODELS, ModelSpec, Preprocessing, layer_reader, load_target_model

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _preprocess(image, preprocessing: Preprocessing) -> torch.Tensor:
    """One HWC uint8 image as a (1, 3, crop, crop) batch, as the preprocessing says."""
    pipeline = transforms.Compose(
        [
            transforms.ToImage(),
            transforms.Resize(
                preprocessing.resize_size,
                interpolation=InterpolationMode(preprocessing.interpolation),
                antialias=True,
            ),
            transforms.CenterCrop(preprocessing.crop_size),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
    return pipeline(image).unsqueeze(0)


def _outputs(module: nn.Module, paths: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named sub-modules' outputs for one forward pass."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.get_submodule(path).register_forward_hook(
            lambda _m, _i, out, path=path: captured.__setitem__(path, out.clone())
        )
        for path in paths
    ]
    try:
        with torch.inference_mode():
            module(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def pretrained() -> tuple[nn.Module, Preprocessing]:
    return build_efficientnet_lite0("IMAGENET")


@pytest.fixture(scope="module")
def chelsea(pretrained) -> torch.Tensor:
    return _preprocess(data.chelsea(), pretrained[1])


def test_preprocessing_is_minus_one_to_one_at_224(pretrained):
    assert pretrained[1] == PREPROCESSING
    assert (PREPROCESSING.resize_size, PREPROCESSING.crop_size) == (256, 224)
    assert PREPROCESSING.mean == PREPROCESSING.std == (0.5, 0.5, 0.5)
    assert PREPROCESSING.interpolation == "bicubic"


def test_chelsea_is_a_cat_in_the_top5(pretrained, chelsea):
    with torch.inference_mode():
        top5 = pretrained[0](chelsea)[0].topk(5).indices.tolist()
    assert set(top5) & set(CAT_CLASSES), top5


def test_coffee_is_espresso(pretrained):
    with torch.inference_mode():
        logits = pretrained[0](_preprocess(data.coffee(), pretrained[1]))
    assert int(logits.argmax()) == ESPRESSO


def test_every_paired_entry_matches_in_shape_and_kind():
    source = load_imagenet_state_dict()
    target = create_architecture().state_dict()
    pairs = pair_state_dicts(source, target)
    assert len(pairs) == len(source) == len(target) == 296
    for source_key, target_key in pairs:
        assert source[source_key].shape == target[target_key].shape, (source_key, target_key)
        assert source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]


def test_loaded_weights_equal_the_file(pretrained):
    source = load_imagenet_state_dict()
    loaded = pretrained[0].state_dict()
    for source_key, target_key in pair_state_dicts(source, loaded):
        assert torch.equal(source[source_key], loaded[target_key]), target_key


def test_a_shape_mismatch_names_the_first_bad_pair():
    source = dict(load_imagenet_state_dict())
    source["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    target = create_architecture().state_dict()
    expected = (
        r"Entry 60 .*'_blocks\.3\._depthwise_conv\.weight'.*'blocks\.2\.0\.conv_dw\.weight'"
        r".*shape \(144, 1, 3, 3\) vs \(144, 1, 5, 5\)"
    )
    with pytest.raises(WeightsMismatchError, match=expected):
        pair_state_dicts(source, target)


def test_a_count_mismatch_is_reported():
    source = dict(load_imagenet_state_dict())
    source.pop("_fc.bias")
    with pytest.raises(WeightsMismatchError, match="295 entries.*296"):
        pair_state_dicts(source, create_architecture().state_dict())


def test_swapped_weight_and_bias_are_caught_by_kind():
    items = list(load_imagenet_state_dict().items())
    items[1], items[2] = items[2], items[1]  # _bn0.weight and _bn0.bias, same shape
    with pytest.raises(WeightsMismatchError, match="kind bias vs weight"):
        pair_state_dicts(dict(items), create_architecture().state_dict())


def test_without_batchnorm_counters_the_rest_still_pairs():
    source = {k: v for k, v in load_imagenet_state_dict().items() if "num_batches" not in k}
    module = create_architecture()
    pairs = pair_state_dicts(source, module.state_dict())
    assert len(pairs) == 296 - 49
    assert not any("num_batches_tracked" in target_key for _, target_key in pairs)


def test_default_layers_are_non_negative_with_documented_shapes(pretrained, chelsea):
    outputs = _outputs(pretrained[0], list(DEFAULT_LAYERS), chelsea)
    for path, shape in DEFAULT_LAYERS.items():
        assert tuple(outputs[path].shape[1:]) == shape, path
        assert outputs[path].min() >= 0, path
        assert outputs[path].max() > 0, path


def test_block_outputs_are_pre_activation(pretrained, chelsea):
    outputs = _outputs(pretrained[0], ["blocks.4", "conv_head"], chelsea)
    assert outputs["blocks.4"].min() < 0
    assert outputs["conv_head"].min() < 0


def test_unknown_weights_name_raises():
    with pytest.raises(LaviseError, match="'IMAGENET1K_V1'.*valid: IMAGENET"):
        build_efficientnet_lite0("IMAGENET1K_V1")


def test_random_initialisation_builds():
    module, preprocessing = build_efficientnet_lite0(None)
    assert preprocessing == PREPROCESSING
    assert not module.training
    with torch.inference_mode():
        assert module(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_works_through_load_target_model_and_layer_reader(monkeypatch, chelsea):
    monkeypatch.setitem(EXTRA_MODELS, "efficientnet_lite0", build_efficientnet_lite0)
    target = load_target_model(ModelSpec("efficientnet_lite0", weights="IMAGENET"))
    assert target.preprocessing == PREPROCESSING
    with layer_reader(target.module, "blocks.5.0.bn1") as read, torch.inference_mode():
        assert tuple(read(chelsea).shape) == (1, *DEFAULT_LAYERS["blocks.5.0.bn1"])
