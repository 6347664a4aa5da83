"""Target models: what to build (:class:`ModelSpec`) and the built model with its preprocessing.

A target model is a frozen network whose filters we explain. It carries the
preprocessing it was trained with (torchvision's weights do; random or checkpoint models
get ImageNet's), and that preprocessing is recorded in every run so results can be
traced. Names are torchvision's classification models, or the builders of
:data:`EXTRA_MODELS` (one module each in this package).
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lavise.errors import LaviseError, LaviseWarning
from lavise.models.efficientnet_lite import build_efficientnet_lite0
from lavise.models.layouts import parse_layout
from lavise.models.preprocessing import Preprocessing
from lavise.models.scene_cnn import build_scene_cnn
from lavise.models.scene_vit import build_scene_vit
from lavise.models.timm_models import TIMM_PREFIX, check_timm_name, timm_model
from lavise.storage import content_digest


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
    layout: str = "auto"

    def to_dict(self) -> dict:
        spec = asdict(self)
        if spec["layout"] == "auto":  # the default is left out, so runs and caches of 0.4 keep their keys
            del spec["layout"]
        return spec


@dataclass
class TargetModel:
    """A model ready for feature extraction, with what is needed to reproduce it."""

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    description: dict = field(default_factory=dict)
    layout: str = "auto"  # how its layers' outputs are maps: see lavise.models.layouts

    def __post_init__(self) -> None:
        parse_layout(self.layout)

    def identity(self) -> dict:
        """Everything that determines the model's features, for cache keys and runs."""
        identity = {"model": self.description, "preprocessing": self.preprocessing.to_dict()}
        return identity if self.layout == "auto" else {**identity, "layout": self.layout}

    @classmethod
    def from_module(
        cls, module: nn.Module, preprocessing: Preprocessing = Preprocessing(), *, name: str | None = None,
        layout: str = "auto",
    ) -> TargetModel:
        """Wrap any module the user built. Its weights' digest identifies it in caches.

        ``layout`` says how its layers' outputs are maps (``auto``, ``nchw``, ``nhwc``,
        ``tokens``, ``tokens:P``, ``tokens:P:HxW``; see :mod:`lavise.models.layouts`).

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
        return cls(module=module.eval(), preprocessing=preprocessing, description=description, layout=layout)


# Builders for models that torchvision does not name. Each returns (module, preprocessing).
EXTRA_MODELS: dict[str, Callable[[str | None], tuple[nn.Module, Preprocessing]]] = {
    "efficientnet_lite0": build_efficientnet_lite0,
    "scene_cnn": build_scene_cnn,
    "scene_vit": build_scene_vit,
}


def load_target_model(spec: ModelSpec) -> TargetModel:
    """Build the model a :class:`ModelSpec` describes, in eval mode.

    Example:
        >>> model = load_target_model(ModelSpec("resnet18"))
        >>> model.preprocessing.crop_size
        224
    """
    import torchvision

    parse_layout(spec.layout)
    if spec.name.startswith(TIMM_PREFIX):
        check_timm_name(spec.name.removeprefix(TIMM_PREFIX))
    elif spec.name not in EXTRA_MODELS:
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
        if spec.name.startswith(TIMM_PREFIX):
            module, preprocessing = timm_model(spec.name.removeprefix(TIMM_PREFIX), spec.weights,
                                               local=spec.checkpoint is not None)
        elif spec.name in EXTRA_MODELS:
            module, preprocessing = EXTRA_MODELS[spec.name](spec.weights)
        else:
            module, preprocessing = _torchvision_model(spec.name, spec.weights)
    description = spec.to_dict()
    if spec.checkpoint is not None:
        _load_checkpoint(module, Path(spec.checkpoint))
        # Recorded absolute, so a run found from another working directory finds it too.
        description["checkpoint"] = str(Path(spec.checkpoint).resolve())
        # The path alone does not identify the weights: a file rewritten in place must
        # not reuse features cached from its old contents (nor be explained by a run
        # trained on them: see Run.target_model).
        description["checkpoint_sha256"] = content_digest(Path(spec.checkpoint))
    module.eval()
    return TargetModel(module=module, preprocessing=preprocessing, description=description, layout=spec.layout)


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
    _fit_resized_heads(module, state, path)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LaviseError(
            f"Checkpoint '{path}' does not fit the architecture: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Is --model the right architecture?"
        )


def _fit_resized_heads(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Rebuild the linear and convolution layers whose shape the checkpoint changed.

    The commonest checkpoint there is, a network fine-tuned on another set of classes,
    has a classifier of another size (``fc.weight`` of (10, 512) for a resnet18 built
    with 1000). The layers explained come before it, so lavise builds those layers with
    the checkpoint's shapes (and warns) instead of refusing the file. A mismatch in any
    other kind of layer means another architecture and is refused.
    """
    own = module.state_dict()
    mismatched = sorted({key.rsplit(".", 1)[0] for key, value in state.items()
                         if key in own and tuple(own[key].shape) != tuple(value.shape)})
    if not mismatched:
        return
    resized, refused = [], []
    for name in mismatched:
        layer = module.get_submodule(name)
        weight = state.get(f"{name}.weight")
        if isinstance(layer, nn.Linear) and weight is not None and weight.ndim == 2:
            replacement = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
        elif isinstance(layer, nn.Conv2d) and weight is not None and weight.ndim == 4 and layer.groups == 1:
            replacement = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=layer.stride,
                                    padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None)
        else:
            refused.append(f"{name} ({type(layer).__name__})")
            continue
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, replacement)
        resized.append(f"{name} {tuple(own[f'{name}.weight'].shape)} → {tuple(weight.shape)}")
    if refused:
        raise LaviseError(
            f"Checkpoint '{path}' does not fit the architecture: {', '.join(refused)} have other shapes "
            "in it. Is --model the right architecture?"
        )
    warnings.warn(
        f"Checkpoint '{path}' has layers of other shapes than the architecture's defaults (a fine-tuned "
        f"classifier?): {'; '.join(resized)}. They are built with the checkpoint's shapes.",
        LaviseWarning,
        stacklevel=4,
    )
