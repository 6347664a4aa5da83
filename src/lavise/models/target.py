"""Target models: building them by name, their preprocessing, and reading one layer.

A target model is a frozen CNN whose filters we explain. It carries the preprocessing it
was trained with (torchvision's weights do; random or checkpoint models get ImageNet's),
and that preprocessing is recorded in every run so results can be traced.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lavise.errors import LaviseError
from lavise.storage import content_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel.

    The same geometry is applied to concept masks so that they stay aligned with the
    image the network sees.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data["interpolation"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a target model: an architecture name, weights, or a checkpoint.

    ``name`` is a torchvision classification model (``resnet18``) or one of the extra
    builders in :data:`EXTRA_MODELS`. ``weights`` is a torchvision weight name such as
    ``IMAGENET1K_V1`` (``None``: random initialisation). ``checkpoint`` is a local file
    holding a state_dict, or a dict with one under ``state_dict`` or ``model``.
    """

    name: str
    weights: str | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TargetModel:
    """A model ready for feature extraction, with what is needed to reproduce it."""

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    description: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """Everything that determines the model's features, for cache keys and runs."""
        return {"model": self.description, "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_module(
        cls, module: nn.Module, preprocessing: Preprocessing = Preprocessing(), *, name: str | None = None
    ) -> TargetModel:
        """Wrap any module the user built. Its weights' digest identifies it in caches.

        Example:
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            >>> TargetModel.from_module(net, name="tiny").description["custom"]
            True
        """
        digest = hashlib.sha256()
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        description = {"name": name or type(module).__name__, "custom": True, "weights_sha256": digest.hexdigest()}
        return cls(module=module.eval(), preprocessing=preprocessing, description=description)


# Builders for models that torchvision does not name. Each returns (module, preprocessing).
EXTRA_MODELS: dict[str, Callable[[str | None], tuple[nn.Module, Preprocessing]]] = {}


def load_target_model(spec: ModelSpec) -> TargetModel:
    """Build the model a :class:`ModelSpec` describes, in eval mode.

    Example:
        >>> model = load_target_model(ModelSpec("resnet18"))
        >>> model.preprocessing.crop_size
        224
    """
    import torchvision

    if spec.name not in EXTRA_MODELS:
        available = torchvision.models.list_models(module=torchvision.models)
        if spec.name not in available:
            close = difflib.get_close_matches(spec.name, available + list(EXTRA_MODELS), n=5)
            raise LaviseError(
                f"Unknown model '{spec.name}'. Close matches: {', '.join(close) or 'none'}. "
                "Use a torchvision classification model name (e.g. resnet18, resnet50, vgg16)"
                f"{', or one of ' + ', '.join(sorted(EXTRA_MODELS)) if EXTRA_MODELS else ''}."
            )
    # A spec must name one set of weights: random initialisation (weights=None) is seeded,
    # so rebuilding the spec (explain after train, the feature cache) gives the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.name in EXTRA_MODELS:
            module, preprocessing = EXTRA_MODELS[spec.name](spec.weights)
        else:
            module, preprocessing = _torchvision_model(spec.name, spec.weights)
    description = spec.to_dict()
    if spec.checkpoint is not None:
        _load_checkpoint(module, Path(spec.checkpoint))
        # The path alone does not identify the weights: a file rewritten in place must
        # not reuse features cached from its old contents.
        description["checkpoint_sha256"] = content_digest(Path(spec.checkpoint))
    module.eval()
    return TargetModel(module=module, preprocessing=preprocessing, description=description)


