"""Reading one layer of a model: dotted paths, a hook that leaves no trace, output shapes."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

import torch
from torch import nn

from lavise.errors import LaviseError
from lavise.models.layouts import LAYOUTS, Layout, ModelHints, as_feature_map, parse_layout, resolve_layout


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


class LayerReader:
    """images -> the layer's output as a map (N, C, h, w); made by :func:`layer_reader`.

    ``layout`` is the layout the output was read in (resolved at the first call).
    """

    def __init__(self, module: nn.Module, path: str, requested: str) -> None:
        self.module, self.path, self.requested = module, path, requested
        self.captured: list[object] = []
        self.layout: Layout | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.captured.clear()
        try:
            self.module(images)
        except _StopForward:
            pass
        if not self.captured:
            raise LaviseError(f"Layer '{self.path}' was not called in the model's forward pass.")
        output = self.captured[0]
        if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
            output = output[0]  # (hidden states, attention weights, ...), as Hugging Face layers of 4.x return
        if not torch.is_tensor(output):
            raise LaviseError(
                f"Layer '{self.path}' outputs a {type(output).__name__}, not a tensor; lavise reads maps "
                f"(N, C, h, w), (N, h, w, C) or token sequences (N, P + h*w, C) (--layout values: "
                f"{', '.join(LAYOUTS)}, tokens:P). Choose another layer."
            )
        if output.dim() > 0 and output.shape[0] != images.shape[0]:
            raise LaviseError(
                f"Layer '{self.path}' outputs {tuple(output.shape)} for a batch of {images.shape[0]} images: its first "
                "dimension is not the images (attention windows or heads, say). Choose the block that holds it."
            )
        if self.layout is None:
            self.layout = resolve_layout(self.requested, tuple(output.shape), ModelHints.of(self.module), layer=self.path)
        return as_feature_map(output, self.layout)


@contextlib.contextmanager
def layer_reader(module: nn.Module, path: str, layout: str = "auto") -> Iterator[LayerReader]:
    """Yield a function images -> the layer's output as (N, C, h, w); nothing after the layer runs.

    ``layout`` is how the output is a map (see :mod:`lavise.models.layouts`): ``auto``
    detects it. The hook is removed and the module's training flag restored on exit,
    also when the forward pass fails.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18()
        >>> with layer_reader(net, "layer4") as read:
        ...     read(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 512, 2, 2])
    """
    layer = resolve_layer(module, path)
    parse_layout(layout)  # a bad --layout is refused before any image is read
    reader = LayerReader(module, path, layout)

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        reader.captured.append(output)
        raise _StopForward

    was_training = module.training
    handle = layer.register_forward_hook(hook)
    module.eval()
    try:
        yield reader
    finally:
        handle.remove()
        module.train(was_training)


def layer_shapes(module: nn.Module, crop_size: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Every layer whose output lavise can read as a map: (name, (filters, h, w), layout
    description), for one image, layouts detected as :func:`layer_reader` would."""
    outputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if torch.is_tensor(out) and out.dim() in (3, 4) and out.shape[0] == 1 and name not in outputs:
                outputs[name] = tuple(out.shape)

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
    hints, listed = ModelHints.of(module), []
    for name in layer_names(module):
        if name in outputs:
            try:
                layout = resolve_layout("auto", outputs[name], hints, layer=name)
            except LaviseError:
                continue  # a sequence that is no grid (a text encoder's, say)
            shape = tuple(as_feature_map(torch.empty(outputs[name], device="meta"), layout).shape[1:])
            listed.append((name, shape, layout.describe()))
    return listed
