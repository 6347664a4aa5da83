"""Target models: building by name, checkpoints, layer lookup and reading one layer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lavise.errors import LaviseError
from lavise.models import (
    ModelSpec,
    Preprocessing,
    TargetModel,
    layer_reader,
    layer_shapes,
    load_target_model,
    resolve_layer,
)

SMALL = "squeezenet1_1"  # the smallest torchvision classifier: fast to build and save


def _equal_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- building by name --------------------------------------------------------------------


def test_torchvision_model_by_name_with_random_weights():
    model = load_target_model(ModelSpec("resnet18", weights=None))
    assert isinstance(model.module, torchvision.models.ResNet)
    assert not model.module.training
    assert model.preprocessing == Preprocessing()  # ImageNet's, for random weights
    assert model.description == {"name": "resnet18", "weights": None, "checkpoint": None}


def test_random_initialisation_is_reproducible_and_leaves_the_global_rng_alone():
    # A run stores only the spec; explain and the feature cache rebuild the model from it,
    # so one spec must always give the same weights.
    state = torch.get_rng_state()
    first = load_target_model(ModelSpec(SMALL))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # whatever the caller's seed
    second = load_target_model(ModelSpec(SMALL))
    assert _equal_state(first.module, second.module)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(LaviseError, match="Unknown model 'resnet19'") as error:
        load_target_model(ModelSpec("resnet19"))
    assert "resnet18" in str(error.value)


def test_unknown_weights_name_lists_valid_names():
    with pytest.raises(LaviseError, match="Unknown weights 'IMAGENET9K'") as error:
        load_target_model(ModelSpec("resnet18", weights="IMAGENET9K"))
    message = str(error.value)
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message


@pytest.mark.parametrize(
    ("name", "weights", "expected"),
    [
        ("resnet18", "IMAGENET1K_V1", Preprocessing(256, 224, interpolation="bilinear")),
        ("resnet50", "IMAGENET1K_V2", Preprocessing(232, 224, interpolation="bilinear")),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", Preprocessing(384, 384, interpolation="bicubic")),
    ],
)
def test_preprocessing_comes_from_the_weights(monkeypatch, name, weights, expected):
    # No download: the architecture builder is replaced; the weights enum is real.
    built = []

    def fake_get_model(model_name, weights=None):
        built.append((model_name, weights))
        return nn.Sequential(nn.Conv2d(3, 2, 1))

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = load_target_model(ModelSpec(name, weights=weights))
    assert built[0][0] == name and built[0][1].name == weights
    got = model.preprocessing
    assert (got.resize_size, got.crop_size, got.interpolation) == (
        expected.resize_size, expected.crop_size, expected.interpolation,
    )
    assert got.mean == pytest.approx(Preprocessing().mean)
    assert got.std == pytest.approx(Preprocessing().std)


def test_failed_weights_download_is_a_lavise_error_naming_the_url(monkeypatch):
    def offline(model_name, weights=None):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(LaviseError, match="no network") as error:
        load_target_model(ModelSpec("resnet18", weights="IMAGENET1K_V1"))
    assert "https://" in str(error.value) and "--checkpoint" in str(error.value)


# --- checkpoints -------------------------------------------------------------------------


def _other_weights() -> nn.Module:
    torch.manual_seed(99)
    return torchvision.models.get_model(SMALL, weights=None)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "dataparallel"])
def test_checkpoint_loads(tmp_path, wrap):
    source = _other_weights()
    state = source.state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    model = load_target_model(ModelSpec(SMALL, checkpoint=str(path)))
    assert _equal_state(model.module, source)
    assert not _equal_state(model.module, load_target_model(ModelSpec(SMALL)).module)


def test_mismatching_checkpoint_names_missing_keys(tmp_path):
    state = _other_weights().state_dict()
    del state["features.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(LaviseError, match="does not fit") as error:
        load_target_model(ModelSpec(SMALL, checkpoint=str(path)))
    message = str(error.value)
    assert "1 missing keys" in message and "features.0.weight" in message
    assert "1 unexpected keys" in message and "extra.weight" in message


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(LaviseError, match="holds no state_dict"):
        load_target_model(ModelSpec(SMALL, checkpoint=str(path)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(LaviseError, match="Could not read checkpoint"):
        load_target_model(ModelSpec(SMALL, checkpoint=str(garbage)))
    with pytest.raises(LaviseError, match="does not exist"):
        load_target_model(ModelSpec(SMALL, checkpoint=str(tmp_path / "missing.pt")))


def test_checkpoint_contents_are_part_of_the_identity(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_other_weights().state_dict(), path)
    first = load_target_model(ModelSpec(SMALL, checkpoint=str(path))).identity()
    again = load_target_model(ModelSpec(SMALL, checkpoint=str(path))).identity()
    assert first == again
    torch.save(load_target_model(ModelSpec(SMALL)).module.state_dict(), path)  # same path, new weights
    changed = load_target_model(ModelSpec(SMALL, checkpoint=str(path))).identity()
    assert changed != first


# --- layers ------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "suggested"), [("layer5", "layer4"), ("layer4.2", "layer4.1"), ("layer4.0.conv3", "layer4.0.conv2")])
def test_unknown_layer_lists_close_valid_names(path, suggested):
    net = torchvision.models.resnet18()
    with pytest.raises(LaviseError, match=f"Layer '{path}' not found") as error:
        resolve_layer(net, path)
    assert suggested in str(error.value)
    assert "lavise layers" in str(error.value)


def test_resolve_layer_finds_nested_modules(tiny_net_type):
    net = tiny_net_type()
    assert resolve_layer(net, "features.3") is net.features[3]
    assert resolve_layer(net, "head.2") is net.head[2]


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("a module after the layer ran")


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.saw_training = []

    def forward(self, x):
        self.calls += 1
        self.saw_training.append(self.training)
        return x


def test_layer_reader_returns_the_layer_output_and_stops_there(tiny_net_type):
    net = tiny_net_type()
    before = _Counter()
    net.features = nn.Sequential(before, *net.features)  # the layer is now features.4
    net.head = _Boom()
    images = torch.rand(2, 3, 64, 64)
    with layer_reader(net, "features.4") as read:
        output = read(images)
    with torch.no_grad():
        expected = net.features(images)
    assert output.shape == (2, 8, 8, 8)
    torch.testing.assert_close(output, expected)
    assert before.calls == 2  # our forward and the reference one, nothing else


@pytest.mark.parametrize("training", [True, False])
def test_layer_reader_runs_in_eval_mode_and_restores_the_flag(tiny_net_type, training):
    net = tiny_net_type()
    spy = _Counter()
    net.features = nn.Sequential(spy, *net.features)
    net.train(training)
    with layer_reader(net, "features.4") as read:
        read(torch.rand(1, 3, 64, 64))
    assert spy.saw_training == [False]
    assert net.training is training and spy.training is training


@pytest.mark.parametrize("training", [True, False])
def test_layer_reader_leaves_no_hook_after_a_failing_forward(tiny_net_type, training):
    net = tiny_net_type()
    net.train(training)
    layer = net.features[3]
    with pytest.raises(RuntimeError):
        with layer_reader(net, "features.3") as read:
            assert len(layer._forward_hooks) == 1
            read(torch.rand(1, 5, 64, 64))  # wrong channel count: the first conv fails
    assert len(layer._forward_hooks) == 0
    assert net.training is training
    assert all(m.training is training for m in net.modules())


def test_layer_reader_leaves_no_hook_after_an_error_in_the_caller(tiny_net_type):
    net = tiny_net_type().train()
    with pytest.raises(KeyError):
        with layer_reader(net, "features.3") as read:
            read(torch.rand(1, 3, 64, 64))
            raise KeyError("caller")
    assert len(net.features[3]._forward_hooks) == 0 and net.training
    # and the model works normally again: the full forward reaches the classifier
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_non_convolutional_layer_is_refused():
    net = torchvision.models.resnet18()
    with layer_reader(net, "avgpool") as read:  # 4-D: (N, 512, 1, 1) is accepted
        assert read(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 1, 1)
    with pytest.raises(LaviseError, match=r"'fc' outputs \(1, 1000\)"):
        with layer_reader(net, "fc") as read:
            read(torch.zeros(1, 3, 64, 64))
    assert len(net.fc._forward_hooks) == 0


def test_layer_that_is_never_called(tiny_net_type):
    net = tiny_net_type()
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(LaviseError, match="was not called"):
        with layer_reader(net, "unused") as read:
            read(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", {"layer4": (512, 7, 7), "layer3": (256, 14, 14), "layer1.1.conv2": (64, 56, 56)}),
        ("vgg16", {"features.28": (512, 14, 14), "features.30": (512, 7, 7)}),
    ],
)
def test_layer_shapes_at_224_px(name, expected):
    model = load_target_model(ModelSpec(name))
    crop = model.preprocessing.crop_size
    assert crop == 224
    for layer, shape in expected.items():
        with layer_reader(model.module, layer) as read:
            assert tuple(read(torch.zeros(1, 3, crop, crop)).shape[1:]) == shape, layer
    if name == "resnet18":
        shapes = {name: shape for name, shape, _ in layer_shapes(model.module, crop)}
        assert all(shapes[layer] == shape for layer, shape in expected.items())
        assert "fc" not in shapes  # 2-D outputs are not explainable layers
        assert shapes["avgpool"] == (512, 1, 1)


def test_layer_shapes_removes_its_hooks_and_keeps_the_mode(tiny_net_type):
    net = tiny_net_type().train()
    shapes = layer_shapes(net, 64)
    assert [(name, shape) for name, shape, _ in shapes] == [
        ("features", (8, 8, 8)), ("features.0", (6, 32, 32)), ("features.1", (6, 32, 32)),
        ("features.2", (8, 8, 8)), ("features.3", (8, 8, 8)), ("head.0", (8, 1, 1)),
    ]
    assert {layout for _, _, layout in shapes} == {"channels first (N, C, h, w)"}
    assert all(not m._forward_hooks for m in net.modules())
    assert net.training


# --- wrapping a module -------------------------------------------------------------------


def test_from_module_digest_follows_the_weights(tiny_net_type):
    net = tiny_net_type()
    first = TargetModel.from_module(net, name="tiny")
    same = TargetModel.from_module(net, name="tiny")
    assert first.description == same.description
    assert first.description["name"] == "tiny" and first.description["custom"] is True
    with torch.no_grad():
        net.features[0].bias[0] += 1e-3
    changed = TargetModel.from_module(net, name="tiny")
    assert changed.description["weights_sha256"] != first.description["weights_sha256"]
    assert changed.identity() != first.identity()


def test_identity_includes_the_preprocessing(tiny_net_type):
    net = tiny_net_type()
    a = TargetModel.from_module(net, Preprocessing(64, 64))
    b = TargetModel.from_module(net, Preprocessing(72, 64))
    assert a.description == b.description and a.identity() != b.identity()
    assert Preprocessing.from_dict(a.identity()["preprocessing"]) == Preprocessing(64, 64)


def test_run_config_records_the_preprocessing(tiny_run, tiny_model):
    from lavise.runs import load_run

    assert Preprocessing.from_dict(tiny_run.config["preprocessing"]) == tiny_model.preprocessing
    loaded = load_run(tiny_run.path)
    assert Preprocessing.from_dict(loaded.config["preprocessing"]) == Preprocessing(64, 64)
