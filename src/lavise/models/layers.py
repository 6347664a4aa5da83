"""Reading one layer of a model: dotted paths, a hook that leaves no trace, output shapes."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lavise.errors import LaviseError


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