def _torchvision_model(name: str, weights: str | None) -> tuple[nn.Module, Preprocessing]:
    import torchvision

    if weights is None:
        return torchvision.models.get_model(name, weights=None), Preprocessing()
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        chosen = weights_enum[weights] if weights != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        valid = ", ".join(w.name for w in weights_enum)
        raise LaviseError(
            f"Unknown weights '{weights}' for model '{name}'; valid: {valid}, DEFAULT, "
            "or leave out for random initialisation."
        ) from None
    transforms = chosen.transforms()
    preprocessing = Preprocessing(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        interpolation=transforms.interpolation.value,
    )
    try:
        module = torchvision.models.get_model(name, weights=chosen)
    except Exception as error:  # network failures come in many types
        raise LaviseError(
            f"Could not load weights {name}/{chosen.name}: {error}. The weights are "
            f"downloaded from {chosen.url} on first use; without internet, put the file "
            "in $TORCH_HOME/hub/checkpoints, or pass it with --checkpoint."
        ) from None
    return module, preprocessing


def _load_checkpoint(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise LaviseError(f"Checkpoint '{path}' does not exist or is not a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LaviseError(
            f"Could not read checkpoint '{path}' as a tensor file ({error}). Save it with "
            "torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise LaviseError(
            f"Checkpoint '{path}' holds no state_dict (a dict of tensors, or a dict with "
            "one under 'state_dict' or 'model')."
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel saves
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LaviseError(
            f"Checkpoint '{path}' does not fit the architecture: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Is --model the right architecture?"
        )


def layer_names(module: nn.Module) -> list[str]:
    """Dotted paths of every sub-module, in definition order."""
    return [name for name, _ in module.named_modules() if name]


def resolve_layer(module: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted path; on a miss, an error naming close matches."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = layer_names(module)
        close = difflib.get_close_matches(path, names, n=8, cutoff=0.5)
        raise LaviseError(
            f"Layer '{path}' not found in the model. Closest valid names: "
            f"{', '.join(close) or ', '.join(names[:8])}. "
            "Run 'lavise layers MODEL' to list every layer with its output shape."
        ) from None


class _StopForward(Exception):
    """Raised by the hook once the layer has produced its output."""


@contextlib.contextmanager
def layer_reader(module: nn.Module, path: str) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield a function images -> the layer's output; nothing after the layer runs.

    The hook is removed and the module's training flag restored on exit, also when the
    forward pass fails.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18()
        >>> with layer_reader(net, "layer4") as read:
        ...     read(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 512, 2, 2])
    """
    layer = resolve_layer(module, path)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output)
        raise _StopForward

    was_training = module.training
    handle = layer.register_forward_hook(hook)
    module.eval()

    def read(images: torch.Tensor) -> torch.Tensor:
        captured.clear()
        try:
            module(images)
        except _StopForward:
            pass
        if not captured:
            raise LaviseError(f"Layer '{path}' was not called in the model's forward pass.")
        output = captured[0]
        if not torch.is_tensor(output) or output.dim() != 4:
            shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
            raise LaviseError(
                f"Layer '{path}' outputs {shape}; LaViSE explains convolutional feature "
                "maps of shape (batch, filters, height, width). Choose a convolutional "
                "block or activation instead."
            )
        return output

    try:
        yield read
    finally:
        handle.remove()
        module.train(was_training)


def layer_shapes(module: nn.Module, crop_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Each 4-D layer output's shape (filters, height, width) for one image."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if torch.is_tensor(out) and out.dim() == 4 and name not in shapes:
                shapes[name] = tuple(out.shape[1:])

        handles.append(sub.register_forward_hook(hook))
    was_training = module.training
    try:
        module.eval()
        with torch.inference_mode():
            module(torch.zeros(1, 3, crop_size, crop_size))
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return [(name, shapes[name]) for name in layer_names(module) if name in shapes]


def _efficientnet_lite0(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    from lavise.efficientnet_lite import build_efficientnet_lite0  # needs timm; imported late

    return build_efficientnet_lite0(weights)


EXTRA_MODELS["efficientnet_lite0"] = _efficientnet_lite0


def _scene_cnn(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    from lavise.scene_cnn import build_scene_cnn

    return build_scene_cnn(weights)


EXTRA_MODELS["scene_cnn"] = _scene_cnn
